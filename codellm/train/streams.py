"""Reading training records: endless, rank-sliced, resumable walks over JSONL files.

A stream's position is (epoch, index into the epoch's permutation), so resuming is a seek, and every
RNG a data source owns is saved with it (`rng_state`), so a resumed stream repeats exactly.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

import numpy as np

from codellm.errors import UserError


def rng_state(rng: random.Random) -> list:
    version, internal, gauss = rng.getstate()
    return [version, list(internal), gauss]


def set_rng_state(rng: random.Random, state: list) -> None:
    rng.setstate((state[0], tuple(state[1]), state[2]))


def corpus_files(corpus: str | Path, split: str) -> list[Path]:
    """The JSONL document shards of one split of a `codellm data build` corpus, in manifest order."""
    from codellm.data.build import FORMAT
    from codellm.data.shards import load_manifest

    manifest = load_manifest(Path(corpus), FORMAT, "--corpus")
    if split not in manifest["splits"]:
        raise UserError(f"--corpus {corpus}: no split {split!r} (has {', '.join(manifest['splits'])})")
    return [Path(corpus) / shard["file"] for shard in manifest["splits"][split]["shards"]]


class JsonlStream:
    """Endless walk over the records of JSONL files, in a fresh random order each epoch.

    Opening indexes the byte offset of every line (one sequential read), so records can be visited
    in a seeded per-epoch permutation: the corpus is stored package by package, and reading it in order
    would fill each batch with files of one package. Position k of an epoch's permutation belongs to
    rank k % world, so ranks read disjoint slices. The position is (epoch, k): resuming is a seek.
    """

    def __init__(self, files: list[Path], rank: int = 0, world: int = 1, seed: int = 0,
                 keep: Callable[[dict], bool] | None = None, what: str = "documents"):
        self.files, self.rank, self.world, self.seed, self.keep, self.what = files, rank, world, seed, keep, what
        self.file_ids, self.offsets = _line_index(files)
        if len(self.offsets) == 0:
            raise UserError(f"no {what} in {len(files)} file(s): all empty ({', '.join(map(str, files[:3]))})")
        self.pos = {"epoch": 0, "next": rank, "found": 0}
        self._order = self._permutation(0)
        self._handles: dict[int, BinaryIO] = {}

    def __iter__(self) -> Iterator[dict]:
        return self

    def __next__(self) -> dict:
        while True:
            if self.pos["next"] >= len(self.offsets):
                self._next_epoch()
            k = int(self._order[self.pos["next"]])
            self.pos["next"] += self.world
            record = self._read(int(self.file_ids[k]), int(self.offsets[k]))
            if self.keep is None or self.keep(record):
                self.pos["found"] += 1
                return record

    def _next_epoch(self) -> None:
        if self.pos["found"] == 0:
            raise UserError(f"rank {self.rank}/{self.world}: no {self.what} in {len(self.files)} file(s) "
                            f"({', '.join(map(str, self.files[:3]))}): none matches, or too few for the ranks")
        self.pos = {"epoch": self.pos["epoch"] + 1, "next": self.rank, "found": 0}
        self._order = self._permutation(self.pos["epoch"])

    def _permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.offsets))

    def _read(self, file_id: int, offset: int) -> dict:
        f = self._handles.get(file_id)
        if f is None:
            f = self._handles[file_id] = open(self.files[file_id], "rb")
        f.seek(offset)
        try:
            return json.loads(f.readline())
        except json.JSONDecodeError as e:
            raise UserError(f"{self.files[file_id]}: the line at byte {offset} is not JSON ({e})") from None

    def state_dict(self) -> dict:
        return dict(self.pos)

    def load_state_dict(self, state: dict) -> None:
        self.pos = dict(state)
        self._order = self._permutation(self.pos["epoch"])


def _line_index(files: list[Path]) -> tuple[np.ndarray, np.ndarray]:
    """(file number, byte offset) of every non-blank line."""
    file_ids, offsets = [], []
    for i, path in enumerate(files):
        starts, at = [], 0
        with open(path, "rb") as f:
            for line in f:
                if line.strip():
                    starts.append(at)
                at += len(line)
        offsets.append(np.array(starts, dtype=np.int64))
        file_ids.append(np.full(len(starts), i, dtype=np.int32))
    return np.concatenate(file_ids or [np.zeros(0, np.int32)]), np.concatenate(offsets or [np.zeros(0, np.int64)])
