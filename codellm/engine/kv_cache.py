"""The KV cache as slots: one pair of tensors, allocated once, that every request's keys and values live in.

Storage is `store_k`, `store_v`: (slots, layers, kv_heads, max_len, head_dim) in the model's dtype, seen
as `k`, `v`: (layers, slots, kv_heads, max_len, head_dim) views (the layout of `model.KVCache`). Slots
come first so that the rows [0, B) the decode step reads are one contiguous block, whatever B
(`decode.DecodeStep` passes them to a graph compiled for any B). The head axis sits before the position
axis because attention wants one contiguous (len, head_dim) plane per head: decode attention over 16
rows x 256 keys (8 kv heads x 64) took 1.09 ms in this layout and 1.61 ms with positions before heads
(1 thread, CPU).

Each slot row records which sequence it holds (`seqs[row]`: an object with `tokens` and `n_computed`; the
KV of `tokens[:n_computed]` is in the row). A freed row keeps its record, so a later request that shares
a prefix with it takes the row over without recomputing (prefix reuse), or copies the prefix out of a
busy row. Free rows are handed out least recently used first, so recent prefixes survive longest.

Rows can be swapped. The scheduler uses that to keep decoding requests in rows [0, n), so a decode step
attends over `view(0, n)`, a slice of the storage: no gather (a gather would read and write every
row's KV once more per layer and step, doubling the KV traffic that dominates decode at many streams).
"""

from __future__ import annotations

from typing import Protocol

import torch

from codellm.config import ModelConfig
from codellm.errors import UserError
from codellm.model import KVCache, cache_mask


class CachedSequence(Protocol):
    tokens: list[int]
    n_computed: int  # the KV of tokens[:n_computed] is in the slot
    slot: int


