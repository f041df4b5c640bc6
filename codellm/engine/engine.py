"""The inference engine: many requests over one model at once, advanced one step at a time.

    engine = Engine(model, tok, max_batch=16, kv_memory=1 << 30)
    rid = engine.submit(tok.encode("def f(", bos=True), SamplingParams(max_new_tokens=64))
    for event in engine.run():  # steps until every request has finished
        print(event.request_id, event.token_id, repr(event.text), event.finished, event.reason)
    engine.generate(["def f(", "import os"], SamplingParams(max_new_tokens=64))  # -> [Completion, ...]

A step runs the scheduler's plan through the model runner (`model_runner.py`, which owns the slot KV
cache and the decode path): one batched forward that decodes a token for every decoding request (rows at
different positions, a slice of the slot cache), then one forward per prompt chunk; samples
each row with its own parameters and generator (`sampler.sample_rows`); and turns tokens into events
through each request's `streaming.TextStream` (UTF-8-safe text, stop ids and strings, EOS, EOT for
infilling). A request that finishes or is cancelled frees its slot within the step.

An event is a `streaming.Event` plus `request_id`; a request's last event has `finished=True` and a
`reason`: "eos" | "eot" | "stop" | "length" | "cancelled". Hitting `max_new_tokens` (or the end of the
model's context) yields the last token's event, then a final one with no token, as `stream_text` does.
With `SamplingParams.logprobs` set, a token's event also carries its logprob and the top alternatives.

Threads: `submit` and `cancel` may be called from any thread: they only append to an inbox that the
next step drains. Everything else belongs to the one thread that steps the engine; `runner.EngineRunner`
is that thread for a server. Without a tokenizer the engine runs on ids alone (benchmarks): no text,
EOS from the model config.

Measured decisions (2-core CPUs without BF16/AMX units):
- prompt chunks run as their own forwards instead of being packed with the decode rows into one flat
  batch: a chunk is compute-bound, so its extra read of the weights costs a few per cent of it, and
  packing would need a variable-length attention seam in the model;
- an eager decode step costs what the reference generator's loop costs, most of it per-op overhead
  (~100 ops, each a dispatch and a thread fork-join) around MKL's fp32 GEMV, which runs on one thread;
  `Engine(compile=True)` decodes through `native.NativeDecodeStep` on a CPU: the whole step as one C++
  call, built at first use (~4 s, cached). Batch-1 decode of models/default (2 threads, AMD EPYC AVX2):
  eager ~130 tok/s, torch.compile'd `decode.decode_step` ~195, native ~630-700 fp32 and ~840-1,100 bf16
  (bench/engine.py has the table). Off the CPU, compile=True runs `decode_step` under torch.compile;
- bf16 weights pay on the native path only (it widens them in registers: half the bytes of fp32 for
  the same work); through PyTorch a bf16 GEMM ran at a fraction of fp32's speed on AVX2 CPUs without
  BF16 units, so the eager engine is fastest in fp32 there, and with compile=True such CPUs prefill bf16
  prompt chunks through the native step too (`NativeDecodeStep.prefills`; 1.6-3.3x PyTorch's bf16
  prefill here, slower than MKL in fp32, so fp32 prompts stay on PyTorch). The engine runs in the
  model's dtype.
"""

from __future__ import annotations

import itertools
import threading
from collections import deque
from collections.abc import Hashable, Iterator, Sequence
from dataclasses import dataclass

import torch

from codellm.engine.model_runner import ModelRunner
from codellm.engine.sampler import sample_rows, token_logprobs
from codellm.engine.scheduler import Request, Scheduler
from codellm.errors import UserError
from codellm.model import Transformer
from codellm.sampling import SamplingParams, check_prompt_fits, heal_prompt, make_generator
from codellm.streaming import Event, TextStream


@dataclass(kw_only=True)
class EngineEvent(Event):
    request_id: Hashable


@dataclass
class Completion:
    """A finished request, for callers that do not stream: generated ids (a stop id included) and text."""

    token_ids: list[int]
    text: str
    reason: str
    stop: str | None = None


