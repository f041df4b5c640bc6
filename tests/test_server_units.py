"""Server pieces that need no running server: API keys, SageMaker attributes and EULA gating, the infilling
prompt budget, request-schema messages, and `codellm serve` option errors."""

from __future__ import annotations

import pytest

from codellm import formats
from codellm.cli import main
from codellm.prompt_rules import context_text, keep_end, keep_start
from codellm.server import auth
from codellm.server.errors import ApiError
from codellm.server.prompts import infill_with_context, sampling
from codellm.server.schemas import CompletionRequest, TGIRequest, parse


def test_bearer_keys():
    keys = [b"alpha", b"beta"]
    assert auth.authorized([], None)
    assert auth.authorized(keys, "Bearer beta") and auth.authorized(keys, "bearer alpha")
    for header in (None, "", "Bearer", "Bearer gamma", "Basic alpha", "alpha", "Bearer alphaX"):
        assert not auth.authorized(keys, header), header


def test_key_files(tmp_path):
    f = tmp_path / "keys"
    f.write_text("# team keys\n\nk1\n  k2  \n")
    assert auth.load_keys(["k0"], [f]) == [b"k0", b"k1", b"k2"]
    (tmp_path / "empty").write_text("# nothing\n")
    with pytest.raises(Exception, match="no key"):
        auth.load_keys([], [tmp_path / "empty"])
    with pytest.raises(Exception, match="missing"):
        auth.load_keys([], [tmp_path / "missing"])


def test_custom_attributes():
    parse_ = auth.custom_attributes
    assert parse_("accept_eula=true; a=1,b = 2") == {"accept_eula": "true", "a": "1", "b": "2"}
    assert parse_("accept_eula=true;accept_eula=false")["accept_eula"] == "false"  # last wins
    assert parse_("Accept_EULA=True") == {"accept_eula": "True"} and auth.eula_accepted("Accept_EULA=True")
    assert parse_(None) == {} and parse_("junk;=x") == {}
    assert not auth.eula_accepted("accept_eula=false, x=1") and auth.eula_accepted("x=1, accept_eula=true")


@pytest.mark.parametrize(
    ("card", "gated"),
    [
        ("---\nlicense: llama2\n---\n# Code Llama\n", True),
        ("---\nlicense: apache-2.0\nextra_gated_prompt: accept the licence\n---\n", True),
        ("---\nlicense: apache-2.0\n---\nlicense: llama2 (not front matter)\n", False),
        ("# no front matter\nlicense: llama2\n", False),
    ],
)
def test_eula_required_from_the_model_card(tmp_path, card, gated):
    (tmp_path / "README.md").write_text(card)
    assert auth.eula_required(tmp_path) is gated


def test_keep_end_and_start_cut_at_lines(sp):
    text = "".join(f"line_{i} = {i}\n" for i in range(40))
    tail = keep_end(sp, text, 30)
    assert text.endswith(tail) and tail.startswith("line_") and len(sp.encode(tail)) <= 30
    head = keep_start(sp, text, 30)
    assert text.startswith(head) and head.endswith("\n") and len(sp.encode_nospace(head)) <= 30
    assert keep_end(sp, text, 0) == "" and keep_end(sp, text, 10_000) == text


def test_infill_with_context_fits_the_budget_and_keeps_the_gap(sp):
    prefix = "".join(f"a{i} = {i}\n" for i in range(60)) + "def f():\n    "
    suffix = "\n    return 1\n" + "".join(f"b{i} = {i}\n" for i in range(60))
    extra = [("util.py", "def g():\n    return 2\n")]
    ids, truncated = infill_with_context(sp, "def f():\n    ", "\n    return 1\n", "psm", extra, budget=200)
    assert not truncated
    assert ids == formats.infill_prompt(sp, context_text(extra) + "def f():\n    ", "\n    return 1\n")
    for order in ("psm", "spm"):
        ids, truncated = infill_with_context(sp, prefix, suffix, order, extra * 20, budget=120)
        assert truncated and len(ids) <= 120
        text = sp.decode(ids)
        assert "def f():" in text and "return 1" in text  # the text at the gap survives
        assert "a0 = 0" not in text and "b59 = 59" not in text  # the far ends go first


def test_sampling_maps_openai_ranges():
    assert sampling(max_new_tokens=4, temperature=1e-9).greedy
    p = sampling(max_new_tokens=4, temperature=0.5, top_p=None, top_k=-1)
    assert p.top_p == 1.0 and p.top_k == 0 and p.seed is not None  # a sampled request gets a seed to report
    assert sampling(max_new_tokens=4, temperature=0.0, seed=3).seed is None


def test_schema_errors_name_the_field():
    with pytest.raises(ApiError) as e:
        parse(TGIRequest, {"inputs": "x", "parameters": {"top_p": 0}})
    assert e.value.param == "parameters.top_p" and "greater than 0" in e.value.message
    with pytest.raises(ApiError) as e:
        parse(CompletionRequest, {"prompt": [1, "a"]})
    assert e.value.param == "prompt"
    with pytest.raises(ApiError) as e:
        parse(CompletionRequest, [])
    assert e.value.param == "body"
    assert parse(CompletionRequest, {"prompt": "x", "stop": "\n", "stream": None}).stop == ["\n"]


@pytest.mark.parametrize(
    "args",
    [
        ["--api-key-file", "/nonexistent/keys.txt"],
        ["--port", "70000"],
        ["--max-concurrent-requests", "0"],
        ["--api-key", "has space"],
        ["--max-best-of", "0"],
        ["--served-model-name", " "],
    ],
)
def test_serve_option_errors_are_one_line(args, capsys):
    assert main(["serve", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("codellm: error: ") and err.count("\n") == 1
