"""Feeding the training loop: the next optimizer step's micro-batches are drawn while this one computes.

Two feeders with one interface (`next_step()`, `state_dict()`, `close()`):

- `Prefetcher`: one background thread over this rank's packer. Enough on a CPU, where the model is
  the bottleneck.
- `WorkerPool` (`--data-workers N`): N processes, each with its own packer over a disjoint slice of the
  documents (virtual rank `rank * N + w` of `world * N`). Step s comes whole from worker s mod N, so the
  stream is fixed by N and the seed, whatever the timing. A GPU trains a small model faster than one
  thread tokenizes and packs; the processes keep it fed. Resumable: the state is every worker's packer
  state after the last step it handed out, plus which worker is next.
"""

from __future__ import annotations

import multiprocessing
import queue
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from codellm.errors import UserError
from codellm.train.batches import Packer, make_batches
from codellm.train.config import TrainConfig

Micro = list[tuple[torch.Tensor, torch.Tensor]]  # (tokens, weights) per micro-batch of one step
AHEAD = 2  # steps each worker prepares before it waits


class Prefetcher:
    """Draws the next optimizer step's micro-batches in a background thread while this step computes.

    Tokenizing runs outside the GIL, so on a machine with a spare core data costs no step time. The
    resumable position is the one after the step handed out last, not after the one being prepared.
    """

    def __init__(self, packer: Packer, rows: int, accum: int, pin: bool):
        self.packer, self.rows, self.accum, self.pin = packer, rows, accum, pin
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="batches")
        self.state = packer.state_dict()
        self.pending = self.pool.submit(self._draw)

    def _draw(self) -> tuple[Micro, dict]:
        micro = [self.packer.next_batch(self.rows) for _ in range(self.accum)]
        if self.pin:
            micro = [(t.pin_memory(), w.pin_memory()) for t, w in micro]
        return micro, self.packer.state_dict()

    def next_step(self) -> Micro:
        micro, self.state = self.pending.result()
        self.pending = self.pool.submit(self._draw)
        return micro

    def state_dict(self) -> dict:
        return self.state

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


def _worker(cfg: TrainConfig, tokenizer_dir: str, seq_len: int, vrank: int, vworld: int, rows: int, accum: int,
            state: dict | None, out: multiprocessing.Queue) -> None:
    """One data process: packs steps into `out` (numpy arrays + the packer state after each step)."""
    from codellm.tokenizer import load_tokenizer

    try:
        packer = make_batches(cfg, load_tokenizer(tokenizer_dir), seq_len, "train", vrank, vworld)
        if state is not None:
            packer.load_state_dict(state)
        while True:
            micro = [packer.next_batch(rows) for _ in range(accum)]
            out.put(([(t.numpy().astype(np.int32), w.numpy()) for t, w in micro], packer.state_dict()))
    except KeyboardInterrupt:
        return
    except Exception as e:  # noqa: BLE001 - handed to the parent, which raises it as the cause
        out.put(e)


class WorkerPool:
    """`workers` data processes, step s from worker s mod `workers` (see the module docstring)."""

    def __init__(self, cfg: TrainConfig, tokenizer_dir: str, seq_len: int, rank: int, world: int, rows: int,
                 accum: int, workers: int, pin: bool, state: dict | None = None):
        if state is not None and len(state["workers"]) != workers:
            raise UserError(f"the checkpoint was written with --data-workers {len(state['workers'])}; resume "
                            f"with the same number (now {workers}) so the data stream continues exactly")
        self.pin, self.next = pin, state["next"] if state else 0
        self.states = list(state["workers"]) if state else [None] * workers
        ctx = multiprocessing.get_context("spawn")  # fork is unsafe once CUDA is up
        self.queues = [ctx.Queue(maxsize=AHEAD) for _ in range(workers)]
        self.procs = [ctx.Process(target=_worker, daemon=True, name=f"data-{w}",
                                  args=(cfg, tokenizer_dir, seq_len, rank * workers + w, world * workers, rows,
                                        accum, self.states[w], self.queues[w]))
                      for w in range(workers)]
        for p in self.procs:
            p.start()

    def next_step(self) -> Micro:
        w = self.next
        while True:
            try:
                got = self.queues[w].get(timeout=5)
                break
            except queue.Empty:
                if not self.procs[w].is_alive():
                    raise RuntimeError(f"data worker {w} died (exit code {self.procs[w].exitcode})") from None
        if isinstance(got, Exception):
            raise got
        arrays, self.states[w] = got
        self.next = (w + 1) % len(self.procs)
        micro = [(torch.from_numpy(t).long(), torch.from_numpy(wt)) for t, wt in arrays]
        return [(t.pin_memory(), wt.pin_memory()) for t, wt in micro] if self.pin else micro

    def state_dict(self) -> dict:
        return {"workers": list(self.states), "next": self.next}

    def close(self) -> None:
        for p in self.procs:
            p.kill()
        for p in self.procs:
            p.join()
