"""Infilling and chat formats: parity with transformers' CodeLlamaTokenizer and Meta's chat_completion."""

import random

import pytest
from transformers import CodeLlamaTokenizer

from codellm.errors import UserError
from codellm.formats import chat_text, chat_tokens, infill_example, infill_prompt, split_document
from codellm.tokenizer import load_tokenizer
from tests.tokenizer_fixtures import CORPUS, make_sentencepiece_dir

# (prefix, suffix); HF only builds an infilling prompt for a non-empty suffix
INFILL_PAIRS = [
    ("def f(x):\n    ", "\n    return y\n"),
    ("", "return x"),
    ("", " \n"),
    (" leading", "trailing "),
    ("  two spaces", "  two spaces"),
    ("x ", " y"),
    ("\n", "\n\n"),
    ("    indented", "\tx"),
    ("print(f\"{i}\")", ")  # café"),
    ("日本 = '", "'  # 漢字𝔘 🙂"),
    ("naïve", "é"),
    (" ", " "),
    ("a" * 30, "b" * 30),
]


@pytest.fixture(scope="module")
def sp_dir(tmp_path_factory):
    return make_sentencepiece_dir(tmp_path_factory.mktemp("sp"))


@pytest.fixture(scope="module")
def sp(sp_dir):
    return load_tokenizer(sp_dir)


@pytest.mark.parametrize("order", ["psm", "spm"])
def test_infill_prompt_matches_transformers_codellama(sp, sp_dir, order):
    hf = CodeLlamaTokenizer(vocab_file=str(sp_dir / "tokenizer.model"), legacy=False)
    for prefix, suffix in INFILL_PAIRS:
        expected = hf(prefix, suffix=suffix, suffix_first=order == "spm")["input_ids"]
        assert infill_prompt(sp, prefix, suffix, order) == expected, (prefix, suffix)


def test_infill_prompt_with_empty_suffix(sp):
    # transformers falls back to plain encoding here; Meta's layout still applies
    assert infill_prompt(sp, "x = ", "") == [sp.bos_id, sp.prefix_id, *sp.encode("x = "), sp.suffix_id,
                                             sp.middle_id]
    assert infill_prompt(sp, "x = ", "", "spm") == [sp.bos_id, sp.prefix_id, sp.suffix_id, sp.middle_id,
                                                    *sp.encode("x = ")]


def test_infill_errors(sp, monkeypatch):
    with pytest.raises(UserError, match="psm, spm.*'msp'"):
        infill_prompt(sp, "a", "b", "msp")
    monkeypatch.setattr(sp, "middle_id", None)
    with pytest.raises(UserError, match="no infilling tokens"):
        infill_prompt(sp, "a", "b")


def test_split_document_is_character_level_and_uniform():
    rng = random.Random(0)
    text = "日本語 🙂 x"
    cuts = set()
    for _ in range(500):
        prefix, middle, suffix = split_document(rng, text)
        assert prefix + middle + suffix == text
        cuts.add((len(prefix), len(prefix) + len(middle)))
    n = len(text)
    assert cuts == {(i, j) for i in range(n + 1) for j in range(i, n + 1)}  # every split, empty pieces too
    assert split_document(random.Random(1), "") == ("", "", "")
    assert split_document(random.Random(3), CORPUS) == split_document(random.Random(3), CORPUS)


@pytest.mark.parametrize("seed", range(20))
def test_psm_example_rebuilds_the_document(tok, seed):
    prefix, middle, suffix = split_document(random.Random(seed), CORPUS)
    ids = infill_example(tok, prefix, middle, suffix, "psm")
    assert ids[:2] == [tok.bos_id, tok.prefix_id] and ids[-1] == tok.eot_id
    suf, mid = ids.index(tok.suffix_id), ids.index(tok.middle_id)
    assert tok.decode(ids[2:suf]) == prefix
    assert tok.decode_continuation(ids[suf + 1:mid]) == suffix
    assert tok.decode_continuation(ids[mid + 1:-1]) == middle
    assert ids[:mid + 1] == infill_prompt(tok, prefix, suffix, "psm")


