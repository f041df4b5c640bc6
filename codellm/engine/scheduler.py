"""Who runs in a step, and where its KV lives: a token-budget scheduler in the manner of vLLM.

Every request has `tokens` (prompt, then each sampled id) and `n_computed` (leading tokens whose KV is
in its slot); a step moves `n_computed` towards `len(tokens)`. There are no separate prefill and decode
phases, only a budget of tokens per step:

- every decoding request (one that has sampled) gets 1 token: all of them run as one batched forward;
- what is left of the budget goes to prompts, oldest first, in chunks: a long prompt takes several
  steps and never stalls the running decodes for longer than one chunk costs;
- a waiting request is admitted when a slot is free and fewer than `max_batch` requests run. Admission
  reuses the KV of the longest cached or running prefix (`SlotKVCache.allocate`).

Decoding requests are kept in slot rows [0, n) (`decoding[i].slot == i`): when a request starts
decoding it swaps into row n, when one leaves the last decoding row swaps into its place. A swap moves
one or two requests' KV once; the decode batch is then a slice of the cache, never a gather.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Hashable, Iterator
from dataclasses import dataclass

import torch

from codellm.engine.kv_cache import SlotKVCache
from codellm.errors import UserError
from codellm.sampling import SamplingParams
from codellm.streaming import TextStream


@dataclass(eq=False)
class Request:
    id: Hashable
    tokens: list[int]  # the prompt, then every sampled id
    n_prompt: int
    params: SamplingParams
    limit: int  # generation ends ("length") when len(tokens) reaches this
    text: TextStream
    generator: torch.Generator  # this request's own RNG: its draws do not depend on the batch
    first_allowed: torch.Tensor | None = None  # token healing: the ids the first new token may be
    slot: int = -1
    n_computed: int = 0  # the KV of tokens[:n_computed] is in the slot


class Scheduler:
    def __init__(self, cache: SlotKVCache, max_batch: int, token_budget: int):
        if max_batch < 1 or token_budget < max_batch:
            raise UserError(f"need max_batch >= 1 and a token budget >= max_batch (got max_batch {max_batch}, "
                            f"token budget {token_budget})")
        self.cache, self.max_batch, self.token_budget = cache, min(max_batch, cache.n_slots), token_budget
        self.waiting: deque[Request] = deque()
        self.prefilling: list[Request] = []  # admitted (in a slot), prompt not fully computed yet
        self.decoding: list[Request] = []  # decoding[i].slot == i

    def add(self, req: Request) -> None:
        self.waiting.append(req)

    def schedule(self) -> list[tuple[Request, int]]:
        """Prompt chunks for this step, (request, n tokens), within the budget the decodes leave."""
        chunks, budget = [], self.token_budget - len(self.decoding)
        prompts = self._prompts()
        while budget > 0 and (req := next(prompts, None)) is not None:
            n = min(req.n_prompt - req.n_computed, budget)
            chunks.append((req, n))
            budget -= n
        return chunks

    def _prompts(self) -> Iterator[Request]:
        """Admitted prompts, oldest first; then waiting requests, admitted one at a time (only when asked
        for, so only while budget is left) while there is room."""
        yield from list(self.prefilling)
        while self.waiting and self._room():
            req = self.waiting.popleft()
            self.cache.allocate(req)
            self.prefilling.append(req)
            yield req

    def _room(self) -> bool:
        return len(self.decoding) + len(self.prefilling) < self.max_batch and self.cache.n_free > 0

    def start_decoding(self, req: Request) -> None:
        """The prompt is computed and the first token sampled: join the decode rows."""
        self.prefilling.remove(req)
        self.cache.swap(req.slot, len(self.decoding))
        self.decoding.append(req)

    def remove(self, req: Request) -> None:
        """Finished or cancelled: leave the queues and free the slot at once."""
        if req in self.waiting:
            self.waiting.remove(req)
            return
        if req in self.prefilling:
            self.prefilling.remove(req)
        else:  # the last decoding row takes its place
            last = self.decoding.pop()
            if last is not req:
                row = req.slot
                self.cache.swap(row, last.slot)
                self.decoding[row] = last
        self.cache.release(req.slot)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.prefilling or self.decoding)
