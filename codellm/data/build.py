"""`build_corpus`: sources -> licence filter -> quality filters -> dedup -> decontamination -> split -> shards.

Corpus layout (written to a temp dir beside `out`, renamed into place when complete):

    out/train-00000.jsonl ...   {"text", "path", "lang", "package", "license"} per line
    out/val-00000.jsonl ...
    out/manifest.json           format, params, packages with licences and counts, per-language counts,
                                dropped counts per reason, contamination hits, sha256 of every shard

Files are checked cheapest first and the first failing rule is the reason counted. Dedup keeps the first
copy in source order. Splits are by package, decided by a seeded hash of the package name, so all
versions of one dist land in the same split.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
import tarfile
import time
import zipfile
import zlib
from collections import Counter
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

from codellm.data.decontam import Decontaminator
from codellm.data.filters import ExactDedup, FilterConfig, NearDedup, decode, quality_reason, size_reason
from codellm.data.sources import Package, Source, language
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


class _Filter:
    """All per-file checks in order; `reason` returns why a file is dropped, or None to keep it."""

    def __init__(self, cfg: BuildConfig, decontam: Decontaminator | None):
        self.cfg, self.decontam = cfg, decontam
        self.exact = ExactDedup()
        self.near = NearDedup(cfg.near_dup_threshold, cfg.num_perm)
        self.hits: list[dict] = []

    def reason(self, pkg: Package, path: str, size: int) -> tuple[str | None, str | None]:
        """(reason to drop, text); reason None means keep the text."""
        if r := size_reason(size, self.cfg.filters):
            return r, None
        try:
            text = decode(pkg.read(path))
        except (OSError, EOFError, zipfile.BadZipFile, tarfile.TarError, zlib.error):
            return "unreadable", None  # one damaged member should not end a long build
        if text is None:
            return "not_utf8", None
        if r := quality_reason(text, language(path), self.cfg.filters):
            return r, text
        if self.exact.is_duplicate(text):
            return "exact_dup", text
        if self.decontam and (label := self.decontam.match(text)):
            if len(self.hits) < MAX_HITS_LISTED:
                self.hits.append({"package": pkg.name, "path": path, "benchmark": label})
            return "contaminated", text
        if self.near.is_duplicate(text):
            return "near_dup", text
        return None, text


def build_corpus(sources: list[Source], out: Path, *, decontam: Decontaminator | None,
                 config: BuildConfig = BuildConfig(), force: bool = False, progress_every: int | None = 2000
                 ) -> dict:
    """Build a corpus directory at `out` and return its manifest. `decontam=None` skips decontamination."""
    with staged_output(Path(out), FORMAT, force) as tmp:
        manifest = _build(sources, tmp, decontam, config, Progress(progress_every))
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def _build(sources: list[Source], tmp: Path, decontam: Decontaminator | None, cfg: BuildConfig,
           progress: Progress) -> dict:
    filt = _Filter(cfg, decontam)
    dropped: Counter[str] = Counter()
    packages, source_info = [], []
    with open(tmp / "staging.jsonl", "wb") as staging:
        for src in sources:
            n_before = len(packages)
            for pkg in src.packages():
                packages.append(_take_package(pkg, filt, dropped, staging, progress))
            source_info.append({"path": src.path, "kind": src.kind, "packages": len(packages) - n_before})
            if src.kind != "archive":  # one line per archive would drown the periodic lines
                progress.line(f"done {src.path}")
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
        "decontamination": _decontam_info(decontam, dropped["contaminated"], filt.hits),
        "splits": splits,
        "packages": packages,
    }


def _take_package(pkg: Package, filt: _Filter, dropped: Counter, staging, progress: Progress) -> dict:
    lic = pkg.license
    entry = {"name": pkg.name, "source": pkg.source, "license": lic.name, "license_evidence": lic.evidence,
             "permissive": lic.permissive, "files": len(pkg.files), "kept": 0, "bytes": 0}
    if not lic.permissive:
        dropped["unlicensed" if lic.name == "unknown" else "license_not_permissive"] += len(pkg.files)
        progress.update(len(pkg.files), pkg.name)
        return entry
    for path, size in pkg.files:
        reason, text = filt.reason(pkg, path, size)
        if reason:
            dropped[reason] += 1
            progress.update(1, pkg.name)
            continue
        doc = {"text": text, "path": path, "lang": language(path), "package": pkg.name, "license": lic.name}
        staging.write((json.dumps(doc, ensure_ascii=False) + "\n").encode())
        nbytes = len(text.encode())
        entry["kept"] += 1
        entry["bytes"] += nbytes
        progress.update(1, pkg.name, nbytes)
    return entry


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
