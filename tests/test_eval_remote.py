"""Remote endpoint evaluation end to end: `codellm eval humaneval` against a real `codellm serve` on loopback,
through the OpenAI-compatible and the TGI generators."""

import contextlib
import io
import json

import pytest

from codellm.cli import main
from codellm.eval.execution import STATUSES
from tests.server_fixtures import long_context_copy, shared_server


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    # HumanEval prompts are longer than the tiny model's 256 positions in its small tokenizer
    return shared_server(long_context_copy(tiny_model_dir, tmp_path_factory.mktemp("eval-remote") / "model"))


@pytest.mark.parametrize("api", ["openai", "tgi"])
def test_humaneval_against_a_running_server(server, api, tmp_path):
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        code = main(
            [
                "eval",
                "humaneval",
                "--endpoint",
                server.url,
                "--api",
                api,
                "--limit",
                "2",
                "--max-new-tokens",
                "8",
                "--out",
                str(tmp_path),
            ]
        )
    assert code == 0, err.getvalue()
    samples = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    results = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert [s["task_id"] for s in samples] == ["HumanEval/0", "HumanEval/1"]
    assert len(results) == 2 and all(r["status"] in STATUSES for r in results)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["model"]["kind"] == api and summary["model"]["url"] == server.url
    assert summary["problems"] == 2 and "pass@1" in summary["pass_at_k"]
    route = "/v1/completions" if api == "openai" else "/generate"
    requests = [e for e in server.access_log() if e.get("route") == route and e.get("status") == 200]
    assert len(requests) >= 2, "every problem went to the server"
