"""Token shards: a tokenized corpus the training loop can memory-map.

Layout of a token dir:

    out/train-00000.bin    token ids of every document back to back (no BOS/EOS), dtype per manifest:
                           uint16 when vocab_size <= 65536, else uint32
    out/train-00000.idx    uint64 document offsets into the .bin, num_docs + 1 entries, starting at 0
    out/val-00000.bin/.idx
    out/manifest.json      format, dtype, tokenizer (vocab, bos/eos ids, sha256), corpus manifest sha256,
                           per split: docs, tokens, tokens/docs per language, shards with sha256

Document i of a split is the i-th line of that split's corpus JSONL shards read in order, so the raw
text (for re-tokenizing around an infilling transform) and the metadata (lang, package) line up with it.
Tokenizing streams documents and flushes every ~1M tokens, so memory stays bounded.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from array import array
from bisect import bisect_right
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

import numpy as np

from codellm.data.build import FORMAT as CORPUS_FORMAT
from codellm.data.build import sha256_file, staged_output
from codellm.errors import UserError

FORMAT = "codellm-tokens/1"
FLUSH_TOKENS = 1 << 20


class Tokenizer(Protocol):
    vocab_size: int
    bos_id: int
    eos_id: int

    def encode(self, text: str) -> list[int]: ...


def dtype_for(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


def tokenizer_sha256(tokenizer_dir: Path) -> str:
    """Hash of every file in the tokenizer dir (names and bytes), to tie shards to one tokenizer."""
    h = hashlib.sha256()
    for p in sorted(Path(tokenizer_dir).rglob("*")):
        if p.is_file():
            h.update(p.relative_to(tokenizer_dir).as_posix().encode() + b"\0" + p.read_bytes())
    return h.hexdigest()


def read_corpus(corpus: Path, split: str) -> Iterator[dict]:
    """Documents of one split of a corpus dir, in order."""
    manifest = load_manifest(corpus, CORPUS_FORMAT, "--corpus")
    for shard in manifest["splits"][split]["shards"]:
        with open(Path(corpus) / shard["file"], encoding="utf-8") as f:
            yield from (json.loads(line) for line in f)


def load_manifest(root: Path, fmt: str, flag: str) -> dict:
    path = Path(root) / "manifest.json"
    if not path.is_file():
        raise UserError(f"{flag} {root}: no manifest.json (not a {fmt} directory)")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != fmt:
        raise UserError(f"{flag} {root}: manifest format is {manifest.get('format')!r}, expected {fmt!r}")
    return manifest


class _BinWriter:
    """Appends documents to `{split}-NNNNN.bin/.idx`, hashing as it writes."""

    def __init__(self, root: Path, split: str, dtype: np.dtype, shard_tokens: int):
        self.root, self.split, self.dtype, self.shard_tokens = root, split, dtype, shard_tokens
        self.shards: list[dict] = []
        self._buf: list[np.ndarray] = []
        self._buffered = 0

    def add(self, ids: np.ndarray) -> None:
        full = bool(self.shards) and self.shards[-1]["tokens"] + len(ids) > self.shard_tokens
        if not self.shards or full and self.shards[-1]["docs"]:
            self._next_shard()
        sh = self.shards[-1]
        sh["docs"] += 1
        sh["tokens"] += len(ids)
        self._offsets.append(sh["tokens"])
        self._buf.append(ids.astype(self.dtype))
        self._buffered += len(ids)
        if self._buffered >= FLUSH_TOKENS:
            self._flush()

    def _flush(self) -> None:
        if self._buf:
            data = np.concatenate(self._buf).tobytes()
            self._bin.write(data)
            self._hash.update(data)
        self._buf, self._buffered = [], 0

    def _next_shard(self) -> None:
        self.close()
        name = f"{self.split}-{len(self.shards):05d}"
        self._bin, self._hash = open(self.root / f"{name}.bin", "wb"), hashlib.sha256()
        self._offsets = array("Q", [0])  # compact: 8 bytes per document
        self.shards.append({"bin": f"{name}.bin", "idx": f"{name}.idx", "docs": 0, "tokens": 0})

    def close(self) -> None:
        if not self.shards or self._bin.closed:
            return
        self._flush()
        self._bin.close()
        sh = self.shards[-1]
        np.frombuffer(self._offsets, dtype=np.uint64).tofile(self.root / sh["idx"])
        sh["sha256"] = {"bin": self._hash.hexdigest(), "idx": sha256_file(self.root / sh["idx"])}

    def finish(self) -> list[dict]:
        if not self.shards:  # an empty split still gets a zero-length shard: readers need no special case
            self._next_shard()
        self.close()
        return self.shards


def tokenize_corpus(corpus: Path, tokenizer: Tokenizer, out: Path, *, tokenizer_hash: str = "",
                    seq_len: int | None = None, shard_tokens: int = 2**31, force: bool = False,
                    progress_every: int | None = 10_000) -> dict:
    """Tokenize every split of a corpus dir into token shards at `out`; returns the manifest."""
    corpus, out = Path(corpus), Path(out)
    corpus_manifest = load_manifest(corpus, CORPUS_FORMAT, "--corpus")
    dtype = dtype_for(tokenizer.vocab_size)
    with staged_output(out, FORMAT, force) as tmp:
        splits = {s: _tokenize_split(corpus, s, tokenizer, tmp, dtype, shard_tokens, seq_len, progress_every)
                  for s in corpus_manifest["splits"]}
        manifest = {
            "format": FORMAT,
            "corpus": str(corpus),
            "corpus_manifest_sha256": sha256_file(corpus / "manifest.json"),
            "tokenizer": {"sha256": tokenizer_hash, "vocab_size": tokenizer.vocab_size,
                          "bos_id": tokenizer.bos_id, "eos_id": tokenizer.eos_id},
            "dtype": dtype.name,
            "seq_len": seq_len,
            "splits": splits,
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def _tokenize_split(corpus: Path, split: str, tok: Tokenizer, tmp: Path, dtype: np.dtype, shard_tokens: int,
                    seq_len: int | None, progress_every: int | None) -> dict:
    writer = _BinWriter(tmp, split, dtype, shard_tokens)
    langs: dict[str, dict] = {}
    over, start = 0, time.monotonic()
    for n, doc in enumerate(read_corpus(corpus, split), 1):
        ids = np.asarray(tok.encode(doc["text"]), dtype=np.int64)
        if len(ids) and (ids.min() < 0 or ids.max() >= tok.vocab_size):
            raise ValueError(f"tokenizer produced ids outside [0, {tok.vocab_size}) for {doc['path']}")
        writer.add(ids)
        c = langs.setdefault(doc["lang"], {"docs": 0, "tokens": 0})
        c["docs"] += 1
        c["tokens"] += len(ids)
        over += bool(seq_len and len(ids) > seq_len)
        if progress_every and n % progress_every == 0:
            tokens = sum(c["tokens"] for c in langs.values())
            print(f"data tokenize: {split} {n:,} docs | {tokens:,} tokens | {time.monotonic() - start:.0f}s",
                  file=sys.stderr, flush=True)
    shards = writer.finish()
    stats = {"docs": sum(s["docs"] for s in shards), "tokens": sum(s["tokens"] for s in shards),
             "langs": dict(sorted(langs.items())), "shards": shards}
    if seq_len:  # informational: how the training loop will see this split
        stats["docs_longer_than_seq_len"] = over
        stats["sequences_of_seq_len"] = stats["tokens"] // seq_len
    return stats


class TokenShards:
    """Read-only view of one split of a token dir: `doc(i)` is a memory-mapped slice, nothing is copied.

    >>> ts = TokenShards(path, "train"); ts.num_docs, ts.num_tokens; ids = ts.doc(0)  # np array
    `tokens(k)` / `offsets(k)` expose shard k's flat array and document offsets for bulk sampling.
    """

    def __init__(self, root: Path, split: str = "train"):
        self.root = Path(root)
        self.manifest = load_manifest(self.root, FORMAT, "token dir")
        if split not in self.manifest["splits"]:
            raise UserError(f"token dir {root}: no split {split!r} (has {sorted(self.manifest['splits'])})")
        info = self.manifest["splits"][split]
        self.dtype = np.dtype(self.manifest["dtype"])
        self.vocab_size = self.manifest["tokenizer"]["vocab_size"]
        self._tokens = [self._map(sh["bin"], self.dtype) for sh in info["shards"]]
        self._offsets = [self._map(sh["idx"], np.dtype(np.uint64)) for sh in info["shards"]]
        self._first_doc = np.cumsum([0] + [sh["docs"] for sh in info["shards"]]).tolist()
        self.num_docs, self.num_tokens = info["docs"], info["tokens"]

    def _map(self, name: str, dtype: np.dtype) -> np.ndarray:
        path = self.root / name
        if path.stat().st_size == 0:  # np.memmap refuses empty files
            return np.zeros(0, dtype=dtype)
        return np.memmap(path, dtype=dtype, mode="r")

    def __len__(self) -> int:
        return self.num_docs

    @property
    def num_shards(self) -> int:
        return len(self._tokens)

    def tokens(self, shard: int = 0) -> np.ndarray:
        return self._tokens[shard]

    def offsets(self, shard: int = 0) -> np.ndarray:
        return self._offsets[shard]

    def doc(self, i: int) -> np.ndarray:
        if not 0 <= i < self.num_docs:
            raise IndexError(f"document {i} out of range [0, {self.num_docs})")
        k = bisect_right(self._first_doc, i) - 1
        j = i - self._first_doc[k]
        lo, hi = self._offsets[k][j], self._offsets[k][j + 1]
        return self._tokens[k][int(lo) : int(hi)]

    def doc_lengths(self) -> np.ndarray:
        return np.concatenate([np.diff(o.astype(np.int64)) for o in self._offsets])

    def __iter__(self) -> Iterator[np.ndarray]:
        return (self.doc(i) for i in range(self.num_docs))
