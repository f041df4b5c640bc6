"""`codellm data build`. Also runs alone: `python -m codellm.data.cli data build ...`.

Training reads the corpus as text and tokenizes as it goes (see codellm/data/shards.py for why there is no
`data tokenize`)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from codellm.errors import UserError

DEFAULT_BENCHMARKS = Path(__file__).resolve().parents[1] / "eval" / "data"  # shipped with the package


def add_parser(subparsers) -> None:
    """Add `data` with `build` to an argparse subparsers object; it sets `func`."""
    data = subparsers.add_parser("data", help="build a training corpus")
    sub = data.add_subparsers(dest="data_command", required=True)

    b = sub.add_parser("build", help="walk sources, filter by licence and quality, dedup, decontaminate, split")
    b.add_argument("--source", type=Path, action="append", default=[],
                   help="dir, site-packages, node_modules, folder of archives, or .whl/.zip/.tar.gz (repeatable)")
    b.add_argument("--stdlib", action="store_true", help="add the Python standard library (PSF licence)")
    b.add_argument("--out", type=Path, required=True, help="corpus dir to create")
    b.add_argument("--benchmarks", type=Path, default=DEFAULT_BENCHMARKS,
                   help="dir with HumanEval/MBPP/MultiPL-E files to decontaminate against (default: %(default)s)")
    b.add_argument("--val-fraction", type=float, default=0.05, help="share of packages held out (default 0.05)")
    b.add_argument("--seed", type=int, default=0, help="seed of the package split")
    b.add_argument("--near-dup-threshold", type=float, default=0.85, help="MinHash Jaccard to call a near dup")
    b.add_argument("--max-file-bytes", type=int, default=1_000_000, help="larger files are dropped")
    b.add_argument("--shard-mb", type=int, default=128, help="JSONL shard size in MB")
    b.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                   help="processes for the per-file checks (default: all cores; the corpus does not depend on it)")
    b.add_argument("--force", action="store_true", help="replace an existing corpus at --out")
    b.set_defaults(func=run_build)


def run_build(args: argparse.Namespace) -> None:
    from dataclasses import replace

    from codellm.data.build import BuildConfig, build_corpus
    from codellm.data.decontam import Decontaminator
    from codellm.data.filters import FilterConfig
    from codellm.data.sources import open_source, stdlib_source

    if not args.source and not args.stdlib:
        raise UserError("data build: give at least one --source PATH or --stdlib")
    if not 0 <= args.val_fraction < 1:
        raise UserError(f"--val-fraction {args.val_fraction}: must be in [0, 1)")
    if args.workers < 1:
        raise UserError(f"--workers {args.workers}: must be at least 1")
    if not 0 < args.near_dup_threshold <= 1:
        raise UserError(f"--near-dup-threshold {args.near_dup_threshold}: must be in (0, 1]")
    sources = [open_source(p) for p in args.source] + ([stdlib_source()] if args.stdlib else [])
    config = BuildConfig(val_fraction=args.val_fraction, seed=args.seed, near_dup_threshold=args.near_dup_threshold,
                         shard_bytes=args.shard_mb * 2**20,
                         filters=replace(FilterConfig(), max_bytes=args.max_file_bytes))
    decontam = Decontaminator.from_dir(args.benchmarks)
    m = build_corpus(sources, args.out, decontam=decontam, config=config, force=args.force, workers=args.workers)
    split = ", ".join(f"{s} {v['docs']:,} docs / {v['packages']:,} packages" for s, v in m["splits"].items())
    print(f"wrote {args.out}: {m['docs']:,} docs, {m['bytes'] / 1e6:.1f} MB ({split}); "
          f"dropped {sum(m['dropped'].values()):,} of {m['files_seen']:,} files, "
          f"{m['dropped'].get('contaminated', 0):,} for benchmark overlap")


def main(argv: list[str] | None = None) -> int:
    from codellm.options import run_standalone

    return run_standalone(add_parser, argv)


if __name__ == "__main__":
    sys.exit(main())
