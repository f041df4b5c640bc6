"""Training codellm's byte-level BPE tokenizer: output files, special ids, HF compatibility, errors."""

import pytest
from transformers import AutoTokenizer

from codellm.errors import UserError
from codellm.tokenizer import load_tokenizer
from codellm.tokenizer_train import SPECIAL_TOKENS, train_tokenizer
from tests.tokenizer_fixtures import CORPUS

CODE = "def naïve(x):\n    return x * 1234  # 日本語 🙂 𝔘\n\tpass\r\n"


@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory):
    return train_tokenizer([CORPUS] * 4, tmp_path_factory.mktemp("bpe") / "tok", vocab_size=400,
                           show_progress=False)


def test_writes_hf_files_and_special_ids_first(bpe_dir):
    assert sorted(p.name for p in bpe_dir.iterdir()) == [
        "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json"]
    tok = load_tokenizer(bpe_dir)
    assert [tok.pad_id, tok.bos_id, tok.eos_id, tok.prefix_id, tok.suffix_id, tok.middle_id, tok.eot_id] == [
        tok.piece_to_id(t) for t in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))
    assert tok.vocab_size <= 400


def test_round_trips_any_text(bpe_dir):
    tok = load_tokenizer(bpe_dir)
    for text in (CODE, CORPUS, " leading", "\x00\x7f"):
        assert tok.decode(tok.encode(text)) == text
        assert tok.encode(text) == tok.encode_nospace(text)  # byte-level BPE adds no implicit space


def test_digits_are_single_tokens(bpe_dir):
    tok = load_tokenizer(bpe_dir)
    assert len(tok.encode("1234567890")) == 10


def test_transformers_autotokenizer_loads_it(bpe_dir):
    ours = load_tokenizer(bpe_dir)
    hf = AutoTokenizer.from_pretrained(bpe_dir)
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (ours.bos_id, ours.eos_id, ours.pad_id)
    assert hf(CODE)["input_ids"] == ours.encode(CODE, bos=True)
    assert hf.decode(ours.encode(CODE)) == CODE
    infill = hf.convert_tokens_to_ids(["<PRE>", "<SUF>", "<MID>", "<EOT>"])
    assert infill == [ours.prefix_id, ours.suffix_id, ours.middle_id, ours.eot_id]


def test_trains_from_files_into_an_existing_directory(tmp_path):
    files = []
    for k in range(3):
        files.append(tmp_path / f"src{k}.py")
        files[-1].write_text(CORPUS + f"# file {k}\n", encoding="utf-8")
    out = tmp_path / "ckpt"
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"weights")
    train_tokenizer(files, out, vocab_size=300, show_progress=False)
    assert (out / "model.safetensors").read_bytes() == b"weights"
    assert load_tokenizer(out).decode(load_tokenizer(out).encode(CODE)) == CODE
    # the temporary directory is gone
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "src0.py", "src1.py", "src2.py"]


def test_errors(tmp_path):
    with pytest.raises(UserError, match="vocab_size must be at least 264, got 100"):
        train_tokenizer([CORPUS], tmp_path / "a", vocab_size=100)
    with pytest.raises(UserError, match="empty"):
        train_tokenizer(iter(["", ""]), tmp_path / "b", show_progress=False)
    missing = tmp_path / "nope.py"
    with pytest.raises(UserError, match=str(missing)):
        train_tokenizer([missing], tmp_path / "c", show_progress=False)
    assert list(tmp_path.iterdir()) == []
