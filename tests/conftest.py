"""Shared fixtures: a tiny model directory (random weights + a small SentencePiece tokenizer) in the
Hugging Face layout, built once per session, like a real Code Llama download but seconds to make."""

import os
import shutil

import pytest
import torch

from codellm.checkpoint import save_model
from codellm.config import ModelConfig
from codellm.model import Transformer
from codellm.tokenizer import load_tokenizer
from tests.tokenizer_fixtures import make_bpe_dir, make_sentencepiece_dir

torch.set_num_threads(2)

# `--compile` / Engine(compile=True) builds the native decode step with the machine's C++ compiler
needs_cxx = pytest.mark.skipif(shutil.which(os.environ.get("CXX", "g++")) is None,
                               reason="no C++ compiler ($CXX or g++) to build the native decode step")


def tiny_model(vocab_size: int, seed: int = 0, **overrides) -> Transformer:
    cfg = ModelConfig.from_preset("tiny", vocab_size=vocab_size, **overrides)
    # a larger init than training uses makes greedy choices decisive (no near-ties between two tokens)
    return Transformer(cfg).init_weights(seed=seed, std=0.3).eval()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_model")
    tok_dir = make_sentencepiece_dir(root / "tokenizer")
    tok = load_tokenizer(tok_dir)
    return save_model(tiny_model(tok.vocab_size), root / "model", tokenizer_dir=tok_dir)


@pytest.fixture
def one_thread():
    """One torch thread for the test: tiny models run fastest that way on a shared machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# Both tokenizer kinds codellm supports, for tests that must hold for each (a module may override `sp`).
@pytest.fixture(scope="session")
def sp(tmp_path_factory):
    return load_tokenizer(make_sentencepiece_dir(tmp_path_factory.mktemp("sp")))


@pytest.fixture(scope="session")
def bpe(tmp_path_factory):
    return load_tokenizer(make_bpe_dir(tmp_path_factory.mktemp("bpe")))


@pytest.fixture(params=["sp", "bpe"])
def tok(request):
    return request.getfixturevalue(request.param)


def decode_against_forward(model, make_step, prompts):
    """Each prompt in its own slot row, then one token a row at different positions through
    `make_step(model, cache)(tokens, positions)` and through the model's forward from the same cache:
    -> (step logits, forward logits, the cache after the step, the keys/values the forward stored)."""
    from codellm.engine import SlotKVCache

    cache = SlotKVCache(model.cfg, n_slots=4, max_len=64)
    with torch.inference_mode():
        for row, p in enumerate(prompts):
            model(torch.tensor([p]), torch.arange(len(p))[None], cache.view(row, row + 1))
        before = (cache.k.clone(), cache.v.clone())
        tokens, positions = list(range(5, 5 + len(prompts))), [len(p) for p in prompts]
        want = model(torch.tensor(tokens)[:, None], torch.tensor(positions)[:, None], cache.view(0, len(prompts)))[:, 0]
        after = (cache.k.clone(), cache.v.clone())
        cache.k[:], cache.v[:] = before  # forget what the forward stored
        got = make_step(model, cache)(tokens, positions)
    return got, want, cache, after
