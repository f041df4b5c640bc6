"""Next tokens for a batch of rows, each with its own sampling parameters and generator.

Every row goes through `generate.sample_next`, the reference generator's code path, with its own
`torch.Generator` consumed exactly as the reference consumes it; so a seeded request draws the same
tokens whatever else is in the batch. Plain greedy rows (no repetition penalty) need no per-row work and
share one argmax.
"""

from __future__ import annotations

import torch

from codellm.engine.scheduler import Request
from codellm.generate import SamplingParams, sample_next


def sample_rows(logits: torch.Tensor, requests: list[Request]) -> list[int]:
    """logits (n, vocab), one row per request -> the next token of each."""
    out = [0] * len(requests)
    plain = [i for i, r in enumerate(requests) if _plain_greedy(r.params)]
    if plain:
        for i, token in zip(plain, logits[plain].argmax(-1).tolist(), strict=True):
            out[i] = token
    for i, req in enumerate(requests):
        if not _plain_greedy(req.params):
            penalised = req.params.repetition_penalty != 1.0
            context = torch.tensor(req.tokens, device=logits.device) if penalised else None
            out[i] = sample_next(logits[i], req.params, req.generator, context)
    return out


def _plain_greedy(params: SamplingParams) -> bool:
    return params.greedy and params.repetition_penalty == 1.0
