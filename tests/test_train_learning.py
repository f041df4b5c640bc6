"""Training learns: on a learnable toy task (a repetitive corpus, and dialogs adding small numbers) every
stage's loss falls well below where it started. Loss values that are only finite, in a range, or equal to
another run's would also pass with the optimizer step removed; these would not."""

import json
from pathlib import Path

import pytest

from codellm.checkpoint import save_model
from codellm.config import ModelConfig
from codellm.model import Transformer
from codellm.tokenizer import load_tokenizer
from codellm.train import cli
from tests.tokenizer_fixtures import make_sentencepiece_dir
from tests.train_fixtures import make_corpus

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS = 50
START_TO_END = 0.5  # the last steps' mean loss must be under half the first step's (measured: ~0.25)


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    root = tmp_path_factory.mktemp("learn")
    tok_dir = make_sentencepiece_dir(root / "tok")
    tok = load_tokenizer(tok_dir)
    # an untrained model for the stages that continue one, so each starts at a random model's loss
    cfg = ModelConfig.from_preset("tiny", vocab_size=tok.vocab_size, bos_id=tok.bos_id, eos_id=tok.eos_id)
    init = save_model(Transformer(cfg.replace(max_seq_len=64)).init_weights(0), root / "init", tokenizer_dir=tok_dir)
    dialogs = root / "dialogs.jsonl"
    dialogs.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"Add {a} and {b}."},
                                                        {"role": "assistant", "content": str(a + b)}]}) + "\n"
                               for a in range(5) for b in range(5)))
    return {"tok": tok_dir, "corpus": make_corpus(root / "corpus"), "init": init, "dialogs": dialogs}


STAGE_ARGS = {
    "pretrain": lambda t: ["--tokenizer", t["tok"], "--model-preset", "tiny", "--seq-len", "64",
                           "--batch-tokens", "256"],
    "long-context": lambda t: ["--init", t["init"], "--batch-tokens", "512"],  # 4 x 64 context, theta 1e6
    "python": lambda t: ["--init", t["init"], "--seq-len", "64", "--batch-tokens", "256"],
    "sft": lambda t: ["--init", t["init"], "--seq-len", "64", "--batch-tokens", "256", "--sft-data", t["dialogs"]],
}


@pytest.mark.parametrize("stage", list(STAGE_ARGS))
def test_every_stage_learns_a_toy_task(toy, tmp_path, stage):
    out = tmp_path / stage
    argv = ["train", "--stage", stage, "--out", out, "--corpus", toy["corpus"], "--steps", STEPS, "--lr", "5e-3",
            "--warmup-steps", "2", "--micro-batch-size", "2", "--log-every", "1", "--eval-every", "0",
            "--save-every", "0", *STAGE_ARGS[stage](toy)]
    assert cli.main([str(a) for a in argv]) == 0
    losses = [json.loads(line)["loss"] for line in (Path(out) / "metrics.jsonl").read_text().splitlines()
              if "loss" in line]
    assert len(losses) == STEPS
    first, last = losses[0], sum(losses[-5:]) / 5
    assert last < START_TO_END * first, f"{stage}: loss {first:.3f} at step 1, {last:.3f} over the last 5 steps"
