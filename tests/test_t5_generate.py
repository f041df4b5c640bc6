"""T5 inference modes (codellm/t5/generate.py): greedy generation equals transformers' generate, seeded
sampling is reproducible, rows leave a batch independently, span infilling, decoder-only mode, embeddings."""

import pytest
import torch

from codellm.checkpoint import load_model
from codellm.errors import UserError
from codellm.sampling import SamplingParams
from codellm.streaming import collect
from codellm.t5 import generate
from codellm.tokenizer import load_tokenizer
from tests.t5_fixtures import make_codet5_dir

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")  # tiny matmuls: threads only contend


@pytest.fixture(scope="module")
def codet5(tmp_path_factory):
    path = make_codet5_dir(tmp_path_factory.mktemp("codet5") / "m")
    return path, load_model(path), load_tokenizer(path)


SOURCES = ["def add(a, b):\n    return a + b\n", "class Point:", "for i in range(10):\n    print(i)"]


def test_greedy_generation_equals_transformers(codet5):
    path, model, tok = codet5
    hf = transformers.T5ForConditionalGeneration.from_pretrained(path).eval()
    sources = [generate.encoder_ids(tok, s) for s in SOURCES]
    ours = generate.generate(model, sources, SamplingParams(max_new_tokens=12), {model.cfg.eos_id})
    ids, mask = generate.pad_batch(sources, 0, "cpu")
    out = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False, num_beams=1)
    for row, tokens in enumerate(ours):
        expected = out[row, 1:].tolist()  # after the decoder start token; padded after EOS
        if model.cfg.eos_id in expected:
            expected = expected[:expected.index(model.cfg.eos_id) + 1]
        assert tokens == expected
    assert len({tuple(t) for t in ours}) > 1  # not one degenerate answer for every input


def test_batched_rows_equal_single_requests_and_seeds_repeat(codet5):
    _, model, tok = codet5
    sources = [generate.encoder_ids(tok, s) for s in SOURCES]
    params = SamplingParams(max_new_tokens=10, temperature=1.0, top_k=20, seed=7)
    stop = {model.cfg.eos_id, tok.piece_to_id("<extra_id_1>")}  # more stops: rows end at different steps
    batched = generate.generate(model, sources, params, stop)
    assert batched == generate.generate(model, sources, params, stop)
    for i, source in enumerate(sources):  # row i samples with seed + i, whatever else is in the batch
        alone = generate.generate(model, [source], SamplingParams(**{**params.__dict__, "seed": 7 + i}), stop)
        assert alone[0] == batched[i]
    other = generate.generate(model, sources, SamplingParams(**{**params.__dict__, "seed": 8}), stop)
    assert other != batched


def test_repetition_penalty_changes_greedy_choice(codet5):
    _, model, tok = codet5
    source = [generate.encoder_ids(tok, SOURCES[0])]
    plain = generate.generate(model, source, SamplingParams(max_new_tokens=16), set())[0]
    assert len(set(plain)) < len(plain)  # the random model repeats itself
    penalised = generate.generate(model, source, SamplingParams(max_new_tokens=16, repetition_penalty=5.0), set())
    assert penalised[0] != plain


def test_infill_reads_prefix_sentinel_suffix_and_returns_the_span(codet5):
    _, model, tok = codet5
    params = SamplingParams(max_new_tokens=8)
    text = collect(generate.infill(model, tok, "def add(a, b):\n    return ", "\n", params))
    # the same request by hand: the decoder starts <extra_id_0> and the next sentinel ends the span
    s0 = tok.piece_to_id("<extra_id_0>")
    source = [tok.bos_id] + tok.encode("def add(a, b):\n    return ") + [s0] + tok.encode("\n") + [tok.eos_id]
    marks = set(generate.sentinels(tok)) - {s0}
    ids = generate.generate(model, [source], params, marks | {model.cfg.eos_id}, [[s0]])[0]
    assert text == tok.decode([i for i in ids if i not in marks | {model.cfg.eos_id}])


def test_decoder_only_mode_feeds_clm_to_the_encoder(codet5):
    _, model, tok = codet5
    params = SamplingParams(max_new_tokens=6)
    got = collect(generate.complete(model, tok, "def add(", params, decoder_only=True))
    clm = tok.piece_to_id("[CLM]")
    ids = generate.generate(model, [[clm]], params, {model.cfg.eos_id}, [tok.encode("def add(")])[0]
    assert got == tok.decode([i for i in ids if i != model.cfg.eos_id])
    assert collect(generate.complete(model, tok, "def add(", params)) != got  # the prompt went to the encoder


def test_embeddings_are_unit_vectors_and_padding_does_not_change_them(codet5):
    _, model, tok = codet5
    batch = generate.embed_texts(model, tok, SOURCES)
    alone = torch.cat([generate.embed_texts(model, tok, [s]) for s in SOURCES])
    torch.testing.assert_close(batch, alone)
    torch.testing.assert_close(batch.norm(dim=-1), torch.ones(3))
    assert generate.embed_texts(model, tok, SOURCES, max_len=4).shape == batch.shape
    with pytest.raises(UserError, match="max-length must be > 2"):
        generate.embed_texts(model, tok, SOURCES, max_len=2)
