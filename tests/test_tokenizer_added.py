"""Added tokens of a slow-tokenizer save (`tokenizer.model` + `added_tokens_decoder` / `added_tokens.json`, no
tokenizer.json) are read as transformers reads them: Code Llama's infilling tokens may live there."""

import io
import json
import subprocess
import sys

import pytest
import sentencepiece as spm
import torch
from transformers import AutoTokenizer, CodeLlamaTokenizer

from codellm.checkpoint import save_model
from codellm.errors import UserError
from codellm.formats import infill_prompt
from codellm.tokenizer import load_tokenizer
from tests.conftest import tiny_model
from tests.tokenizer_fixtures import CORPUS

PAIRS = [("def f(x):\n    ", "\n    return y\n"), ("", "return x"), (" leading", "trailing "),
         ("日本 = '", "'  # 漢字𝔘 🙂")]
# (transformers' infilling path skips added-token splitting, its plain path does not; codellm splits in both)
TEXTS = ["a <newtok> b", "<newtok>b", "x<newtok><newtok> <newtok>\n", "plain text", "", " <newtok>"]


def _sentencepiece_without_infilling_pieces() -> bytes:
    """A Llama-like tokenizer.model whose vocabulary lacks ▁<PRE> & co., as Llama 2's does."""
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS.splitlines() * 4), model_writer=model, model_type="bpe", vocab_size=400,
        hard_vocab_limit=False, character_coverage=1.0, byte_fallback=True, split_digits=True,
        allow_whitespace_only_pieces=True, remove_extra_whitespaces=False, normalization_rule_name="identity",
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2)
    return model.getvalue()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """CodeLlamaTokenizer (slow) on that model, with one non-special added token, saved by transformers."""
    root = tmp_path_factory.mktemp("added")
    (root / "tokenizer.model").write_bytes(_sentencepiece_without_infilling_pieces())
    hf = CodeLlamaTokenizer(vocab_file=str(root / "tokenizer.model"), legacy=False)
    hf.add_tokens(["<newtok>"])
    hf.save_pretrained(root / "saved")
    assert not (root / "saved" / "tokenizer.json").exists()
    return root / "saved"


@pytest.fixture(scope="module")
def legacy(saved, tmp_path_factory):
    """The same save without added_tokens_decoder: transformers then reads added_tokens.json."""
    folder = tmp_path_factory.mktemp("legacy")
    for f in saved.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    config = json.loads((saved / "tokenizer_config.json").read_text())
    del config["added_tokens_decoder"]
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize("layout", ["saved", "legacy"])
def test_infilling_ids_match_transformers(layout, request):
    folder = request.getfixturevalue(layout)
    hf = AutoTokenizer.from_pretrained(folder, use_fast=False)
    assert isinstance(hf, CodeLlamaTokenizer)
    ours = load_tokenizer(folder)
    assert ours.has_infilling
    assert (ours.prefix_id, ours.suffix_id, ours.middle_id, ours.eot_id) == \
        (hf.prefix_id, hf.suffix_id, hf.middle_id, hf.eot_id)
    assert ours.vocab_size == len(hf) == 405
    assert {hf.prefix_id, hf.eot_id, hf.bos_token_id} <= ours.special_ids
    for order in ("psm", "spm"):
        for prefix, suffix in PAIRS:
            expected = hf(prefix, suffix=suffix, suffix_first=order == "spm")["input_ids"]
            assert infill_prompt(ours, prefix, suffix, order) == expected, (order, prefix, suffix)


@pytest.mark.parametrize("layout", ["saved", "legacy"])
def test_non_special_added_tokens_split_text_as_transformers_does(layout, request):
    folder = request.getfixturevalue(layout)
    hf = AutoTokenizer.from_pretrained(folder, use_fast=False)
    ours = load_tokenizer(folder)
    newtok = ours.piece_to_id("<newtok>")
    assert newtok == hf.convert_tokens_to_ids("<newtok>") == 404 and newtok not in ours.special_ids
    for text in TEXTS:
        assert ours.encode(text, bos=True) == hf(text)["input_ids"], text
        assert ours.decode(ours.encode(text)) == text
        assert ours.decode_continuation(ours.encode_nospace(text)) == text
    # special added tokens stay text, as for every codellm tokenizer
    assert ours.prefix_id not in ours.encode("a ▁<PRE> b")


def test_stream_decodes_added_tokens(saved):
    ours = load_tokenizer(saved)
    ids = ours.encode_nospace(" a<newtok> b")
    stream = ours.stream_decoder()
    assert "".join(stream.push(i) for i in ids) + stream.flush() == " a<newtok> b"


def test_infill_command_on_a_slow_tokenizer_folder(saved, tmp_path):
    """`codellm infill` runs on a model folder whose infilling tokens are added tokens (the reported defect)."""
    tok = load_tokenizer(saved)
    torch.manual_seed(0)
    folder = save_model(tiny_model(tok.vocab_size), tmp_path / "model", tokenizer_dir=saved)
    assert (folder / "added_tokens.json").read_text() == (saved / "added_tokens.json").read_text()
    out = subprocess.run([sys.executable, "-m", "codellm", "infill", "--model", str(folder), "--prefix", "def f(x):",
                          "--suffix", "\n    return y\n", "--max-new-tokens", "4"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "no infilling tokens" not in out.stderr


def test_malformed_added_tokens_are_clear_errors(saved, tmp_path):
    for f in saved.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    config = json.loads((saved / "tokenizer_config.json").read_text())
    gap = {**config, "added_tokens_decoder": {**config["added_tokens_decoder"], "407": {"content": "<far>"}}}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(gap))
    with pytest.raises(UserError, match="id 405 is missing"):
        load_tokenizer(tmp_path)
    bad = {**config, "added_tokens_decoder": {"x": {"content": "<x>"}}}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(bad))
    with pytest.raises(UserError, match="added_tokens_decoder entry 'x'"):
        load_tokenizer(tmp_path)
    del config["added_tokens_decoder"]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    (tmp_path / "added_tokens.json").write_text('{"<x>": -1}')
    with pytest.raises(UserError, match="added_tokens.json must be an object"):
        load_tokenizer(tmp_path)
