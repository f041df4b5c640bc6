"""The decode step: one new token for each of the rows [0, B) of the slot cache, as one pure function.

`decode_step(model, tokens, positions, k, v, key_pos)` is the model's forward for one token per row,
written so that `torch.compile` can take it whole: no cache object, no Python branches on data, and the
cache only read, never written (a compiled graph that mutates its input cache copied all of it per step).
It attends over the cached keys at positions < each row's own (`key_pos`, a mask, not a slice per row)
and over the row's new key, then returns the logits and the new keys/values, which `DecodeStep` writes
into the slots with one index_put each. Attention is two batched matmuls and a softmax over the cached
scores and the new one; the query heads of a KV group are one matrix (GQA without repeating K/V).

On a CPU, `Engine(compile=True)` runs `native.NativeDecodeStep` instead (the same step as one C++ call,
3x faster than this function compiled at batch 1; see native.py); `fast_decode_step` picks. Elsewhere
(a GPU), `DecodeStep(model, cache, compile=True)` compiles this function with dynamic shapes: the number of
rows and the number of keys are symbols, so a running engine does not recompile as requests come and go. Inductor
still makes one graph for a single row and one for several (size 1 is special to it), each compiled on
first use; `compile_seconds` records what that cost. Greedy tokens equal the eager path's (a test).

Measured (models/default, fp32, 1 thread of a 2-core AVX2 EPYC shared with a training run, so +-15%):
a batch-1 step went from 5.3 ms eager (model.forward through a SlotView) to ~3.5-4 ms, a 16-row step
from ~13 to ~10 ms. What is left is mostly MKL's matmuls (~2.8 ms of a batch-1 step: the weights are
read from DRAM; a 16-row step runs its matmuls at ~27 GFLOP/s), then ~0.25 ms of dynamo guards. Each
graph (one row, several rows) compiles for 20-35 s on first use, so compiling is opt-in.
"""

from __future__ import annotations

import time

import torch

from codellm.engine.kv_cache import SlotKVCache
from codellm.engine.native import NativeDecodeStep, cxx_compiler
from codellm.model import Transformer, apply_rope, rope_cos_sin


