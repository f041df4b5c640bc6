"""`build_corpus`: sources -> licence filter -> quality filters -> dedup -> decontamination -> split -> shards.

Corpus layout (written to a temp dir beside `out`, renamed into place when complete):

    out/train-00000.jsonl ...   {"text", "path", "lang", "package", "license"} per line
    out/val-00000.jsonl ...
    out/manifest.json           format, params, packages with licences and counts, per-language counts,
                                dropped counts per reason, contamination hits, sha256 of every shard

Files are checked cheapest first and the first failing rule is the reason counted. The per-file checks
(decoding, quality, dedup keys, MinHash, benchmark overlap) run in worker processes (`workers`); the
decisions that depend on order run in the parent in source order, so dedup keeps the first copy in
source order and the corpus is the same for any number of workers. Splits are by package, decided by a
seeded hash of the package name, so all versions of one dist land in the same split.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import shutil
import sys
import tarfile
import time
import zipfile
import zlib
from collections import Counter, deque
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from codellm.data.decontam import Decontaminator
from codellm.data.filters import ExactDedup, FilterConfig, MinHasher, NearDedup, decode, quality_reason, size_reason
from codellm.data.sources import Source, language
from codellm.errors import UserError

FORMAT = "codellm-corpus/1"
MAX_HITS_LISTED = 1000  # contamination hits recorded by name in the manifest


@dataclass(frozen=True)
class BuildConfig:
    val_fraction: float = 0.05
    seed: int = 0
    near_dup_threshold: float = 0.85
    num_perm: int = 128
    shard_bytes: int = 128 * 2**20
    filters: FilterConfig = field(default_factory=FilterConfig)


def prepare_out_dir(out: Path, fmt: str, force: bool) -> Path:
    """Refuse to clobber anything but an older output of the same kind (and that only with force)."""
    if out.exists():
        is_ours = _format_of(out) == fmt
        if not is_ours and (not out.is_dir() or any(out.iterdir())):
            raise UserError(f"--out {out}: exists and is not a {fmt} directory; choose another path")
        if is_ours and not force:
            raise UserError(f"--out {out}: already holds a {fmt}; pass --force to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)  # left over from a killed run
    tmp.mkdir()
    return tmp


def _format_of(root: Path) -> str | None:
    try:
        return json.loads((root / "manifest.json").read_text()).get("format")
    except (OSError, ValueError, AttributeError):
        return None


@contextmanager
def staged_output(out: Path, fmt: str, force: bool) -> Iterator[Path]:
    """A temp dir beside `out` to write into: swapped into place on success, removed on any error."""
    tmp = prepare_out_dir(out, fmt, force)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    commit_out_dir(tmp, out)


def commit_out_dir(tmp: Path, out: Path) -> None:
    """Swap the finished temp dir into place; the old output is removed only after the new one is there."""
    old = out.parent / f".{out.name}.old"
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


class ShardWriter:
    """JSONL shards `{prefix}-00000.jsonl`, a new one once `shard_bytes` is reached."""

    def __init__(self, root: Path, prefix: str, shard_bytes: int):
        self.root, self.prefix, self.shard_bytes = root, prefix, shard_bytes
        self.shards: list[dict] = []
        self._f = None

    def write(self, doc: dict) -> None:
        line = (json.dumps(doc, ensure_ascii=False) + "\n").encode()
        if self._f is None or self.shards[-1]["bytes"] + len(line) > self.shard_bytes:
            self._open_next()
        self._f.write(line)
        self.shards[-1]["bytes"] += len(line)
        self.shards[-1]["docs"] += 1

    def _open_next(self) -> None:
        self.close()
        name = f"{self.prefix}-{len(self.shards):05d}.jsonl"
        self._f = open(self.root / name, "wb")
        self.shards.append({"file": name, "docs": 0, "bytes": 0})

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None


def split_of(packages: Iterable[str], val_fraction: float, seed: int) -> dict[str, str]:
    """Seeded hash of the package name below val_fraction -> val; at least one package each way if >= 2."""
    u = {p: int.from_bytes(hashlib.sha256(f"{seed}:{p}".encode()).digest()[:8]) / 2**64 for p in packages}
    split = {p: "val" if x < val_fraction else "train" for p, x in u.items()}
    ranked = sorted(u, key=u.get)
    if len(ranked) >= 2 and val_fraction > 0 and "val" not in split.values():
        split[ranked[0]] = "val"
    if len(ranked) >= 2 and "train" not in split.values():
        split[ranked[-1]] = "train"
    return split


class Progress:
    """One stderr line every `every` files; `every=None` keeps quiet (tests)."""

    def __init__(self, every: int | None):
        self.every, self.enabled, self.start = every or 1, every is not None, time.monotonic()
        self.files = self.kept = self.kept_bytes = 0
        self._next = self.every

    def update(self, files: int, package: str, kept_bytes: int | None = None) -> None:
        self.files += files
        if kept_bytes is not None:
            self.kept, self.kept_bytes = self.kept + 1, self.kept_bytes + kept_bytes
        if self.enabled and self.files >= self._next:
            self._next = (self.files // self.every + 1) * self.every
            self.line(f"at {package}")

    def line(self, what: str) -> None:
        if self.enabled:
            print(f"data build: {self.files:,} files | kept {self.kept:,} ({self.kept_bytes / 1e6:.1f} MB) | "
                  f"{time.monotonic() - self.start:.0f}s | {what}", file=sys.stderr, flush=True)


# What worker processes need, set before they are forked (fork shares the decontamination index for free).
_CHECKS: tuple[FilterConfig, Decontaminator | None, MinHasher] | None = None
TASK_BYTES = 1 << 21  # files per worker task: about 2 MB of source


@dataclass
class Checked:
    """One file after the per-file checks; `reason` None means it passed them and the dedup keys are set."""

    path: str
    reason: str | None
    text: str | None = None
    exact_key: bytes | None = None
    contaminated_by: str | None = None
    signature: np.ndarray | None = None


def _check_files(files: list[tuple[str, bytes]]) -> list[Checked]:
    """Decode + quality filters, and for files that pass: exact-dedup key, benchmark overlap, MinHash."""
    filters, decontam, hasher = _CHECKS
    out = []
    for path, data in files:
        text = decode(data)
        if text is None:
            out.append(Checked(path, "not_utf8"))
        elif reason := quality_reason(text, language(path), filters):
            out.append(Checked(path, reason))
        else:
            label = decontam.match(text) if decontam else None
            out.append(Checked(path, None, text, ExactDedup.key(text), label, hasher.signature(text)))
    return out


def _ordered_map(fn, tasks: Iterable, workers: int) -> Iterator:
    """fn over tasks in worker processes, results in task order, a bounded number in flight."""
    if workers <= 1:
        yield from map(fn, tasks)
        return
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        pending: deque = deque()
        for task in tasks:
            pending.append(pool.apply_async(fn, (task,)))
            while len(pending) >= 4 * workers or (pending and pending[0].ready()):
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


class _Dedup:
    """The order-dependent decisions, taken in the parent in source order: exact dup, benchmark
    overlap, near dup (the first copy seen is kept)."""

    def __init__(self, cfg: BuildConfig, decontam: Decontaminator | None):
        self.exact = ExactDedup()
        self.near = NearDedup(cfg.near_dup_threshold, cfg.num_perm)
        self.decontam = decontam
        self.hits: list[dict] = []

    def reason(self, package: str, f: Checked) -> str | None:
        if f.reason:
            return f.reason
        if self.exact.is_duplicate(f.exact_key):
            return "exact_dup"
        if f.contaminated_by:
            if len(self.hits) < MAX_HITS_LISTED:
                self.hits.append({"package": package, "path": f.path, "benchmark": f.contaminated_by})
            return "contaminated"
        if self.near.is_duplicate(f.signature):
            return "near_dup"
        return None


def build_corpus(sources: list[Source], out: Path, *, decontam: Decontaminator | None,
                 config: BuildConfig = BuildConfig(), force: bool = False, progress_every: int | None = 2000,
                 workers: int = 1) -> dict:
    """Build a corpus directory at `out` and return its manifest. `decontam=None` skips decontamination.
    `workers` processes run the per-file checks; the corpus is the same for any number of them."""
    global _CHECKS
    _CHECKS = (config.filters, decontam, MinHasher(config.num_perm))
    try:
        with staged_output(Path(out), FORMAT, force) as tmp:
            manifest = _build(sources, tmp, decontam, config, Progress(progress_every), workers)
            (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    finally:
        _CHECKS = None
    return manifest


def _build(sources: list[Source], tmp: Path, decontam: Decontaminator | None, cfg: BuildConfig,
           progress: Progress, workers: int) -> dict:
    dedup = _Dedup(cfg, decontam)
    dropped: Counter[str] = Counter()
    packages: list[dict] = []
    source_info: list[dict] = []
    tasks = _tasks(sources, cfg.filters, packages, source_info, dropped, progress)
    with open(tmp / "staging.jsonl", "wb") as staging:
        for index, checked in _ordered_map(_check_files_of, tasks, workers):
            entry = packages[index]
            for f in checked:
                if reason := dedup.reason(entry["name"], f):
                    dropped[reason] += 1
                    progress.update(1, entry["name"])
                    continue
                doc = {"text": f.text, "path": f.path, "lang": language(f.path), "package": entry["name"],
                       "license": entry["license"]}
                staging.write((json.dumps(doc, ensure_ascii=False) + "\n").encode())
                nbytes = len(f.text.encode())
                entry["kept"] += 1
                entry["bytes"] += nbytes
                progress.update(1, entry["name"], nbytes)
    if progress.kept == 0:
        raise UserError(f"no documents left after filtering {progress.files:,} files from "
                        f"{len(sources)} source(s); dropped: {dict(dropped)}")
    kept = {p["name"] for p in packages if p["kept"]}
    split = split_of(sorted(kept), cfg.val_fraction, cfg.seed)
    for p in packages:
        p["split"] = split.get(p["name"])
    splits = _write_splits(tmp, split, cfg.shard_bytes)
    (tmp / "staging.jsonl").unlink()
    return {
        "format": FORMAT,
        "params": asdict(cfg),
        "sources": source_info,
        "files_seen": progress.files,
        "docs": progress.kept,
        "bytes": progress.kept_bytes,
        "langs": _lang_totals(splits),
        "dropped": dict(sorted(dropped.items())),
        "decontamination": _decontam_info(decontam, dropped["contaminated"], dedup.hits),
        "splits": splits,
        "packages": packages,
    }


def _check_files_of(task: tuple[int, list[tuple[str, bytes]]]) -> tuple[int, list[Checked]]:
    index, files = task
    return index, _check_files(files)


def _tasks(sources: list[Source], filters: FilterConfig, packages: list[dict], source_info: list[dict],
           dropped: Counter, progress: Progress) -> Iterator[tuple[int, list[tuple[str, bytes]]]]:
    """Read every package in source order (its licence decides whether its files are read at all) and
    yield (index of its entry in `packages`, ~2 MB of its files) tasks; oversize and unreadable files
    are counted here."""
    for src in sources:
        n_before = len(packages)
        for pkg in src.packages():
            lic = pkg.license
            entry = {"name": pkg.name, "source": pkg.source, "license": lic.name, "license_evidence": lic.evidence,
                     "permissive": lic.permissive, "files": len(pkg.files), "kept": 0, "bytes": 0}
            packages.append(entry)
            if not lic.permissive:
                dropped["unlicensed" if lic.name == "unknown" else "license_not_permissive"] += len(pkg.files)
                progress.update(len(pkg.files), pkg.name)
                continue
            batch, size = [], 0
            for path, nbytes in pkg.files:
                if reason := size_reason(nbytes, filters):
                    dropped[reason] += 1
                    progress.update(1, pkg.name)
                    continue
                try:
                    data = pkg.read(path)
                except (OSError, EOFError, zipfile.BadZipFile, tarfile.TarError, zlib.error):
                    dropped["unreadable"] += 1  # one damaged member should not end a long build
                    progress.update(1, pkg.name)
                    continue
                batch.append((path, data))
                size += len(data)
                if size >= TASK_BYTES:
                    yield len(packages) - 1, batch
                    batch, size = [], 0
            if batch:
                yield len(packages) - 1, batch
        source_info.append({"path": src.path, "kind": src.kind, "packages": len(packages) - n_before})
        if src.kind != "archive":  # one line per archive would drown the periodic lines
            progress.line(f"read all of {src.path}")


def _write_splits(tmp: Path, split: dict[str, str], shard_bytes: int) -> dict:
    writers = {s: ShardWriter(tmp, s, shard_bytes) for s in ("train", "val")}
    stats = {s: {"docs": 0, "bytes": 0, "packages": 0, "langs": {}} for s in writers}
    for name in split.values():
        stats[name]["packages"] += 1
    with open(tmp / "staging.jsonl", encoding="utf-8") as f:
        for line in f:
            doc = json.loads(line)
            s = split[doc["package"]]
            writers[s].write(doc)
            lang = stats[s]["langs"].setdefault(doc["lang"], {"docs": 0, "bytes": 0})
            nbytes = len(doc["text"].encode())
            for c in (stats[s], lang):
                c["docs"] += 1
                c["bytes"] += nbytes
    for s, w in writers.items():
        w.close()
        stats[s]["shards"] = [{**sh, "sha256": sha256_file(tmp / sh["file"])} for sh in w.shards]
    return stats


def _lang_totals(splits: dict) -> dict:
    totals: dict[str, dict] = {}
    for s in splits.values():
        for lang, c in s["langs"].items():
            t = totals.setdefault(lang, {"docs": 0, "bytes": 0})
            t["docs"] += c["docs"]
            t["bytes"] += c["bytes"]
    return dict(sorted(totals.items()))


def _decontam_info(decontam: Decontaminator | None, dropped: int, hits: list[dict]) -> dict:
    if decontam is None:
        return {"enabled": False}
    return {"enabled": True, "benchmark_files": decontam.files, "ngram": decontam.n, "max_df": decontam.max_df,
            "min_chars": decontam.min_chars, "ngrams_indexed": len(decontam.index), "dropped": dropped,
            "hits": hits}
