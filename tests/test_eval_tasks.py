"""The benchmarks: counts, prompts, and reference solutions passing through the sandbox.

HumanEval (164/164), MBPP (500/500) and random-span-light infilling (164/164) run in full. The larger
infilling sets run a deterministic stratified subset, one item per HumanEval problem (164 each; the full
5 815 multi-line items take minutes on two cores): set CODELLM_FULL_EVAL_TESTS=1 to run them all.
MultiPL-E ships no reference solutions: hand-written ones for two problems run in every language whose
toolchain (executables and libraries, checked by building a known-good program) the sandbox can use, and the
rest are skipped with the reason.
"""

import json
import os
from concurrent.futures import ThreadPoolExecutor

import pytest

from codellm.errors import UserError
from codellm.eval.cli import BENCHMARK_DATA
from codellm.eval.tasks import MBPP, HumanEval, Infilling, MultiPLE, get_task
from codellm.eval.toolchain import check
from codellm.sandbox import Limits, Sandbox
from tests.eval_fixtures import EARLY_EXIT, SOLUTIONS, WRONG

DATA = BENCHMARK_DATA
pytestmark = pytest.mark.skipif(not DATA.is_dir(), reason=f"benchmark data {DATA} is not beside the checkout")
FULL = bool(os.environ.get("CODELLM_FULL_EVAL_TESTS"))
GCD = "HumanEval_13_greatest_common_divisor"


@pytest.fixture(scope="module")
def sandbox():
    box = Sandbox()
    yield box
    box.close()


def run_each(sandbox, task, completions: list[tuple[str, str]]) -> list[dict]:
    """Results of running each (task_id, completion), in order, as many at once as the sandbox has workers."""
    from codellm.eval.runner import run_program

    limits = Limits(cpu_seconds=task.timeout)
    with ThreadPoolExecutor(sandbox.workers) as pool:
        return list(
            pool.map(lambda tc: run_program(task.program(task.problem(tc[0]), tc[1]), sandbox, limits), completions)
        )


def run_all(sandbox, task, completions: list[tuple[str, str]]) -> dict[str, list[str]]:
    """{status: [task_id: output, ...]} of running each (task_id, completion)."""
    out: dict[str, list[str]] = {}
    for (task_id, _), result in zip(completions, run_each(sandbox, task, completions), strict=True):
        out.setdefault(result["status"], []).append(f"{task_id}: {result['output'][-300:]}")
    return out


def one_per_problem(problems):
    """The first item of every HumanEval problem: a stratified, deterministic subset."""
    seen, out = set(), []
    for p in problems:
        base = "/".join(p.task_id.split("/")[1:3])
        if base not in seen:
            seen.add(base)
            out.append(p)
    return out


@pytest.mark.parametrize(
    "name, count",
    [
        ("humaneval", 164),
        ("mbpp", 500),
        ("mbpp-sanitized", 257),
        ("infill-single-line", 1033),
        ("infill-multi-line", 5815),
        ("infill-random-span", 1640),
        ("infill-random-span-light", 164),
        ("multipl-e-cpp", 161),
        ("multipl-e-java", 158),
        ("multipl-e-js", 161),
        ("multipl-e-ts", 159),
        ("multipl-e-php", 161),
        ("multipl-e-cs", 158),
        ("multipl-e-sh", 158),
        ("multipl-e-go", 154),
        ("multipl-e-rs", 156),
    ],
)
def test_counts_and_hashes(name, count):
    task = get_task(name, DATA)
    assert len(task.problems) == count
    assert len({p.task_id for p in task.problems}) == count
    files = task.data_files()
    assert files and all(len(sha) == 64 for sha in files.values())


def test_missing_or_short_data_file_is_a_clear_error(tmp_path):
    with pytest.raises(UserError, match="mbpp.jsonl is missing"):
        _ = MBPP(tmp_path).problems
    (tmp_path / "multipl-e").mkdir()
    (tmp_path / "multipl-e" / "humaneval-cpp.jsonl").write_text('{"name": "a", "prompt": "", "tests": ""}\n')
    with pytest.raises(UserError, match="expected 161 records, found 1"):
        _ = MultiPLE(tmp_path, "cpp").problems
    with pytest.raises(UserError, match="unknown task"):
        get_task("apps", DATA)


def test_humaneval_prompt_and_stops():
    p = HumanEval().problem("HumanEval/0")
    assert p.prompt.startswith("from typing import List") and p.prompt.endswith('"""\n')
    assert p.stop == ("\nclass", "\ndef", "\n#", "\n@", "\nprint", "\nif", "\n```")
    assert HumanEval(strip_prompt=True).problem("HumanEval/0").prompt.endswith('"""')
    program = HumanEval().program(p, "    return True\n")
    assert program.text == p.row["prompt"] + "    return True\n" + "\n" + p.row["test"] + "\ncheck(has_close_elements)"