def decode_step(model: Transformer, tokens: torch.Tensor, positions: torch.Tensor, k: torch.Tensor,
                v: torch.Tensor, key_pos: torch.Tensor):
    """tokens, positions (B,); k, v: slot-major storage rows (B, layers, kv_heads, max_len, head_dim);
    key_pos: arange(L), L >= every position -> logits (B, vocab), new keys and values (B, layers, kv, hd)."""
    cfg = model.cfg
    B, L, H, KV, hd = tokens.shape[0], key_pos.shape[0], cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    x = model.embed_tokens(tokens)  # (B, dim)
    cos, sin = rope_cos_sin(cfg, positions[:, None], x.dtype)
    cos, sin = cos[:, 0], sin[:, 0]  # (B, 1, hd): broadcast over the heads
    hidden = (key_pos >= positions[:, None])[:, None, None, :]  # (B, 1, 1, L): not yet (or never) written
    scale = hd ** -0.5
    new_k, new_v = [], []
    for i, block in enumerate(model.layers):
        attn = block.self_attn
        qkv = attn.qkv(block.input_layernorm(x)).view(B, H + 2 * KV, hd)
        qk = apply_rope(qkv[:, :H + KV], cos, sin)
        q, kn, vn = qk[:, :H].unflatten(1, (KV, H // KV)), qk[:, H:], qkv[:, H + KV:]  # q (B, KV, G, hd)
        # one bmm per KV head over the storage as it lies (a strided batch): a 4-d matmul would copy
        # the cached keys/values of every row into one batch first
        kc, vc = k[:, i, :, :L], v[:, i, :, :L]  # (B, KV, L, hd)
        scores = torch.stack([torch.bmm(q[:, j], kc[:, j].transpose(1, 2)) for j in range(KV)], 1)
        scores = scores.float().masked_fill(hidden, float("-inf"))  # (B, KV, G, L)
        own = (q * kn[:, :, None]).float().sum(-1, keepdim=True)  # (B, KV, G, 1): the new key
        p = torch.softmax(torch.cat([scores, own], -1) * scale, dim=-1).to(x.dtype)  # (B, KV, G, L + 1)
        out = torch.stack([torch.bmm(p[:, j, :, :L], vc[:, j]) for j in range(KV)], 1)
        out = out + p[..., L:] * vn[:, :, None]  # (B, KV, G, hd)
        x = x + attn.o_proj(out.flatten(1))
        x = x + block.mlp(block.post_attention_layernorm(x))
        new_k.append(kn)
        new_v.append(vn)
    return _head(model.lm_head, model.norm(x)), torch.stack(new_k, 1), torch.stack(new_v, 1)


def _head(head: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    if isinstance(head, torch.nn.Linear):
        # a dense head as W @ x^T: MKL's skinny GEMM for 2-8 rows ran 2-3x faster in this orientation
        # (8192 x 256 head, 1 thread, AVX2 EPYC), the same at 1 and 16 rows
        return torch.mm(head.weight, x.t()).t()
    return head(x)


_compiled = None


def compiled_decode_step():
    """One compiled `decode_step` per process, shared by every engine (graphs are cached per model,
    dtype and one/several rows; the limit is raised from dynamo's 8 for a process serving several)."""
    global _compiled
    if _compiled is None:
        cxx_compiler()  # inductor's C++ wrapper (and its CPU kernels) are built with it
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 32)
        # cpp_wrapper: the graph's kernel calls run from C++, not from a generated Python function
        # (its per-call view and stride checks cost ~0.5 ms of a 4.7 ms batch-1 step; compiling takes ~10 s more)
        _compiled = torch.compile(decode_step, dynamic=True, options={"cpp_wrapper": True})
    return _compiled


def fast_decode_step(model: Transformer, cache: SlotKVCache):
    """What `Engine(compile=True)` decodes with: the native step on a CPU, this function compiled elsewhere."""
    if cache.store_k.device.type == "cpu":
        return NativeDecodeStep(model, cache)
    return DecodeStep(model, cache, compile=True)


class DecodeStep:
    """Runs `decode_step` over the first B slot rows and stores the new keys/values; eager or compiled."""

    prefills = False  # prompt chunks go through model.forward (NativeDecodeStep may take them)

    def __init__(self, model: Transformer, cache: SlotKVCache, compile: bool = False):
        model.fuse_projections()
        self.model, self.cache, self.compiled = model, cache, compile
        self.fn = compiled_decode_step() if compile else decode_step
        self.compile_seconds = 0.0  # first calls with one row and with several (a compile, or a lookup)
        self._seen: set[bool] = set()
        device = cache.store_k.device
        self._key_pos = torch.arange(cache.max_len, device=device)
        self._rows = torch.arange(cache.n_slots, device=device)

    def __call__(self, tokens: list[int], positions: list[int]) -> torch.Tensor:
        """The token and position of rows 0..B-1 -> logits (B, vocab); writes their KV at the positions."""
        B, device = len(tokens), self._key_pos.device
        tok = torch.tensor(tokens, device=device)
        pos = torch.tensor(positions, device=device)
        # keys up to the furthest row; at least 16 so the key count is never 0 or 1 (sizes a compile
        # specialises on), and below max_len so the slice is never the whole axis (another specialisation)
        n_keys = max(1, min(max(16, max(positions)), self.cache.max_len - 1))
        args = (tok, pos, self.cache.store_k[:B], self.cache.store_v[:B], self._key_pos[:n_keys])
        if self.compiled:
            for t in args:
                if t.shape[0] > 1:
                    torch._dynamo.mark_dynamic(t, 0)
            first = (B > 1) not in self._seen
            t0 = time.perf_counter()
        logits, k, v = self.fn(self.model, *args)
        if self.compiled and first:
            self._seen.add(B > 1)
            self.compile_seconds += time.perf_counter() - t0
        rows = self._rows[:B]
        self.cache.store_k[rows, :, :, pos] = k
        self.cache.store_v[rows, :, :, pos] = v
        return logits
