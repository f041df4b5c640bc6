"""Whether a task's programs can run in this sandbox: every executable and library its language needs, and
then a known-good program of the task itself built and run the way every sample will be.

The first part names what is missing (`javac`, the javatuples jar) and how to get it; the second catches
what no list of files can (a JDK that cannot see the jar, a C# compiler without System.Numerics, headers
g++ lacks, a sandbox user that cannot read the toolchain). A task that fails either is refused before any
sample is generated (`require`), and tests that need a language skip with the reason (`check`).
"""

from __future__ import annotations

import os

from codellm.errors import UserError
from codellm.eval.execution import LANGUAGES, Program, execute, missing_tools
from codellm.eval.tasks import MultiPLE, Task
from codellm.sandbox import Limits, Sandbox

PROBE_PROBLEM = "HumanEval_13_greatest_common_divisor"
# hand-written completions of PROBE_PROBLEM (MultiPL-E ships no reference solutions): prompt + this + tests
PROBE_COMPLETIONS = {
    "cpp": "    while (b) { long t = a % b; a = b; b = t; }\n    return a;\n",
    "java": "        while (b != 0) { long t = a % b; a = b; b = t; }\n        return a;\n",
    "js": "  while (b) { [a, b] = [b, a % b]; }\n  return a;\n}\n",
    "ts": "  while (b) { [a, b] = [b, a % b]; }\n  return a;\n}\n",
    "php": "    while ($b) { $t = $a % $b; $a = $b; $b = $t; }\n    return $a;\n}\n",
    "cs": "    public static long GreatestCommonDivisor(long a, long b) {\n"
    "        while (b != 0) { long t = a % b; a = b; b = t; }\n        return a;\n",
    "sh": "    local a=$1 b=$2 t\n    while (( b )); do t=$((a % b)); a=$b; b=$t; done\n    echo $a\n",
    "go": "    for b != 0 {\n        a, b = b, a%b\n    }\n    return a\n}\n",
    "rs": "    let (mut a, mut b) = (a, b);\n    while b != 0 {\n        let t = a % b;\n"
    "        a = b;\n        b = t;\n    }\n    a\n",
}
_checked: dict[tuple, str | None] = {}


def probe_program(task: Task) -> Program:
    """A program of `task` that must pass: its first problem's reference, or for MultiPL-E (no references)
    a hand-written solution of one problem."""
    if isinstance(task, MultiPLE):
        return task.program(task.problem(PROBE_PROBLEM), PROBE_COMPLETIONS[task.language])
    problem = task.problems[0]
    return task.program(problem, problem.reference)


def check(task: Task, sandbox: Sandbox) -> str | None:
    """Why `task`'s programs cannot run in `sandbox` (None: they can). Remembered per language, program,
    sandbox mode, PATH and library locations, so asking again costs nothing."""
    lang = LANGUAGES[task.language]
    mode = sandbox.isolation.mode
    if missing := missing_tools(lang, mode):
        return f"{lang.name} toolchain incomplete: {'; '.join(missing)}"
    program = probe_program(task)
    key = (program.sha256, mode, os.environ.get("PATH"), tuple(lib.path() for lib in lang.libraries))
    if key not in _checked:
        with sandbox.workspace() as ws:
            status, out = execute(program, ws, Limits(cpu_seconds=max(task.timeout, 10.0)))
        _checked[key] = None if status == "passed" else (
            f"a known-good {lang.name} program ({task.name} {program_name(task)}) is {status} in the sandbox: "
            f"{_gist(out.error or out.stderr or out.stdout)}"
        )
    return _checked[key]


def require(task: Task, sandbox: Sandbox) -> None:
    """Refuse to run `task` (one clear error) when its programs cannot run: its score would be a toolchain's."""
    if why := check(task, sandbox):
        raise UserError(f"cannot run {task.name} here: {why}")


def program_name(task: Task) -> str:
    return PROBE_PROBLEM if isinstance(task, MultiPLE) else task.problems[0].task_id


def _gist(text: str, lines: int = 2, chars: int = 300) -> str:
    """The first error-looking lines of a tool's output, on one line."""
    rows = [r.strip() for r in text.splitlines() if r.strip()]
    errors = [r for r in rows if "error" in r.lower()] or rows
    return (" | ".join(errors[:lines]) or "no output")[:chars]