def test_mbpp_three_shot_prompt():
    task = MBPP(DATA)
    p = task.problem("11")
    assert p.prompt.startswith(
        "You are an expert Python programmer, and here is your task: Write a function to "
        "find the similar elements from the given two tuple lists. Your code should pass "
        "these tests:\n\nassert similar_elements((3, 4, 5, 6),(5, 7, 4, 10)) == (4, 5)\n"
    )
    assert p.prompt.count("[DONE]") == 3 and p.prompt.count("[BEGIN]\n") == 4
    assert p.prompt.endswith('assert remove_Occ("PHP","P") == "H"\n[BEGIN]\n')
    assert "\n[DONE]\n\nYou are an expert" in p.prompt and p.stop == ("[DONE]",)
    assert [q.task_id for q in task.problems][:2] == ["11", "12"] and task.problems[-1].task_id == "510"
    sanitized = MBPP(DATA, sanitized=True).problem("11")
    assert (
        sanitized.prompt.count("[DONE]") == 3 and "Write a python function to remove first and last" in sanitized.prompt
    )


def test_humaneval_canonical_solutions_all_pass(sandbox):
    task = HumanEval()
    statuses = run_all(sandbox, task, [(p.task_id, p.reference) for p in task.problems])
    assert list(statuses) == ["passed"] and len(statuses["passed"]) == 164, statuses


@pytest.mark.parametrize("sanitized", [False, True])
def test_mbpp_reference_code_passes(sandbox, sanitized):
    task = MBPP(DATA, sanitized=sanitized)
    statuses = run_all(sandbox, task, [(p.task_id, p.reference) for p in task.problems])
    assert list(statuses) == ["passed"], {k: v[:3] for k, v in statuses.items()}


@pytest.mark.parametrize("benchmark", ["single-line", "multi-line", "random-span", "random-span-light"])
def test_infilling_canonical_middle_passes(sandbox, benchmark):
    task = Infilling(DATA, benchmark)
    problems = task.problems if FULL or benchmark == "random-span-light" else one_per_problem(task.problems)
    assert len(problems) == 164 or FULL
    statuses = run_all(sandbox, task, [(p.task_id, p.reference) for p in problems])
    assert list(statuses) == ["passed"], {k: v[:3] for k, v in statuses.items()}


def test_empty_and_wrong_completions_fail(sandbox):
    task = HumanEval()
    wrong = ["", "    return None\n", "    pass\n", "    raise ValueError('no')\n", "    return [\n"]
    ids = [p.task_id for p in task.problems[:8]]
    statuses = run_all(sandbox, task, [(t, w) for t in ids for w in wrong])
    assert "passed" not in statuses
    assert {"failed", "runtime_error", "syntax_error"} <= set(statuses)
    mbpp = MBPP(DATA)
    assert "passed" not in run_all(sandbox, mbpp, [(p.task_id, "") for p in mbpp.problems[:5]])


@pytest.mark.parametrize("lang", ["cpp", "java", "js", "ts", "php", "cs", "sh", "go", "rs"])
def test_multipl_e_hand_solutions(sandbox, lang):
    task = MultiPLE(DATA, lang)
    if why := check(task, sandbox):
        pytest.skip(f"{lang}: toolchain not usable by the sandbox: {why}")
    cases = [(name, completion, {"passed"}) for name, completion in SOLUTIONS[lang].items()] + [
        (GCD, WRONG[lang], {"failed"}),
        (GCD, EARLY_EXIT[lang], {"failed"}),  # exits 0 before the tests: no nonce
        (GCD, "", {"compile_error", "syntax_error", "failed"}),  # C++ compiles it (UB): a garbage result
    ]
    results = run_each(sandbox, task, [(name, completion) for name, completion, _ in cases])
    for (_, completion, expected), result in zip(cases, results, strict=True):
        assert result["status"] in expected, (completion, result)


def test_multipl_e_prompts_and_stop_tokens():
    for lang in ("cpp", "java", "sh", "php"):
        task = MultiPLE(DATA, lang)
        p = task.problem(GCD)
        row = json.loads(next(line for line in (DATA / f"multipl-e/humaneval-{lang}.jsonl").open() if GCD in line))
        assert p.prompt == row["prompt"] and p.stop == tuple(row["stop_tokens"])
        assert task.program(p, "X").text == row["prompt"] + "X" + "\n" + row["tests"]