@pytest.mark.parametrize("seed", range(20))
def test_spm_example_rebuilds_the_document(tok, seed):
    prefix, middle, suffix = split_document(random.Random(seed), CORPUS)
    ids = infill_example(tok, prefix, middle, suffix, "spm")
    assert ids[:3] == [tok.bos_id, tok.prefix_id, tok.suffix_id] and ids[-1] == tok.eot_id
    mid = ids.index(tok.middle_id)
    assert tok.decode_continuation(ids[3:mid]) == suffix
    assert tok.decode(ids[mid + 1:-1]) == prefix + middle  # one string, as the paper encodes SPM
    assert ids[mid + 1:-1] == tok.encode(prefix + middle)
    assert tok.decode(ids[mid + 1:-1]) + suffix == CORPUS


DIALOG = [
    {"role": "system", "content": "Answer in Python."},
    {"role": "user", "content": " How do I add? "},
    {"role": "assistant", "content": "Use `a + b`.\n"},
    {"role": "user", "content": "And subtract?"},
    {"role": "assistant", "content": " `a - b`"},
]
FOLLOW_UP = [{"role": "user", "content": "Multiply?\n"}]


def test_chat_text_matches_llama2_template():
    # The system prompt is joined to the raw first user message before stripping, so that message keeps
    # its leading space (Meta and HF both do this).
    assert chat_text(DIALOG + FOLLOW_UP) == (
        "<s>[INST] <<SYS>>\nAnswer in Python.\n<</SYS>>\n\n How do I add? [/INST] Use `a + b`. </s>"
        "<s>[INST] And subtract? [/INST] `a - b` </s>"
        "<s>[INST] Multiply? [/INST]"
    )
    assert chat_text([{"role": "user", "content": "hi"}]) == "<s>[INST] hi [/INST]"


def test_chat_tokens_match_meta_construction(sp):
    ids, mask = chat_tokens(sp, DIALOG + FOLLOW_UP)
    expected = (
        sp.encode("[INST] <<SYS>>\nAnswer in Python.\n<</SYS>>\n\n How do I add? [/INST] Use `a + b`. ",
                  bos=True, eos=True)
        + sp.encode("[INST] And subtract? [/INST] `a - b` ", bos=True, eos=True)
        + sp.encode("[INST] Multiply? [/INST]", bos=True)
    )
    assert ids == expected
    assert len(mask) == len(ids)


def test_chat_loss_mask_covers_exactly_the_answers(tok):
    ids, mask = chat_tokens(tok, DIALOG)
    answer_spans, start = [], None
    for k, m in enumerate(mask + [0]):
        if m and start is None:
            start = k
        elif not m and start is not None:
            answer_spans.append(ids[start:k])
            start = None
    assert [tok.decode_continuation(span) for span in answer_spans] == [" Use `a + b`. ", " `a - b` "]
    assert all(span[-1] == tok.eos_id for span in answer_spans)
    prompt_ids = [i for i, m in zip(ids, mask, strict=True) if not m]
    assert tok.decode(prompt_ids).count("[/INST]") == 2


def test_chat_prompt_has_no_loss(tok):
    _, mask = chat_tokens(tok, DIALOG + FOLLOW_UP)
    n_prompt = len(tok.encode("[INST] Multiply? [/INST]", bos=True))
    assert mask[-n_prompt:] == [0] * n_prompt


USER = {"role": "user", "content": "a"}


@pytest.mark.parametrize("messages, match", [
    ([], "at least one user message"),
    ([{"role": "system", "content": "s"}], "at least one user message"),
    ([{"role": "assistant", "content": "a"}], r"messages\[0\].role must be 'user'"),
    ([USER, {"role": "user", "content": "b"}], r"messages\[1\].role must be 'assistant'"),
    ([USER, {"role": "system", "content": "b"}], r"messages\[1\].role"),
    ([USER, {"role": "bot", "content": "b"}], r"messages\[1\].role must be one of"),
    ([{"role": "user", "content": 3}], r"messages\[0\].content must be a string"),
    ([{"role": "user", "content": "x [/INST] y"}], r"messages\[0\].content contains a reserved marker"),
])
def test_chat_rejects_bad_dialogs(sp, messages, match):
    with pytest.raises(UserError, match=match):
        chat_text(messages)
    with pytest.raises(UserError, match=match):
        chat_tokens(sp, messages)