class SlotView(KVCache):
    """Rows [lo, hi) of the slot storage as the model's cache for one forward.

    `prepare` builds the write indices and the mask once; the model then calls `update` once per layer.
    Each row's positions are consecutive (a prompt chunk or one decode token): one row is written through
    a slice, a plain copy, and several rows through one index_put.
    """

    def __init__(self, cache: SlotKVCache, lo: int, hi: int):
        # no super().__init__(): the storage exists; k, v are (layers, B, kv_heads, max_len, head_dim) views
        self.k, self.v, self.max_len = cache.k[:, lo:hi], cache.v[:, lo:hi], cache.max_len
        self.one_row = hi - lo == 1

    def prepare(self, positions: torch.Tensor) -> torch.Tensor | None:
        self.length = int(positions.max()) + 1
        if self.one_row:
            start = int(positions[0, 0])
            self.span = slice(start, start + positions.shape[1])
        else:
            self.positions = positions
            self.rows = torch.arange(positions.shape[0], device=positions.device)[:, None]  # (B, 1)
        return cache_mask(positions, self.length)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Write k/v (B, kv_heads, T, head_dim); return the keys and values up to the furthest position."""
        for store, new in ((self.k[layer], k), (self.v[layer], v)):
            if self.one_row:
                store[0, :, self.span] = new[0]
            else:
                store[self.rows, :, self.positions] = new.transpose(1, 2)
        return self.k[layer, :, :, :self.length], self.v[layer, :, :, :self.length]


class SlotKVCache:
    def __init__(self, cfg: ModelConfig, n_slots: int, max_len: int, dtype: torch.dtype = torch.float32,
                 device: str | torch.device = "cpu"):
        shape = (n_slots, cfg.n_layers, cfg.n_kv_heads, max_len, cfg.head_dim)
        self.store_k = torch.zeros(shape, dtype=dtype, device=device)
        self.store_v = torch.zeros(shape, dtype=dtype, device=device)
        self.k, self.v = self.store_k.transpose(0, 1), self.store_v.transpose(0, 1)  # (layers, slots, ...)
        self.max_len = max_len
        self.seqs: list[CachedSequence | None] = [None] * n_slots
        self.busy = [False] * n_slots
        self.last_used = [0] * n_slots  # release tick, for least-recently-used reuse
        self._tick = 0

    @classmethod
    def from_budget(cls, cfg: ModelConfig, budget_bytes: int, max_len: int, dtype: torch.dtype,
                    device: str | torch.device = "cpu") -> SlotKVCache:
        """As many slots of `max_len` tokens as `budget_bytes` holds; an error if not even one."""
        per_slot = slot_bytes(cfg, max_len, dtype)
        if budget_bytes < per_slot:
            raise UserError(f"KV cache memory of {budget_bytes / 2**20:.1f} MiB cannot hold one slot of "
                            f"{max_len} tokens ({per_slot / 2**20:.1f} MiB in {str(dtype).removeprefix('torch.')}); "
                            "raise the KV memory or lower the slot length")
        return cls(cfg, budget_bytes // per_slot, max_len, dtype, device)

    @property
    def n_slots(self) -> int:
        return len(self.seqs)

    @property
    def n_free(self) -> int:
        return self.busy.count(False)

    def view(self, lo: int, hi: int) -> SlotView:
        return SlotView(self, lo, hi)

    def allocate(self, seq: CachedSequence) -> None:
        """Give `seq` a free row, sets `seq.slot`, and `seq.n_computed` to the prefix whose KV is already
        there. At least the last token is left to compute: its logits pick the first new token."""
        free = [row for row, busy in enumerate(self.busy) if not busy]
        if not free:
            raise RuntimeError("no free KV slot (the scheduler admits only while n_free > 0)")
        source, n = self._longest_prefix(seq.tokens, len(seq.tokens) - 1)
        if n and not self.busy[source]:
            row = source  # take the cached row over: its prefix is already in place
        else:
            row = min(free, key=self.last_used.__getitem__)
            if n:
                self.k[:, row, :, :n] = self.k[:, source, :, :n]
                self.v[:, row, :, :n] = self.v[:, source, :, :n]
        self.seqs[row], self.busy[row] = seq, True
        seq.slot, seq.n_computed = row, n

    def release(self, row: int) -> None:
        """Free a row at once; its record stays for prefix reuse until the row is handed out again."""
        self._tick += 1
        self.busy[row], self.last_used[row] = False, self._tick

    def swap(self, a: int, b: int) -> None:
        """Exchange two rows: their KV (up to the longer sequence) and their records."""
        if a == b:
            return
        n = max(self._length(a), self._length(b))
        if n:
            for t in (self.k, self.v):
                t[:, [a, b], :, :n] = t[:, [b, a], :, :n]  # the right side is a copy (advanced indexing)
        for table in (self.seqs, self.busy, self.last_used):
            table[a], table[b] = table[b], table[a]
        for row in (a, b):
            if self.seqs[row] is not None:
                self.seqs[row].slot = row

    def _length(self, row: int) -> int:
        seq = self.seqs[row]
        return 0 if seq is None else seq.n_computed

    def _longest_prefix(self, tokens: list[int], limit: int) -> tuple[int, int]:
        """(row, n): the row whose computed tokens share the longest prefix with `tokens`, capped at
        `limit`; ties go to a free row (no copy needed)."""
        best, best_key = -1, (0, False)
        for row, seq in enumerate(self.seqs):
            if seq is None or not seq.n_computed or seq.tokens[0] != tokens[0]:
                continue
            n = common_prefix(seq.tokens, tokens, min(seq.n_computed, limit))
            if n and (n, not self.busy[row]) > best_key:
                best, best_key = row, (n, not self.busy[row])
        return best, best_key[0]


def common_prefix(a: list[int], b: list[int], limit: int) -> int:
    """Length of the common prefix of a and b, at most `limit`: a binary search over slice equality, so
    the comparisons run in C (few-shot prompts share thousands of tokens)."""
    lo, hi = 0, min(len(a), len(b), limit)
    if a[:hi] == b[:hi]:
        return hi
    while hi - lo > 1:  # a[:lo] == b[:lo] and a[:hi] != b[:hi]
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if a[:mid] == b[:mid] else (lo, mid)
    return lo


def slot_bytes(cfg: ModelConfig, max_len: int, dtype: torch.dtype) -> int:
    return cfg.kv_bytes_per_token(dtype.itemsize) * max_len
