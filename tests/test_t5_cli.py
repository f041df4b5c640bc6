"""`codellm` on T5 / CodeT5+ folders written by transformers, as a user runs it (real subprocesses): complete,
infill, generate and embed print what the library computes; chat and the wrong kind of model are one-line
errors; info describes the model."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from codellm.checkpoint import load_model
from codellm.sampling import SamplingParams
from codellm.streaming import collect
from codellm.t5 import generate
from codellm.tokenizer import load_tokenizer
from tests.t5_fixtures import make_codet5_dir, make_codet5_tokenizer

transformers = pytest.importorskip("transformers")


def run(*args, stdin=""):
    return subprocess.run([sys.executable, "-m", "codellm", *map(str, args)], input=stdin, capture_output=True,
                          text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.fixture(scope="module")
def codet5(tmp_path_factory):
    path = make_codet5_dir(tmp_path_factory.mktemp("codet5") / "m")
    return path, load_model(path), load_tokenizer(path)


def test_complete_infill_and_generate_print_the_library_text(codet5, one_thread):
    path, model, tok = codet5
    params = SamplingParams(max_new_tokens=8)
    out = run("complete", "def add(a, b):", "--model", path, "--max-new-tokens", 8)
    assert out.returncode == 0, out.stderr
    assert out.stdout.rstrip("\n") == collect(generate.complete(model, tok, "def add(a, b):", params)).rstrip("\n")
    out = run("infill", "--model", path, "--prefix", "x = ", "--suffix", "\n", "--max-new-tokens", 8, "--show-file")
    assert out.returncode == 0, out.stderr
    middle = collect(generate.infill(model, tok, "x = ", "\n", params))
    assert out.stdout == "x = " + middle + "\n"
    out = run("generate", "--model", path, "--decoder-only", "--max-new-tokens", 8, stdin="class Point:")
    assert out.returncode == 0, out.stderr
    expected = collect(generate.complete(model, tok, "class Point:", params, decoder_only=True))
    assert out.stdout.rstrip("\n") == expected.rstrip("\n")


def test_embed_prints_unit_vectors_and_ranks_by_similarity(tmp_path, codet5, one_thread):
    from tests.test_t5_model import codet5p_embedding_dir

    codet5p_embedding_dir(tmp_path / "embed", vocab_size=96)
    make_codet5_tokenizer(tmp_path / "embed")
    out = run("embed", "--model", tmp_path / "embed", "x")  # a tokenizer larger than the model's vocabulary
    assert out.returncode == 2 and "tokenizer has 309 tokens but the model's vocabulary 96" in out.stderr
    shutil.rmtree(tmp_path / "embed")
    codet5p_embedding_dir(tmp_path / "embed", vocab_size=320)
    make_codet5_tokenizer(tmp_path / "embed")
    texts = ["def add(a, b):", "class Point:", "print(i)"]
    out = run("embed", "--model", tmp_path / "embed", *texts)
    assert out.returncode == 0, out.stderr
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    assert [r["text"] for r in rows] == texts and all(len(r["embedding"]) == 16 for r in rows)
    model, tok = load_model(tmp_path / "embed"), load_tokenizer(tmp_path / "embed")
    expected = generate.embed_texts(model, tok, texts)
    for row, vec in zip(rows, expected.tolist(), strict=True):
        assert row["embedding"] == pytest.approx(vec, abs=2e-6)
    out = run("embed", "--model", tmp_path / "embed", "--query", "class Point", "--top", 2, stdin="\n".join(texts))
    assert out.returncode == 0, out.stderr
    scores = generate.similarity(generate.embed_texts(model, tok, ["class Point"]), expected)[0]
    best = scores.argsort(descending=True)[:2].tolist()
    assert [line.split("\t")[1] for line in out.stdout.splitlines()] == [texts[i] for i in best]


def test_modes_a_model_lacks_are_one_line_errors(tmp_path, codet5, tiny_model_dir):
    path, _, _ = codet5
    out = run("chat", "hello", "--model", path)
    assert out.returncode == 2 and "a T5 / CodeT5+ model has no chat template" in out.stderr
    out = run("embed", "x", "--model", tiny_model_dir)
    assert out.returncode == 2 and "runs T5 / CodeT5+ models; this is a Transformer" in out.stderr
    torch_dir = tmp_path / "enc"
    transformers.T5EncoderModel(transformers.T5Config(vocab_size=320, d_model=16, d_kv=4, d_ff=32, num_layers=1,
                                                      num_heads=4)).save_pretrained(torch_dir)
    make_codet5_tokenizer(torch_dir)
    out = run("generate", "x", "--model", torch_dir)
    assert out.returncode == 2 and "is a encoder model (encoder only): use `codellm embed`" in out.stderr
    out = run("info", "--model", path)
    assert out.returncode == 0, out.stderr
    assert "T5 seq2seq" in out.stdout and "2 / 2" in out.stdout and "tied" in out.stdout
