"""Models codellm saves work with transformers' standard two-liner:
`model.generate(**tokenizer(text, return_tensors="pt"))`."""

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from codellm.checkpoint import load_model, save_model
from codellm.tokenizer import load_tokenizer
from tests.conftest import tiny_model
from tests.tokenizer_fixtures import make_bpe_dir, make_sentencepiece_dir

MODELS = Path(__file__).resolve().parent.parent / "models"


def _two_liner(folder: Path, text: str = "def add(a, b):") -> tuple[list[int], list[int]]:
    """transformers' greedy continuation of `text` (4 tokens) and the prompt's ids."""
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    inputs = tokenizer(text, return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=4, do_sample=False, pad_token_id=model.config.eos_token_id)
    return out[0].tolist(), inputs["input_ids"][0].tolist()


@pytest.mark.parametrize("make_tok", [make_bpe_dir, make_sentencepiece_dir], ids=["bpe", "sentencepiece"])
def test_saved_model_generates_with_the_two_liner(tmp_path, make_tok):
    tok_dir = make_tok(tmp_path / "tok")
    tok = load_tokenizer(tok_dir)
    folder = save_model(tiny_model(tok.vocab_size), tmp_path / "model", tokenizer_dir=tok_dir)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    assert config["model_input_names"] == ["input_ids", "attention_mask"]
    out, prompt = _two_liner(folder)
    assert prompt == tok.encode("def add(a, b):", bos=True)
    # the same greedy tokens as codellm's own model on the same weights
    ours = load_model(folder)
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(4):
            ids.append(int(ours(torch.tensor([ids]))[0, -1].argmax()))
    assert out == ids


def test_save_keeps_a_configured_input_names_list(tmp_path):
    tok_dir = make_bpe_dir(tmp_path / "tok")
    config = json.loads((tok_dir / "tokenizer_config.json").read_text())
    (tok_dir / "tokenizer_config.json").write_text(json.dumps({**config, "model_input_names": ["input_ids"]}))
    folder = save_model(tiny_model(load_tokenizer(tok_dir).vocab_size), tmp_path / "model", tokenizer_dir=tok_dir)
    assert json.loads((folder / "tokenizer_config.json").read_text())["model_input_names"] == ["input_ids"]


@pytest.mark.parametrize("name", ["default", "default-instruct"])
def test_shipped_models_work_with_the_two_liner(name):
    folder = MODELS / name
    if not (folder / "model.safetensors").is_file():
        pytest.skip(f"{folder} is not present")
    out, prompt = _two_liner(folder)
    assert out[:len(prompt)] == prompt and len(out) == len(prompt) + 4
