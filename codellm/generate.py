"""The reference generator: one prompt, a KV cache, and the sampling rules of Llama / HF.

It is deliberately simple, and it is the oracle the batched engine is tested against. Text handling
(incremental UTF-8-safe decoding, stop strings matched on decoded text with hold-back) lives here too,
in small pieces the engine and server reuse.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from codellm import formats
from codellm.errors import UserError
from codellm.model import KVCache, Transformer


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0 means greedy
    top_p: float = 1.0  # nucleus: keep the smallest set of tokens whose probability reaches top_p
    top_k: int = 0  # 0 means no top-k cut
    repetition_penalty: float = 1.0  # CTRL/HF rule over prompt and generated tokens; 1 is off
    seed: int | None = None
    stop: tuple[str, ...] = ()  # stop strings, matched on decoded text, not included in the output
    stop_ids: tuple[int, ...] = ()  # extra stop token ids (EOS and EOT always stop)
    # engine only: put each sampled token's log-probability on its event, and the `logprobs` likeliest
    # alternatives (0: none); None: compute nothing. Raw model distribution: before penalty and temperature.
    logprobs: int | None = None
    # token healing: back off the prompt's last token when longer tokens start with its text (a prompt that
    # ends in "\n" before a tokenizer's "\n    " tokens), and let the first new token start with that text
    heal: bool = False

    def __post_init__(self):
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_ids", tuple(self.stop_ids))
        problems = []
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            problems.append(f"max_new_tokens must be an integer >= 1 (got {self.max_new_tokens!r})")
        if not self.temperature >= 0:
            problems.append(f"temperature must be >= 0 (got {self.temperature!r})")
        if not 0 < self.top_p <= 1:
            problems.append(f"top_p must be in (0, 1] (got {self.top_p!r})")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            problems.append(f"top_k must be an integer >= 0 (got {self.top_k!r})")
        if not self.repetition_penalty > 0:
            problems.append(f"repetition_penalty must be > 0 (got {self.repetition_penalty!r})")
        if any(not isinstance(s, str) or not s for s in self.stop):
            problems.append("stop strings must be non-empty strings")
        if self.logprobs is not None and (not isinstance(self.logprobs, int) or not 0 <= self.logprobs <= 20):
            problems.append(f"logprobs must be an integer in [0, 20] or None (got {self.logprobs!r})")
        if problems:
            raise UserError("; ".join(problems))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def sample_next(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None,
                context: torch.Tensor | None = None) -> int:
    """Pick the next token from one row of logits (vocab,), a pure function of its inputs."""
    logits = logits.float()
    if params.repetition_penalty != 1.0 and context is not None and context.numel():
        seen = logits[context]
        logits = logits.scatter(0, context, torch.where(seen > 0, seen / params.repetition_penalty,
                                                        seen * params.repetition_penalty))
    if params.greedy:
        return int(logits.argmax())
    logits = logits / params.temperature
    if params.top_k:
        kth = torch.topk(logits, min(params.top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if params.top_p < 1.0:
        # Llama's rule: drop a token when the mass strictly before it already reaches top_p
        sorted_probs, order = probs.sort(descending=True)
        drop = sorted_probs.cumsum(0) - sorted_probs > params.top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(0, order, sorted_probs)
    return int(torch.multinomial(probs / probs.sum(), 1, generator=generator))


def make_generator(seed: int | None, device="cpu") -> torch.Generator:
    gen = torch.Generator(device=device)
    if seed is None:
        gen.seed()
    else:
        gen.manual_seed(seed)
    return gen


@dataclass(frozen=True)
class Healing:
    """A healed prompt's backed-off text, and the tokens the first new token may be (their text starts
    with it); the text is already in the caller's prompt, so it is not output again."""

    text: str
    allowed: tuple[int, ...]


_token_texts: dict[int, list[str]] = {}  # id(tokenizer) -> text of every token as a continuation


def heal_prompt(tok, ids: list[int]) -> tuple[list[int], Healing | None]:
    """Token healing (Lundberg 2023, guidance): a prompt that ends inside what the tokenizer would merge
    with the next text (e.g. "\n" where training text has "\n   " + " return") ends on a token the model
    rarely saw followed by code. Back off that token and constrain the first new one to start with its
    text, so the model picks the merged token itself. Prompts whose last token no longer token extends
    are left as they are."""
    if len(ids) < 2 or tok.is_special(ids[-1]):
        return ids, None
    texts = _token_texts.get(id(tok))
    if texts is None:
        texts = _token_texts[id(tok)] = [tok.decode_continuation([i]) for i in range(tok.vocab_size)]
    tail = texts[ids[-1]]
    if not tail or "\ufffd" in tail:  # a piece of a multi-byte character: no text to match
        return ids, None
    allowed = tuple(i for i, t in enumerate(texts) if t.startswith(tail) and not tok.is_special(i))
    return (ids[:-1], Healing(tail, allowed)) if len(allowed) > 1 else (ids, None)


