"""`codellm` as a user runs it: real subprocesses on a tiny model directory."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from tests.conftest import needs_cxx

COMMANDS = ["complete", "infill", "chat", "info"]


def run(*args, stdin="", env=None):
    return subprocess.run([sys.executable, "-m", "codellm", *map(str, args)], input=stdin, capture_output=True,
                          text=True, timeout=120, env={**os.environ, **(env or {})})


@pytest.mark.parametrize("command", [None, *COMMANDS])
def test_help(command):
    out = run(*([command] if command else []), "--help")
    assert out.returncode == 0
    assert "usage: codellm" in out.stdout
    if command in ("complete", "infill", "chat"):
        assert "--temperature" in out.stdout and "--model" in out.stdout


def test_complete_end_to_end(tiny_model_dir):
    out = run("complete", "def add(a, b):", "--model", tiny_model_dir, "--max-new-tokens", "12")
    assert out.returncode == 0, out.stderr
    again = run("complete", "--model", tiny_model_dir, "--max-new-tokens", "12", stdin="def add(a, b):")
    assert again.stdout == out.stdout and out.stdout.strip()  # greedy: same text from argument and stdin


@needs_cxx
def test_complete_compiled_equals_eager(tiny_model_dir):
    """`--compile` (the native decode step on a CPU) prints the eager path's greedy text."""
    args = ("complete", "def add(a, b):", "--model", tiny_model_dir, "--max-new-tokens", "12")
    eager, compiled = run(*args), run(*args, "--compile")
    assert compiled.returncode == 0, compiled.stderr
    assert compiled.stdout == eager.stdout and eager.stdout.strip()


def test_compile_without_a_cpp_compiler_is_a_clear_error(tiny_model_dir):
    out = run("complete", "x", "--model", tiny_model_dir, "--compile", env={"CXX": "/no/such/c++"})
    assert out.returncode == 2 and "--compile needs a C++ compiler" in out.stderr and "Traceback" not in out.stderr


def test_infill_end_to_end(tiny_model_dir, tmp_path):
    out = run("infill", "--model", tiny_model_dir, "--prefix", "def f(x):\n    ", "--suffix", "\n    return y\n",
              "--max-new-tokens", "8", "--order", "spm")
    assert out.returncode == 0, out.stderr
    source = tmp_path / "a.py"
    source.write_text("def f(x):\n    <FILL_ME>\n    return y\n")
    filled = run("infill", "--model", tiny_model_dir, "--file", source, "--show-file", "--max-new-tokens", "8")
    assert filled.returncode == 0, filled.stderr
    assert filled.stdout.startswith("def f(x):\n    ") and filled.stdout.endswith("\n    return y\n")


def test_chat_one_shot_and_interactive(tiny_model_dir):
    out = run("chat", "hello", "--system", "be brief", "--model", tiny_model_dir, "--max-new-tokens", "6")
    assert out.returncode == 0, out.stderr
    turns = run("chat", "--model", tiny_model_dir, "--max-new-tokens", "4", stdin="hi\nand again\n")
    assert turns.returncode == 0, turns.stderr
    assert turns.stdout.count("\n") >= 2


def test_info(tiny_model_dir):
    out = run("info", "--model", tiny_model_dir)
    assert out.returncode == 0, out.stderr
    assert "parameters" in out.stdout and "GQA" in out.stdout and "1e+06" in out.stdout
    assert "yes (PRE/SUF/MID/EOT = " in out.stdout
    preset = run("info", "--preset", "codellama-34b")
    assert "64 / 8 (GQA)" in preset.stdout and "16,384 tokens" in preset.stdout


def assert_user_error(out, *fragments):
    assert out.returncode == 2, (out.stdout, out.stderr)
    assert out.stderr.startswith("codellm: error: ") and out.stderr.count("\n") == 1, out.stderr
    assert "Traceback" not in out.stderr
    for fragment in fragments:
        assert fragment in out.stderr


def broken_copy(tiny_model_dir, tmp_path, edit):
    bad = tmp_path / "bad"
    shutil.copytree(tiny_model_dir, bad)
    edit(bad)
    return bad


def test_error_missing_model_dir(tmp_path):
    assert_user_error(run("complete", "x", "--model", tmp_path / "nope"), "does not exist")


def test_error_not_llama(tiny_model_dir, tmp_path):
    def edit(d):
        cfg = json.loads((d / "config.json").read_text())
        cfg.update(model_type="gpt2", architectures=["GPT2LMHeadModel"])
        (d / "config.json").write_text(json.dumps(cfg))

    assert_user_error(run("complete", "x", "--model", broken_copy(tiny_model_dir, tmp_path, edit)),
                      "not an architecture codellm runs; supported: llama")


def _rewrite_weights(d, change):
    from safetensors.torch import load_file, save_file

    tensors = load_file(d / "model.safetensors")
    change(tensors)
    save_file(tensors, d / "model.safetensors")


