"""How a step's batch is executed: the model runner between the scheduler (what to run) and the model
(the math), in the spirit of vLLM's scheduler / model-runner split.

`ModelRunner` owns the KV layout (a `SlotKVCache`: one slot of positions per running request) and the
choice of decode path: the model's own forward through a slot view (eager; SDPA), or with `compile=True`
the native C++ step on a CPU (`native.py`) and `decode.decode_step` under torch.compile elsewhere. The
engine hands it decode rows and prompt chunks and gets logits back; it never runs a forward itself. An
encoder-decoder runner (cross-attention keys kept per request) would sit beside this one with the same
two calls.
"""

from __future__ import annotations

import torch

from codellm.engine.decode import fast_decode_step
from codellm.engine.kv_cache import SlotKVCache
from codellm.engine.scheduler import Request
from codellm.model import Transformer


class ModelRunner:
    def __init__(self, model, max_batch: int, max_len: int | None = None, kv_memory: int | None = None,
                 compile: bool = False):
        """max_len: tokens per slot (default and cap: the model's context); kv_memory: bytes for the KV
        cache, as many slots as fit (default: max_batch slots); compile: see the module docstring."""
        cfg, weight = model.cfg, next(model.parameters())
        max_len = min(max_len or cfg.max_seq_len, cfg.max_seq_len)
        if kv_memory is None:
            self.cache = SlotKVCache(cfg, max_batch, max_len, weight.dtype, weight.device)
        else:
            self.cache = SlotKVCache.from_budget(cfg, kv_memory, max_len, weight.dtype, weight.device)
        if hasattr(model, "fuse_projections"):  # wrappers around a model (tests, adapters) run as they are
            model.fuse_projections()
        if compile and not isinstance(model, Transformer):
            raise TypeError(f"compile=True needs a codellm Transformer (got {type(model).__name__})")
        self.decode_step = fast_decode_step(model, self.cache) if compile else None
        self.model, self.device = model, weight.device

    @property
    def path(self) -> str:
        """Which decode path runs: "native", "compiled" or "eager"."""
        if self.decode_step is None:
            return "eager"
        return "native" if type(self.decode_step).__name__ == "NativeDecodeStep" else "compiled"

    def decode(self, reqs: list[Request]) -> torch.Tensor:
        """One token for each decoding request (reqs[i] sits in row i) -> logits (n, vocab)."""
        if self.decode_step is not None:
            logits = self.decode_step([r.tokens[-1] for r in reqs], [r.n_computed for r in reqs])
        else:
            tokens = torch.tensor([[r.tokens[-1]] for r in reqs], device=self.device)  # (n, 1)
            positions = torch.tensor([[r.n_computed] for r in reqs], device=self.device)  # (n, 1)
            logits = self.model(tokens, positions, self.cache.view(0, len(reqs)), last_only=True)[:, -1]
        for r in reqs:
            r.n_computed += 1
        return logits

    def prefill(self, req: Request, n: int) -> torch.Tensor:
        """The next n prompt tokens of one request -> logits of the last one (1, vocab)."""
        start = req.n_computed
        if self.decode_step is not None and self.decode_step.prefills:  # the native step, where it is faster
            logits = self.decode_step(req.tokens[start:start + n], range(start, start + n), [req.slot] * n, [n - 1])
            req.n_computed += n
            return logits
        tokens = torch.tensor([req.tokens[start:start + n]], device=self.device)  # (1, n)
        positions = torch.arange(start, start + n, device=self.device)[None]  # (1, n)
        view = self.cache.view(req.slot, req.slot + 1)
        logits = self.model(tokens, positions, view, last_only=True)[:, -1]
        req.n_computed += n
        return logits