def restrict(logits: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """logits (vocab,) with every token outside `allowed` (ids) at -inf."""
    return torch.full_like(logits, float("-inf")).index_copy_(0, allowed, logits[allowed])


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
        token = sample_next(logits, params, generator, context)
        yield token
        if token in stop_ids:
            return
        tokens = torch.tensor([[token]], device=device)
        positions = positions[:, -1:] + 1
        if params.repetition_penalty != 1.0:
            context = torch.cat([context, tokens[0]])


def check_prompt_fits(prompt_len: int, max_seq_len: int):
    if prompt_len >= max_seq_len:
        raise UserError(f"prompt is {prompt_len} tokens but the model's context is {max_seq_len} tokens "
                        "(it must leave room for at least one new token)")


@dataclass
class Event:
    """One step of a text stream: the new token, the text it completed (may be empty), and how it ended."""

    token_id: int | None
    text: str
    finished: bool = False
    reason: str | None = None  # "length" | "eos" | "eot" | "stop" (a stop id or string)
    stop: str | None = None  # the stop string that matched
    logprob: float | None = None  # of token_id, when SamplingParams.logprobs is set (engine only)
    top_logprobs: list[tuple[int, float]] | None = None  # (id, logprob) of the likeliest tokens, best first


@dataclass
class StopMatcher:
    """Finds stop strings in streamed text and holds back a tail that could still become one."""

    stops: tuple[str, ...]
    text: str = ""
    emitted: int = 0
    matched: str | None = field(default=None, init=False)

    def push(self, delta: str) -> str:
        """Add decoded text; return what may be shown now (never part of a stop string)."""
        start = self.emitted  # held-back text starts here; everything before it was cleared
        self.text += delta
        hits = [(i, s) for s in self.stops if (i := self.text.find(s, start)) >= 0]
        if hits:
            cut, self.matched = min(hits)
            return self._emit(cut)
        return self._emit(len(self.text) - self._pending_prefix())

    def flush(self) -> str:
        return "" if self.matched is not None else self._emit(len(self.text))

    def _pending_prefix(self) -> int:
        """Length of the longest tail of the text that is a proper prefix of some stop string."""
        best = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(self.text) - self.emitted), best, -1):
                if self.text.endswith(s[:n]):
                    best = n
                    break
        return best

    def _emit(self, end: int) -> str:
        out, self.emitted = self.text[self.emitted:end], max(self.emitted, end)
        return out


class TextStream:
    """The text side of one generation, pushed one token at a time: ids in, `Event`s out.

    EOS and EOT always end the stream, as do `params.stop_ids` and `params.stop` strings. Shared by
    `stream_text` (pull) and the engine (push, one request among many).
    """

    def __init__(self, tok, params: SamplingParams, healed: str = ""):
        self.ends = {tok.eos_id: "eos"} | ({tok.eot_id: "eot"} if tok.eot_id is not None else {})
        self.stop_ids = set(self.ends) | set(params.stop_ids)
        self.decoder, self.matcher = tok.stream_decoder(), StopMatcher(params.stop)
        self.healed = healed  # the text of a healed prompt's backed-off token: in the prompt, not output

    def _decoded(self, text: str) -> str:
        if self.healed:
            n = len(os.path.commonprefix([text, self.healed]))
            text, self.healed = text[n:], self.healed[n:]
        return text

    def push(self, token: int) -> Event:
        if token in self.stop_ids:
            return self.finish(self.ends.get(token, "stop"), token)
        text = self.matcher.push(self._decoded(self.decoder.push(token)))
        if self.matcher.matched is not None:
            return Event(token, text, True, "stop", self.matcher.matched)
        return Event(token, text)

    def finish(self, reason: str, token: int | None = None) -> Event:
        """Last event: whatever text the decoder and the matcher still hold (a stop string may end it)."""
        text = self.matcher.push(self._decoded(self.decoder.flush()))
        if self.matcher.matched is not None:
            return Event(token, text, True, "stop", self.matcher.matched)
        return Event(token, text + self.matcher.flush(), True, reason)


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


def collect(events: Iterator[Event]) -> str:
    return "".join(e.text for e in events)


def complete(model, tok, prompt: str, params: SamplingParams) -> Iterator[Event]:
    return stream_text(model, tok, tok.encode(prompt, bos=True), params)


def infill(model, tok, prefix: str, suffix: str, params: SamplingParams, order: str = "psm") -> Iterator[Event]:
    """Stream only the middle: the model's text between <MID> and <EOT>."""
    return stream_text(model, tok, formats.infill_prompt(tok, prefix, suffix, order), params)


def chat(model, tok, messages: list[dict], params: SamplingParams) -> Iterator[Event]:
    ids, _ = formats.chat_tokens(tok, messages)
    return stream_text(model, tok, ids, params)