def test_error_missing_tensor(tiny_model_dir, tmp_path):
    bad = broken_copy(tiny_model_dir, tmp_path,
                      lambda d: _rewrite_weights(d, lambda t: t.pop("model.layers.1.mlp.up_proj.weight")))
    assert_user_error(run("complete", "x", "--model", bad), "missing tensors", "layers.1.mlp.up_proj.weight")


def test_error_shape_mismatch(tiny_model_dir, tmp_path):
    def shrink(t):
        t["model.norm.weight"] = t["model.norm.weight"][:10].clone()

    bad = broken_copy(tiny_model_dir, tmp_path, lambda d: _rewrite_weights(d, shrink))
    assert_user_error(run("complete", "x", "--model", bad), "model.norm.weight", "shape (10,)")


def test_error_prompt_too_long(tiny_model_dir):
    assert_user_error(run("complete", "--model", tiny_model_dir, stdin="x = 1\n" * 400), "context is 256 tokens")


def test_error_bad_sampling_flag(tiny_model_dir):
    assert_user_error(run("complete", "x", "--model", tiny_model_dir, "--top-p", "1.5"), "top_p")


def test_error_infill_cursor_missing(tiny_model_dir, tmp_path):
    source = tmp_path / "a.py"
    source.write_text("no cursor here\n")
    assert_user_error(run("infill", "--model", tiny_model_dir, "--file", source), "<FILL_ME>", "exactly once")


def test_error_no_cuda(tiny_model_dir):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    assert_user_error(run("complete", "x", "--model", tiny_model_dir, "--device", "cuda"), "no CUDA device")


def test_error_empty_prompt_or_message(tiny_model_dir):
    assert_user_error(run("complete", "", "--model", tiny_model_dir), "prompt is empty")
    assert_user_error(run("complete", "--model", tiny_model_dir, stdin=""), "prompt is empty")
    assert_user_error(run("chat", "", "--model", tiny_model_dir), "message is empty")
    assert_user_error(run("chat", "  \n", "--model", tiny_model_dir), "message is empty")
    assert_user_error(run("chat", "--model", tiny_model_dir, stdin=""), "read no message from standard input")
    assert_user_error(run("infill", "--prefix", "", "--model", tiny_model_dir), "--prefix and --suffix are both empty")


def test_error_model_is_a_file(tiny_model_dir):
    weights = tiny_model_dir / "model.safetensors"
    for command in (["complete", "x"], ["info"]):
        assert_user_error(run(*command, "--model", weights), f"--model {weights} is a file, not a directory")


def test_info_counts_parameters_in_billions():
    out = run("info", "--preset", "codellama-34b")
    assert "33,743,970,304 (33.7B)" in out.stdout, out.stdout
    assert "(6.7B)" in run("info", "--preset", "codellama-7b").stdout


def test_readme_shell_examples_turn_backslash_n_into_newlines():
    """A README command line with '\\n' inside plain single quotes would pass a backslash and an n."""
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    commands = [line for line in readme.splitlines() if line.startswith("codellm ")]
    plain = [m for line in commands for m in re.finditer(r"(?<!\$)'([^']*)'", line) if "\\n" in m.group(1)]
    assert not plain, [m.group(0) for m in plain]
    assert any("$'def add(a, b):\\n" in line for line in commands)


def test_make_demo_says_the_model_is_tiny_first():
    from pathlib import Path

    make = (Path(__file__).resolve().parent.parent / "Makefile").read_text()
    recipe = make.split("\ndemo:", 1)[1].split("\n\n", 1)[0].splitlines()[1:]
    assert recipe[0].lstrip().startswith("@echo") and "tiny" in recipe[0] and "--model" in recipe[0], recipe[0]
    assert "codellm" in recipe[1]  # the line comes before any output of the model


def test_readme_training_commands_exist_and_run_in_order():
    """Each `codellm` line of the README's Train block parses as written, and every directory it reads
    (--corpus, --tokenizer, --init, --model, a resumed or plotted run) was written by an earlier line."""
    import shlex
    from pathlib import Path

    from codellm.cli import build_parser

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    block = readme.split("\n## Train\n", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    parser, made, checked = build_parser(), [], 0
    for line in block.splitlines():
        if not line.startswith("codellm "):
            continue
        args = parser.parse_args(shlex.split(line, comments=True)[1:])
        reads = [getattr(args, name, None) for name in ("corpus", "tokenizer", "init", "model", "run_dir")]
        if getattr(args, "resume", False):
            reads.append(args.out)
        for path in (Path(p) for p in reads if p):
            assert any(path == m or m in path.parents for m in made), f"{line!r} reads {path} before it is written"
            checked += 1
        if getattr(args, "out", None) and not getattr(args, "resume", False):
            made.append(Path(args.out))
    assert checked >= 10 and Path("tok") in made and Path("run/sft") in made
