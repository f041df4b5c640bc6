"""CodeT5's tokenizer files as Salesforce ships them (vocab.json + merges.txt + added_tokens.json, no
tokenizer.json) load, and encode/decode as transformers' RobertaTokenizer does."""

import json

import pytest
import tokenizers

from codellm.errors import UserError
from codellm.tokenizer import load_tokenizer
from tests.t5_fixtures import make_codet5_tokenizer
from tests.tokenizer_fixtures import CORPUS

transformers = pytest.importorskip("transformers")


def slow_layout(tmp_path):
    """The fixture tokenizer rewritten as vocab.json + merges.txt + added_tokens.json + configs."""
    src = make_codet5_tokenizer(tmp_path / "src")
    out = tmp_path / "slow"
    out.mkdir()
    tok = tokenizers.Tokenizer.from_file(str(src / "tokenizer.json"))
    tok.model.save(str(out))
    base = tok.get_vocab_size(with_added_tokens=False)
    added = {t.content: i for i, t in tok.get_added_tokens_decoder().items() if i >= base}
    (out / "added_tokens.json").write_text(json.dumps(added))
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        (out / name).write_text((src / name).read_text())
    return out, added


def test_vocab_merges_folder_encodes_as_transformers_roberta_tokenizer(tmp_path):
    folder, added = slow_layout(tmp_path)
    ours = load_tokenizer(folder)
    theirs = transformers.RobertaTokenizer.from_pretrained(folder)
    assert ours.vocab_size == len(theirs)
    assert (ours.bos_id, ours.eos_id, ours.pad_id) == (theirs.bos_token_id, theirs.eos_token_id, theirs.pad_token_id)
    for name, i in added.items():
        assert ours.piece_to_id(name) == i == theirs.convert_tokens_to_ids(name)
    for text in [CORPUS, "def f(x):\n\treturn x  # café 🙂", "  leading spaces", ""]:
        ids = theirs(text, add_special_tokens=False).input_ids
        assert ours.encode(text) == ids
        assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=True)


def test_added_ids_with_a_gap_are_refused(tmp_path):
    folder, added = slow_layout(tmp_path)
    (folder / "added_tokens.json").write_text(json.dumps({k: v + 5 for k, v in added.items()}))
    with pytest.raises(UserError, match="added ids must follow the .*-token vocabulary without gaps"):
        load_tokenizer(folder)