class Engine:
    def __init__(self, model: Transformer, tokenizer=None, *, max_batch: int = 16, max_len: int | None = None,
                 kv_memory: int | None = None, token_budget: int = 512, compile: bool = False):
        """max_len: tokens per slot (default and cap: the model's context); kv_memory: bytes for the KV
        cache, as many slots as fit (default: max_batch slots); token_budget: tokens per step, decodes
        first, prompt chunks in the rest; compile: decode with the native step on a CPU (built at first
        use, seconds; `native.py`), or through `torch.compile` elsewhere (`decode.py`)."""
        self.model_runner = ModelRunner(model, max_batch, max_len, kv_memory, compile)
        self.model, self.cache, self.device = model, self.model_runner.cache, self.model_runner.device
        cfg = model.cfg
        self.tok = tokenizer if tokenizer is not None else _IdsOnly(cfg.eos_id)
        self.scheduler = Scheduler(self.cache, max_batch, token_budget)
        self.requests: dict[Hashable, Request] = {}  # live requests, owned by the stepping thread
        self._inbox: deque[tuple[str, object]] = deque()  # appends and pops are atomic: any thread submits
        self._wake = threading.Event()
        self._ids = itertools.count()

    # --- any thread ---------------------------------------------------------------------------------

    def submit(self, prompt: list[int] | str, params: SamplingParams) -> int:
        """Queue a request (a str is encoded with BOS); errors a caller can fix raise here, at once."""
        ids, healing = self._encode(prompt), None
        if params.heal and not isinstance(self.tok, _IdsOnly):
            ids, healing = heal_prompt(self.tok, ids)
        limit = self._check(ids, params)
        req = Request(next(self._ids), list(ids), len(ids), params, limit,
                      TextStream(self.tok, params, healing.text if healing else ""),
                      make_generator(params.seed, self.device),
                      torch.tensor(healing.allowed, device=self.device) if healing else None)
        self._inbox.append(("submit", req))
        self.wake()
        return req.id

    def cancel(self, request_id: Hashable) -> None:
        """End a request at the next step (reason "cancelled"), freeing its slot; unknown ids are ignored."""
        self._inbox.append(("cancel", request_id))
        self.wake()

    def wait_for_work(self, timeout: float | None = None) -> None:
        """Block until something was submitted or cancelled since the last wait (or `wake` is called)."""
        self._wake.wait(timeout)
        self._wake.clear()

    def wake(self) -> None:
        self._wake.set()

    @property
    def has_work(self) -> bool:
        return bool(self._inbox) or self.scheduler.has_work

    # --- the stepping thread ------------------------------------------------------------------------

    @torch.inference_mode()
    def step(self) -> list[EngineEvent]:
        events = self._drain_inbox()
        chunks = self.scheduler.schedule()
        batch, logits = list(self.scheduler.decoding), []
        if batch:
            logits.append(self.model_runner.decode(batch))
        for req, n in chunks:
            last = self.model_runner.prefill(req, n)
            if req.n_computed == req.n_prompt:  # prompt done: its last logits pick the first token
                batch.append(req)
                logits.append(last)
        if batch:
            rows = logits[0] if len(logits) == 1 else torch.cat(logits)  # a cat copies: 2% of a 16-row step
            tokens = sample_rows(rows, batch)
            for req, token, lp in zip(batch, tokens, token_logprobs(rows, batch, tokens), strict=True):
                events += self._advance(req, token, lp)
        return events

    def run(self) -> Iterator[EngineEvent]:
        """Step until no request is left, yielding every event."""
        while self.has_work:
            yield from self.step()

    def stream(self, prompt: list[int] | str, params: SamplingParams) -> Iterator[EngineEvent]:
        """One request's events, stepping the engine here (CLI); closing the iterator cancels it."""
        self._require_idle()
        rid, finished = self.submit(prompt, params), False
        try:
            while not finished:
                for event in self.step():
                    finished = event.finished
                    yield event
        finally:
            if not finished:
                self.cancel(rid)
                self._drain_inbox()  # apply it now: the slot is free and the engine idle again

    def generate(self, prompts: Sequence[list[int] | str],
                 params: SamplingParams | Sequence[SamplingParams]) -> list[Completion]:
        """Run prompts to completion together (one params for all, or one each); results in prompt order."""
        each = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
        self._require_idle()
        ids = [self.submit(p, q) for p, q in zip(prompts, each, strict=True)]
        done = {rid: Completion([], "", "") for rid in ids}
        for event in self.run():
            c = done[event.request_id]
            c.text += event.text
            if event.token_id is not None:
                c.token_ids.append(event.token_id)
            if event.finished:
                c.reason, c.stop = event.reason, event.stop
        return [done[rid] for rid in ids]

    def _require_idle(self):
        if self.has_work:
            raise RuntimeError("stream() and generate() step the engine themselves and need it idle; "
                               "share a busy engine through EngineRunner")

    def _drain_inbox(self) -> list[EngineEvent]:
        events = []
        while self._inbox:
            kind, item = self._inbox.popleft()
            if kind == "submit":
                self.requests[item.id] = item
                self.scheduler.add(item)
            elif (req := self.requests.get(item)) is not None:
                self._retire(req)
                events.append(_tag(req, req.text.finish("cancelled")))
        return events

    def _advance(self, req: Request, token: int, logprobs=None) -> list[EngineEvent]:
        req.tokens.append(token)
        out = [req.text.push(token)]
        if logprobs is not None:
            out[0].logprob, out[0].top_logprobs = logprobs
        if not out[-1].finished and len(req.tokens) >= req.limit:
            out.append(req.text.finish("length"))
        if out[-1].finished:
            self._retire(req)
        elif len(req.tokens) == req.n_prompt + 1:
            self.scheduler.start_decoding(req)
        return [_tag(req, e) for e in out]

    def _retire(self, req: Request) -> None:
        self.scheduler.remove(req)
        del self.requests[req.id]

    def _encode(self, prompt: list[int] | str) -> list[int]:
        if not isinstance(prompt, str):
            return prompt
        if isinstance(self.tok, _IdsOnly):
            raise UserError("this engine has no tokenizer: give prompts as token ids")
        return self.tok.encode(prompt, bos=True)

    def _check(self, ids: list[int], params: SamplingParams) -> int:
        """Validate a request; -> the length at which it ends (prompt + max_new_tokens, within the context)."""
        cfg = self.model.cfg
        if not ids:
            raise UserError("the prompt is empty: give at least one token (e.g. BOS)")
        check_prompt_fits(len(ids), cfg.max_seq_len)
        if min(ids) < 0 or max(ids) >= cfg.vocab_size:
            raise UserError(f"prompt token ids must lie in [0, {cfg.vocab_size}) (got {min(ids)}..{max(ids)})")
        if params.stop and isinstance(self.tok, _IdsOnly):
            raise UserError("stop strings need a tokenizer; this engine runs on token ids (use stop_ids)")
        limit = min(cfg.max_seq_len, len(ids) + params.max_new_tokens)
        if limit > self.cache.max_len:
            raise UserError(f"the request needs {limit} tokens (prompt {len(ids)} + max_new_tokens "
                            f"{params.max_new_tokens}) but a KV cache slot holds {self.cache.max_len}; lower "
                            "max_new_tokens or give the engine a longer max_len")
        return limit


def _tag(req: Request, event: Event) -> EngineEvent:
    return EngineEvent(**vars(event), request_id=req.id)


class _IdsOnly:
    """Stands in for a tokenizer when the engine runs on ids alone: EOS from the config, no text."""

    eot_id = None

    def __init__(self, eos_id: int):
        self.eos_id = eos_id

    def stream_decoder(self):
        return self

    def push(self, token_id: int) -> str:
        return ""

    def flush(self) -> str:
        return ""
