"""The training loop end to end on CPU: every stage, exact resume (in process and after kill -9),
two processes under torchrun, and the final checkpoint in our loader and in transformers."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from codellm.checkpoint import load_model
from codellm.errors import UserError
from codellm.train import cli
from codellm.train.config import OptimConfig
from codellm.train.loop import lr_at, param_groups
from codellm.train.progress import progress_line
from tests.tokenizer_fixtures import make_sentencepiece_dir
from tests.train_fixtures import make_corpus

REPO = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


# Bitwise-equal losses across processes need equal thread counts (conftest's one_thread).
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("train_data")
    return {"tok": make_sentencepiece_dir(root / "tok"), "corpus": make_corpus(root / "corpus")}


def pretrain_args(data, out, *extra) -> list[str]:
    return ["train", "--stage", "pretrain", "--out", str(out), "--tokenizer", str(data["tok"]), "--model-preset",
            "tiny", "--corpus", str(data["corpus"]), "--seq-len", "64", "--micro-batch-size", "2",
            "--batch-tokens", "256", "--warmup-steps", "2", "--log-every", "1", *extra]


def run(argv: list[str]) -> None:
    assert cli.main(argv) == 0


def losses(run_dir: Path) -> list[tuple[int, float]]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in records if "loss" in r]


@pytest.fixture(scope="module")
def pretrained(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "pretrain"
    run(pretrain_args(data, out, "--steps", "4", "--eval-every", "2", "--eval-batches", "2", "--save-every", "2"))
    return out


def test_pretrain_writes_metrics_checkpoints_and_an_hf_model(pretrained, capsys):
    records = [json.loads(line) for line in (pretrained / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4]
    assert [r["step"] for r in records if "val_loss" in r] == [2, 4]
    assert all(math.isfinite(r.get("loss", r.get("val_loss"))) for r in records)
    config = json.loads((pretrained / "config.json").read_text())
    assert config["stage"] == "pretrain" and config["data"]["fim_rate"] == 0.9 and config["data"]["seq_len"] == 64
    assert [p.name for p in (pretrained / "checkpoints").iterdir()] == ["step_000002"]  # none at the last step
    from transformers import LlamaForCausalLM

    ours = load_model(pretrained / "final")
    theirs = LlamaForCausalLM.from_pretrained(pretrained / "final").eval()
    tokens = torch.randint(0, ours.cfg.vocab_size, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(theirs(tokens).logits, ours(tokens))
    from codellm.cli import main as codellm_main

    assert codellm_main(["complete", "--model", str(pretrained / "final"), "--max-new-tokens", "3", "def"]) == 0


def test_progress_line_format():
    line = progress_line(420, 10000, 2.3141, 3e-4, 61230.4, 0.381, 3900)
    assert line == "step 00420/10000 (4.2%) | loss 2.314 | lr 3.0e-04 | 61,230 tok/s | mfu 38.1% | eta 1h05m"


@pytest.fixture(scope="module")
def long_context(pretrained, data, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "lc"
    run(["train", "--stage", "long-context", "--init", str(pretrained / "final"), "--out", str(out),
         "--corpus", str(data["corpus"]), "--rope-theta", "5e5", "--steps", "2", "--micro-batch-size", "1",
         "--batch-tokens", "256", "--save-every", "0", "--eval-every", "0", "--log-every", "1"])
    return out


def test_long_context_raises_theta_and_context(long_context):
    final = load_model(long_context / "final").cfg
    assert (final.rope_theta, final.max_seq_len) == (5e5, 4 * 64)
    config = json.loads((long_context / "config.json").read_text())
    assert config["data"]["seq_len"] == 256 and config["optim"]["lr"] == 2e-5
    assert len(losses(long_context)) == 2


def test_python_stage_reads_only_python(pretrained, data, tmp_path):
    run(["train", "--stage", "python", "--init", str(pretrained / "final"), "--out", str(tmp_path / "py"),
         "--corpus", str(data["corpus"]), "--steps", "2", "--micro-batch-size", "2", "--batch-tokens", "128",
         "--save-every", "0", "--eval-every", "2", "--eval-batches", "1", "--log-every", "1"])
    config = json.loads((tmp_path / "py" / "config.json").read_text())
    assert config["data"]["langs"] == ["python"] and config["data"]["fim_rate"] == 0.0
    assert (tmp_path / "py" / "final" / "model.safetensors").is_file()


def test_sft_with_user_dialogs_mined_pairs_and_rehearsal(long_context, data, tmp_path, capsys):
    dialogs = tmp_path / "dialogs.jsonl"
    dialogs.write_text(json.dumps({"system": "Be brief.", "messages": [
        {"role": "user", "content": "Add 2 and 3."}, {"role": "assistant", "content": "5"}]}) + "\n")
    run(["train", "--stage", "sft", "--init", str(long_context / "final"), "--out", str(tmp_path / "sft"),
         "--corpus", str(data["corpus"]), "--sft-data", str(dialogs), "--seq-len", "256", "--steps", "2",
         "--micro-batch-size", "2", "--batch-tokens", "512", "--save-every", "0", "--eval-every", "2",
         "--eval-batches", "1", "--log-every", "1"])
    # 16 Python documents, each with 2 functions whose docstrings say what they do (and one that does not)
    assert ("sft data: --sft-data 1 dialog (0 of them longer than a row of 257 tokens) + 32 docstring dialogs "
            "mined from 16 Python documents (0 longer than a row of 257 tokens); 8% of examples are pretraining "
            "documents") in capsys.readouterr().out
    config = json.loads((tmp_path / "sft" / "config.json").read_text())
    assert config["data"]["rehearsal"] == 0.08 and config["optim"]["lr"] == 2e-5
    assert all(0 < loss < 20 for _, loss in losses(tmp_path / "sft"))
    assert load_model(tmp_path / "sft" / "final").cfg.max_seq_len == 256  # the init's context is kept


def test_resume_in_process_repeats_the_loss_curve(data, tmp_path):
    out = tmp_path / "run"
    run(pretrain_args(data, out, "--steps", "6", "--save-every", "2", "--keep-last", "1", "--eval-every", "0"))
    full = losses(out)
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step_000004"]
    crash_after_last_checkpoint(out)
    run(["train", "--resume", "--out", str(out)])  # replays steps 5-6 from the step-4 checkpoint
    assert losses(out) == full


def crash_after_last_checkpoint(out: Path) -> None:
    """The run dir as a run killed just before its end leaves it: no final/ (metrics past the checkpoint stay)."""
    import shutil

    shutil.rmtree(out / "final")


def test_data_worker_processes_resume_exactly(data, tmp_path):
    """--data-workers 2: two processes pack alternate steps; a resumed run repeats the loss curve."""
    out = tmp_path / "run"
    run(pretrain_args(data, out, "--steps", "5", "--save-every", "2", "--keep-last", "1", "--eval-every", "0",
                      "--data-workers", "2"))
    full = losses(out)
    state = json.loads((out / "checkpoints" / "step_000004" / "state.json").read_text())
    assert state["ranks"][0]["data"]["next"] == 0 and len(state["ranks"][0]["data"]["workers"]) == 2
    crash_after_last_checkpoint(out)
    with pytest.raises(UserError, match="would change the run .*: --data-workers 2 -> 3"):
        cli.run_train(cli_args(["train", "--resume", "--out", str(out), "--data-workers", "3"]))
    run(["train", "--resume", "--out", str(out)])
    assert losses(out) == full


def test_time_budget_ends_the_run_and_fits_the_schedule(data, tmp_path):
    out = tmp_path / "run"
    run(pretrain_args(data, out, "--steps", "100000", "--time-budget", "1.5", "--eval-every", "0", "--save-every", "0"))
    info = json.loads((out / "final" / "training.json").read_text())
    assert 2 <= info["steps"] < 100000 and info["train_seconds"] >= 1.5
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["lr"] < 3e-4 / 10  # the cosine reached its floor when the time was up, not at step 100000
    o = OptimConfig(lr=1.0, warmup_steps=0, min_lr_ratio=0.0)
    assert lr_at(5, 100, o, time_done=0.5) == pytest.approx(0.5) and lr_at(60, 100, o, 0.5) < 0.5


def test_val_loss_compares_models_on_the_same_rows(pretrained, data, capsys):
    argv = ["train", "val-loss", str(pretrained / "final"), "--corpus", str(data["corpus"]), "--seq-len", "32",
            "--rows", "2", "--batches", "2", "--device", "cpu", "--json"]
    run(argv)
    run(argv)
    first, second = (json.loads(line) for line in capsys.readouterr().out.splitlines())
    assert first == second and 0 < first["loss"] < 20 and first["tokens"] == 128
    with pytest.raises(UserError, match="exceeds the model's context"):
        cli.run_val_loss(cli_args(argv[:5] + ["--seq-len", "100000", "--device", "cpu"]))


def test_kill_9_then_resume_matches_an_uninterrupted_run(data, tmp_path):
    args = ["--steps", "40", "--save-every", "3", "--eval-every", "0"]
    run(pretrain_args(data, tmp_path / "reference", *args))
    out = tmp_path / "killed"
    child = subprocess.Popen([sys.executable, "-m", "codellm.train.cli", *pretrain_args(data, out, *args)],
                             env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while child.poll() is None and time.monotonic() < deadline:
        metrics = out / "metrics.jsonl"
        if metrics.is_file() and metrics.read_text().count("\n") >= 5:  # checkpoint 3 is on disk
            break
        time.sleep(0.01)
    assert child.poll() is None, f"the run ended before it could be killed: {child.stderr.read().decode()[-500:]}"
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    assert not (out / "final").exists()
    run(["train", "--resume", "--out", str(out)])
    assert losses(out) == losses(tmp_path / "reference")


@pytest.mark.slow
@pytest.mark.parametrize("sharding", ["ddp", "fsdp"])
def test_torchrun_two_processes(data, tmp_path, sharding):
    out = tmp_path / sharding
    torchrun = Path(sys.executable).with_name("torchrun")
    argv = pretrain_args(data, out, "--steps", "2", "--save-every", "1", "--eval-every", "2", "--eval-batches", "1",
                         "--batch-tokens", "512", *(["--fsdp"] if sharding == "fsdp" else []))
    proc = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "codellm.train.cli", *argv],
                          env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    state = json.loads((out / "checkpoints" / "step_000001" / "state.json").read_text())
    assert state["world"] == 2 and len(state["ranks"]) == 2
    assert len(losses(out)) == 2 and proc.stdout.count("step 0000") == 2  # rank 0 alone prints
    assert load_model(out / "final").cfg.vocab_size > 0


def test_plot_writes_a_png(pretrained, tmp_path):
    pytest.importorskip("matplotlib")
    run(["train", "plot", str(pretrained), "--png", str(tmp_path / "loss.png")])
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_resume_refuses_changes_allows_more_steps_and_plots_the_resume(data, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    out = tmp_path / "run"
    run(pretrain_args(data, out, "--steps", "4", "--save-every", "2", "--eval-every", "0"))
    start = capsys.readouterr().out.splitlines()[0]
    assert "| rope theta 1e+06 |" in start, start  # the tiny preset's theta
    with pytest.raises(UserError, match="is complete .*step 4 of 4.*--init .*final"):
        cli.run_train(cli_args(["train", "--resume", "--out", str(out)]))
    crash_after_last_checkpoint(out)
    for flags, shown in ((["--lr", "1e-3"], "--lr 0.0003 -> 0.001"), (["--batch-tokens", "512"], "--batch-tokens"),
                         (["--seq-len", "32"], "--seq-len 64 -> 32"),
                         (["--seed", "1", "--steps", "8"], "--seed 0 -> 1")):
        with pytest.raises(UserError, match=f"would change the run in .*: {shown}"):
            cli.run_train(cli_args(["train", "--resume", "--out", str(out), *flags]))
    with pytest.raises(UserError, match="latest checkpoint is already at step 2"):
        cli.run_train(cli_args(["train", "--resume", "--out", str(out), "--steps", "2"]))
    run(["train", "--resume", "--out", str(out), "--steps", "6", "--lr", "3e-4", "--log-every", "1"])  # same lr
    err = capsys.readouterr().err
    assert "--steps 4 -> 6: the cosine schedule now ends at step 6" in err, err
    assert [s for s, _ in losses(out)] == [1, 2, 3, 4, 5, 6]
    assert json.loads((out / "config.json").read_text())["steps"] == 6
    from codellm.train.plot import figure

    fig = figure(out)
    ax_loss = fig.axes[0]
    assert ax_loss.get_title() == "run: pretrain of tiny preset, from scratch"
    assert [line.get_xdata()[0] for line in ax_loss.get_lines() if line.get_label() == "resumed"] == [2]
    assert any(ax.get_xlabel() == "tokens" for ax in ax_loss.child_axes)


def test_short_runs_warn_and_seq_len_stays_within_the_context(data, tmp_path, capsys):
    run(pretrain_args(data, tmp_path / "short", "--steps", "2", "--warmup-steps", "5", "--batch-tokens", "128",
                      "--eval-every", "0", "--save-every", "0"))
    err = capsys.readouterr().err
    assert "warning: --warmup-steps 5 is all of --steps 2: the learning rate never reaches its peak" in err, err
    assert "preset's" not in err  # --batch-tokens was given
    from codellm.train.config import TrainConfig, short_run_warnings

    cfg = TrainConfig.for_stage("pretrain", out="x", corpus="c", tokenizer="t", steps=5)
    warned = short_run_warnings(cfg, {"steps"})
    assert len(warned) == 2 and "262,144-token batches" in warned[1] and "--warmup-steps 1000" in warned[0]
    assert short_run_warnings(TrainConfig.for_stage("pretrain", out="x", corpus="c", tokenizer="t"), set()) == []
    with pytest.raises(UserError, match="--seq-len 512 exceeds the tiny preset's context 256; .*long-context"):
        cli.run_train(cli_args(pretrain_args(data, tmp_path / "long", "--steps", "1", "--seq-len", "512",
                                             "--batch-tokens", "1024")))


def test_schedule_and_weight_decay_groups():
    o = OptimConfig(lr=3e-4, warmup_steps=10)
    assert lr_at(0, 100, o) == pytest.approx(3e-5) and lr_at(9, 100, o) == pytest.approx(3e-4)
    assert lr_at(10, 100, o) == pytest.approx(3e-4) and lr_at(100, 100, o) == pytest.approx(1e-5)
    assert all(lr_at(s + 1, 100, o) <= lr_at(s, 100, o) for s in range(10, 100))
    from codellm.config import ModelConfig
    from codellm.model import Transformer

    model = Transformer(ModelConfig.from_preset("tiny"))
    decay, rest = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    assert {names[id(p)] for p in rest["params"]} == {n for n, _ in model.named_parameters()
                                                      if "norm" in n or n == "embed_tokens.weight"}
    assert decay["weight_decay"] == 0.1 and rest["weight_decay"] == 0.0


def test_user_errors(data, tmp_path, pretrained):
    with pytest.raises(UserError, match="batch-tokens 300 must be a multiple"):
        cli.run_train(cli_args(pretrain_args(data, tmp_path / "a", "--steps", "1", "--batch-tokens", "300")))
    with pytest.raises(UserError, match="already holds a run; pass --resume"):
        cli.run_train(cli_args(pretrain_args(data, pretrained, "--steps", "1")))
    with pytest.raises(UserError, match="--init"):
        cli.run_train(cli_args(["train", "--stage", "sft", "--out", str(tmp_path / "b"), "--corpus", "x"]))


def cli_args(argv: list[str]):
    import argparse

    parser = argparse.ArgumentParser()
    cli.add_parser(parser.add_subparsers())
    return parser.parse_args(argv)


def test_help_lists_stages_and_plot(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train", "--help"])
    out = capsys.readouterr().out
    assert exit_info.value.code == 0 and "pretrain,long-context,python,sft" in out and "plot" in out
