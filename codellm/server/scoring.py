"""Prompt log-probabilities: TGI's `decoder_input_details` (details.prefill) and OpenAI's `echo` with `logprobs`.

One forward over the whole prompt on the serving model, in a worker thread so the event loop keeps going,
one scoring at a time (the engine thread keeps stepping meanwhile; the weights are only read). The values
are the model's own distribution, as the engine reports for generated tokens (no penalty or temperature).
"""

from __future__ import annotations

import asyncio
import threading

import torch

from codellm.server.service import Service

_one_at_a_time = threading.Lock()

# per prompt token: (log p(token | tokens before it), [(id, logprob)] of the `top` likeliest there); the
# first token has no context: (None, [])
Scored = tuple[float | None, list[tuple[int, float]]]


def score(model, ids: list[int], top: int = 0) -> list[Scored]:
    """log p(ids[i] | ids[:i]) for every i (None for i = 0), with the `top` likeliest tokens at each i."""
    with _one_at_a_time, torch.inference_mode():
        device = next(model.parameters()).device
        tokens = torch.tensor([ids], device=device)
        logp = torch.log_softmax(model(tokens)[0, :-1].float(), dim=-1)  # (n - 1, vocab): position i predicts i + 1
        chosen = logp.gather(1, tokens[0, 1:, None])[:, 0].tolist()
        if top:
            top_lp, top_ids = logp.topk(min(top, logp.shape[-1]))
            tops = [list(zip(i, lp, strict=True)) for i, lp in zip(top_ids.tolist(), top_lp.tolist(), strict=True)]
        else:
            tops = [[] for _ in chosen]
    return [(None, [])] + list(zip(chosen, tops, strict=True))


async def prompt_logprobs(service: Service, ids: list[int], top: int = 0) -> list[Scored]:
    """`score` for a request: admitted like a generation (429 when full), run off the event loop."""
    slot = service.admit()
    try:
        return await asyncio.to_thread(score, service.runner.engine.model, ids, top)
    finally:
        slot.release()
