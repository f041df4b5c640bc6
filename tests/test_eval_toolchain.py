"""The toolchain check: a language needs its executables AND its libraries (MultiPL-E's Java tests import
javatuples). With a JDK but no jar, the tests that need Java skip with the reason, the sandbox reports the
missing jar (not a compile error), and `eval multipl-e --lang java` / `eval execute --task multipl-e-java`
refuse with one error before generating or scoring anything. CODELLM_JAVATUPLES points the jar lookup at
an empty folder to make "JDK present, jar absent" on any machine with a JDK."""

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from codellm.cli import main
from codellm.eval import toolchain
from codellm.eval.cli import BENCHMARK_DATA
from codellm.eval.execution import JAVATUPLES, LANGUAGES, missing_tools
from codellm.eval.runner import run_program
from codellm.eval.tasks import HumanEval, MultiPLE
from codellm.sandbox import Limits, Sandbox

DATA = BENCHMARK_DATA
REPO = Path(__file__).resolve().parent.parent
needs_jdk = pytest.mark.skipif(
    shutil.which("javac") is None or shutil.which("java") is None, reason="no JDK (javac, java) on PATH"
)
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason=f"benchmark data {DATA} is not beside the checkout")
pytestmark = [needs_data]


def cli(*args) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in args])
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def sandbox():
    with Sandbox(workers=2) as box:
        yield box


@pytest.fixture
def no_jar(monkeypatch):
    """JDK present, jar absent: the lookup points at an empty folder."""
    empty = tempfile.mkdtemp(prefix="codellm-nojar-")
    monkeypatch.setenv(JAVATUPLES.env, empty)
    yield empty
    os.rmdir(empty)


def readable_dir() -> Path:
    """A folder the sandbox user can read (pytest's tmp_path is private to root)."""
    path = Path(tempfile.mkdtemp(prefix="codellm-jar-"))
    path.chmod(0o755)
    return path


def in_tmp(sandbox) -> bool:
    """Whether files under /tmp are out of the programs' sight (the sandbox mounts its own /tmp)."""
    return sandbox.isolation.mode != "none"


@needs_jdk
def test_missing_jar_is_named_by_the_check_and_the_sandbox(no_jar, sandbox):
    task = MultiPLE(DATA, "java")
    missing = missing_tools(LANGUAGES["java"], sandbox.isolation.mode)
    assert len(missing) == 1 and f"javatuples not found in {no_jar}" in missing[0] and JAVATUPLES.env in missing[0]
    why = toolchain.check(task, sandbox)
    assert why is not None and "javatuples not found" in why
    with pytest.raises(Exception, match="cannot run multipl-e-java here: java toolchain incomplete: javatuples"):
        toolchain.require(task, sandbox)
    # a program that reaches the sandbox anyway is a sandbox error naming the jar, never a compile error
    problem = task.problem(toolchain.PROBE_PROBLEM)
    result = run_program(task.program(problem, toolchain.PROBE_COMPLETIONS["java"]), sandbox, Limits(cpu_seconds=10))
    assert result["status"] == "sandbox_error" and "javatuples not found" in result["output"]


@needs_jdk
def test_an_unusable_jar_is_caught_by_the_known_good_program(monkeypatch, sandbox):
    """A file where the jar should be passes every file check; only building a real program shows it is no jar
    (or, under /tmp in an isolated sandbox, that the programs cannot see it)."""
    folder = readable_dir()
    try:
        (folder / "javatuples.jar").write_bytes(b"")
        (folder / "javatuples.jar").chmod(0o644)
        monkeypatch.setenv(JAVATUPLES.env, str(folder))
        missing = missing_tools(LANGUAGES["java"], sandbox.isolation.mode)
        why = toolchain.check(MultiPLE(DATA, "java"), sandbox)
        if in_tmp(sandbox):
            assert len(missing) == 1 and "is hidden from programs" in missing[0] and why and "hidden" in why
            monkeypatch.setattr("codellm.eval.execution.SANDBOX_TMPFS", ())  # the file check alone now passes
            assert missing_tools(LANGUAGES["java"], sandbox.isolation.mode) == []
            why = toolchain.check(MultiPLE(DATA, "java"), sandbox)
        else:
            assert missing == []
        assert why is not None and "compile_error" in why and "org.javatuples does not exist" in why, why
    finally:
        shutil.rmtree(folder)


@needs_jdk
@pytest.mark.skipif(JAVATUPLES.path() is None, reason="no javatuples jar (apt install libjavatuples-java)")
def test_jar_found_through_the_variable_under_its_maven_name(monkeypatch, sandbox):
    """The variable may name a folder holding Maven's javatuples-1.2.jar (here a link to the installed jar)."""
    folder, real = readable_dir(), JAVATUPLES.path()
    try:
        (folder / "javatuples-1.2.jar").symlink_to(real)
        monkeypatch.setenv(JAVATUPLES.env, str(folder))
        assert JAVATUPLES.path() == real  # the link's target: the sandbox cannot see a link under /tmp
        assert toolchain.check(MultiPLE(DATA, "java"), sandbox) is None
        (folder / "javatuples-1.2.jar").unlink()
        assert JAVATUPLES.path() is None and "javatuples not found" in toolchain.check(MultiPLE(DATA, "java"), sandbox)
    finally:
        shutil.rmtree(folder)


def test_python_tasks_pass_the_check(sandbox):
    assert toolchain.check(HumanEval(), sandbox) is None


@needs_jdk
def test_eval_refuses_java_without_the_jar(no_jar, tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    args = ["eval", "multipl-e", "--lang", "java", "--model", tiny_model_dir, "--limit", 1, "--out", out]
    code, _, err = cli(*args, "--max-new-tokens", 4, "--data-dir", DATA)
    assert code == 2
    lines = [line for line in err.splitlines() if line.startswith("codellm: error")]
    assert len(lines) == 1 and "cannot run multipl-e-java here" in lines[0] and "javatuples" in lines[0], err
    assert not (out / "samples.jsonl").exists() and not (out / "summary.json").exists()  # refused before generating

    samples = tmp_path / "samples.jsonl"
    samples.write_text(json.dumps({"task_id": toolchain.PROBE_PROBLEM, "completion": "return 1;"}) + "\n")
    code, _, err = cli("eval", "execute", samples, "--task", "multipl-e-java", "--data-dir", DATA)
    assert code == 2 and "cannot run multipl-e-java here" in err and "javatuples" in err, err
    assert not Path(f"{samples}_results.jsonl").exists() and not Path(f"{samples}_summary.json").exists()


@needs_jdk
def test_java_tests_skip_with_the_reason_when_the_jar_is_missing(no_jar):
    """The suite itself, run as `make test` runs it, on a machine with a JDK but no jar: a skip, not a failure."""
    env = {**os.environ, JAVATUPLES.env: no_jar}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-rs", "-p", "no:cacheprovider", "-p", "no:warnings",
         "tests/test_eval_tasks.py::test_multipl_e_hand_solutions[java]"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    skipped = [line for line in proc.stdout.splitlines() if line.startswith("SKIPPED [1] tests/test_eval_tasks.py")]
    assert len(skipped) == 1 and "java: toolchain not usable" in skipped[0], proc.stdout[-3000:]
    assert "javatuples not found" in skipped[0] and JAVATUPLES.env in skipped[0]
