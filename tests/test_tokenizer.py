"""Tokenizer loading, special ids, leading-space handling and incremental decoding, for both backends."""

import pytest
from transformers import CodeLlamaTokenizerFast, LlamaTokenizerFast

from codellm.errors import UserError
from codellm.tokenizer import HFTokenizer, SentencePieceTokenizer, load_tokenizer
from tests.tokenizer_fixtures import CORPUS, make_bpe_dir, make_sentencepiece_dir

TEXTS = [
    "def f(x):\n    return x + 1\n",
    "    indented = True",
    " leading space",
    "trailing space ",
    "\n\nblank lines\n",
    "naïve café = '日本' + '漢字𝔘'  # 🙂",
    "x",
    "",
]


def test_load_errors_name_the_path(tmp_path):
    with pytest.raises(UserError, match=str(tmp_path / "missing")):
        load_tokenizer(tmp_path / "missing")
    with pytest.raises(UserError, match=f"{tmp_path}.*neither tokenizer.json nor tokenizer.model"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.model").write_bytes(b"not a model")
    with pytest.raises(UserError, match="tokenizer.model"):
        load_tokenizer(tmp_path)


def test_tokenizer_json_is_preferred(tmp_path):
    make_sentencepiece_dir(tmp_path)
    assert isinstance(load_tokenizer(tmp_path), SentencePieceTokenizer)
    make_bpe_dir(tmp_path)
    assert isinstance(load_tokenizer(tmp_path), HFTokenizer)


def test_sentencepiece_special_ids_come_from_the_model(sp):
    assert (sp.bos_id, sp.eos_id, sp.pad_id) == (1, 2, None)
    pieces = [sp.piece_to_id(p) for p in ("▁<PRE>", "▁<SUF>", "▁<MID>", "▁<EOT>")]
    assert [sp.prefix_id, sp.suffix_id, sp.middle_id, sp.eot_id] == pieces
    assert None not in pieces and sp.has_infilling
    assert sp.piece_to_id("<NOT_A_PIECE>") is None
    assert {sp.bos_id, sp.eos_id, *pieces} <= sp.special_ids


def test_bpe_special_ids(bpe):
    ids = (bpe.pad_id, bpe.bos_id, bpe.eos_id, bpe.prefix_id, bpe.suffix_id, bpe.middle_id, bpe.eot_id)
    assert ids == tuple(range(7))
    assert bpe.special_ids == set(range(7))


def test_encode_adds_bos_and_eos_on_request(tok):
    plain = tok.encode("x = 1")
    assert tok.encode("x = 1", bos=True, eos=True) == [tok.bos_id, *plain, tok.eos_id]


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip(tok, text):
    assert tok.decode(tok.encode(text)) == text
    assert tok.decode_continuation(tok.encode_nospace(text)) == text


def test_sentencepiece_leading_space_rules(sp):
    # encode adds the implicit space, encode_nospace does not; decode drops it, decode_continuation keeps it.
    assert sp.encode("return") == sp.encode_nospace(" return")
    assert sp.encode("return") != sp.encode_nospace("return")
    assert sp.decode(sp.encode_nospace(" return")) == "return"
    assert sp.decode_continuation(sp.encode_nospace(" return")) == " return"


def test_decode_skips_special_tokens(tok):
    ids = [tok.bos_id, tok.prefix_id, *tok.encode_nospace("a = 1"), tok.eot_id, tok.eos_id]
    assert tok.decode(ids) == "a = 1"
    assert all(tok.is_special(i) for i in (tok.bos_id, tok.eos_id, tok.prefix_id, tok.eot_id))


def test_literal_special_token_text_stays_text(bpe):
    assert bpe.decode(bpe.encode("<s><PRE>x</s>")) == "<s><PRE>x</s>"
    assert not set(bpe.encode("<s><PRE>x</s>")) & bpe.special_ids


@pytest.mark.parametrize("converter", ["codellama_fast", "llama_fast_metaspace"])
def test_tokenizer_json_of_a_sentencepiece_model_encodes_like_it(sp, tmp_path, converter):
    # HF converts Code Llama to tokenizer.json in two styles (Prepend normalizer; Metaspace "first");
    # both must give SentencePiece's ids, also for text that starts with a space.
    vocab_file = str(make_sentencepiece_dir(tmp_path / "sp") / "tokenizer.model")
    if converter == "codellama_fast":
        hf = CodeLlamaTokenizerFast(vocab_file=vocab_file, from_slow=True)
    else:
        hf = LlamaTokenizerFast(vocab_file=vocab_file, from_slow=True, legacy=False, add_prefix_space=True)
    hf.save_pretrained(tmp_path / "json")
    tok = load_tokenizer(tmp_path / "json")
    assert isinstance(tok, HFTokenizer)
    for name in ("bos_id", "eos_id", "prefix_id", "suffix_id", "middle_id", "eot_id"):
        assert getattr(tok, name) == getattr(sp, name)
    for text in [*TEXTS, CORPUS]:
        assert tok.encode(text) == sp.encode(text), text
        assert tok.encode_nospace(text) == sp.encode_nospace(text), text
        assert tok.decode(sp.encode(text)) == sp.decode(sp.encode(text)), text


def stream(tok, ids):
    decoder = tok.stream_decoder()
    deltas = [decoder.push(i) for i in ids]
    return deltas + [decoder.flush()]


def test_stream_never_splits_a_character(tok):
    text = " s = '漢字𝔘' + 'naïve'  # 🙂\n"
    ids = tok.encode_nospace(text)
    pieces = [tok.decode_continuation([i]) for i in ids]
    assert any("\ufffd" in p for p in pieces)  # the test needs a character spread over several tokens
    deltas = stream(tok, ids)
    assert not any("\ufffd" in d for d in deltas)
    assert "".join(deltas) == text == tok.decode_continuation(ids)


def test_stream_keeps_leading_space_and_skips_special_tokens(tok):
    ids = tok.encode_nospace(" return x")
    deltas = stream(tok, [tok.middle_id, *ids, tok.eot_id, tok.eos_id])
    assert next(d for d in deltas if d).startswith(" ")
    assert "".join(deltas) == " return x"


def test_stream_matches_full_decode_token_by_token(tok):
    ids = tok.encode_nospace(CORPUS)
    deltas = stream(tok, ids)
    assert "".join(deltas) == CORPUS
    assert sum(1 for d in deltas if d) > len(ids) // 2  # text flows out as it comes, not at flush


def test_flush_returns_an_unfinished_character(tok):
    ids = tok.encode_nospace("漢")
    decoder = tok.stream_decoder()
    assert [decoder.push(i) for i in ids[:-1]] == [""] * (len(ids) - 1)
    assert decoder.flush() == tok.decode_continuation(ids[:-1]) != ""


def test_stream_decodes_a_bounded_window(tok, monkeypatch):
    decoded_lengths = []
    decode = tok._decode
    monkeypatch.setattr(tok, "_decode", lambda ids: decoded_lengths.append(len(ids)) or decode(ids))
    assert "".join(stream(tok, tok.encode_nospace(CORPUS * 3))) == CORPUS * 3
    assert max(decoded_lengths) <= 8  # per-token cost does not grow with the output


def test_stream_gives_up_on_invalid_utf8(sp):
    ids = [sp.piece_to_id("<0xE6>")] * 40  # lead bytes that never complete a character
    deltas = stream(sp, ids)
    assert any(deltas[:-1])  # emitted before flush, as U+FFFD
    assert "".join(deltas) == sp.decode_continuation(ids)
