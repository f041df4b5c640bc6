"""The reference generator: one prompt, a KV cache, and the sampling rules of Llama / HF.

It is deliberately simple, and it is the oracle the batched engine is tested against. Sampling lives in
sampling.py and the text stream in streaming.py; both are shared with the engine and the server.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from codellm import formats
from codellm.model import KVCache, Transformer
from codellm.sampling import SamplingParams, check_prompt_fits, heal_prompt, make_generator, restrict, sample_next
from codellm.streaming import Event, TextStream


@torch.inference_mode()
def generate_tokens(model: Transformer, prompt_ids: list[int], params: SamplingParams,
                    stop_ids: set[int], first_allowed: tuple[int, ...] | None = None) -> Iterator[int]:
    """Yield new token ids until a stop id (yielded too), max_new_tokens or the end of the context;
    `first_allowed` restricts the first one (token healing)."""
    cfg = model.cfg
    check_prompt_fits(len(prompt_ids), cfg.max_seq_len)
    device = next(model.parameters()).device
    total = min(cfg.max_seq_len, len(prompt_ids) + params.max_new_tokens)
    cache = KVCache(cfg, batch=1, max_len=total, dtype=next(model.parameters()).dtype, device=device)
    generator = make_generator(params.seed, device)
    tokens = torch.tensor([prompt_ids], device=device)
    context = tokens[0]
    positions = torch.arange(len(prompt_ids), device=device)[None]
    allowed = torch.tensor(first_allowed, device=device) if first_allowed else None
    for _ in range(total - len(prompt_ids)):
        logits = model(tokens, positions, cache, last_only=True)[0, -1]
        if allowed is not None:
            logits, allowed = restrict(logits, allowed), None
        token = sample_next(logits, params, generator, context, len(prompt_ids))
        yield token
        if token in stop_ids:
            return
        tokens = torch.tensor([[token]], device=device)
        positions = positions[:, -1:] + 1
        if params.penalised:
            context = torch.cat([context, tokens[0]])


def stream_text(model: Transformer, tok, prompt_ids: list[int], params: SamplingParams) -> Iterator[Event]:
    """Generate from `prompt_ids`, yielding text deltas; EOS and EOT end the stream."""
    prompt_ids, healing = heal_prompt(tok, prompt_ids) if params.heal else (prompt_ids, None)
    stream = TextStream(tok, params, healing.text if healing else "")
    allowed = healing.allowed if healing else None
    for token in generate_tokens(model, prompt_ids, params, stream.stop_ids, allowed):
        event = stream.push(token)
        yield event
        if event.finished:
            return
    yield stream.finish("length")


def complete(model, tok, prompt: str, params: SamplingParams) -> Iterator[Event]:
    return stream_text(model, tok, tok.encode(prompt, bos=True), params)


def infill(model, tok, prefix: str, suffix: str, params: SamplingParams, order: str = "psm") -> Iterator[Event]:
    """Stream only the middle: the model's text between <MID> and <EOT>."""
    return stream_text(model, tok, formats.infill_prompt(tok, prefix, suffix, order), params)


def chat(model, tok, messages: list[dict], params: SamplingParams) -> Iterator[Event]:
    ids, _ = formats.chat_tokens(tok, messages)
    return stream_text(model, tok, ids, params)
