"""CodeT5's tokenizer as Salesforce ships it: RoBERTa byte-level BPE in `vocab.json` + `merges.txt` (no
tokenizer.json), its added tokens (`<extra_id_N>` sentinels, `[ENC]`/`[TDEC]`/`[CDEC]`) in
`added_tokens.json` or tokenizer_config.json's `added_tokens_decoder`. Rebuilt here as the tokenizer.json
transformers' fast RobertaTokenizer would write, so it loads through codellm's HFTokenizer (tokenizer.py calls
`tokenizer_json`; this module does not import it back)."""

from __future__ import annotations

import contextlib
import json
import tempfile
from collections.abc import Iterator
from pathlib import Path

import tokenizers

from codellm.errors import UserError


@contextlib.contextmanager
def tokenizer_json(folder: Path, config: dict, added: dict) -> Iterator[Path]:
    """A temporary tokenizer.json for the folder's vocab.json + merges.txt and its `added` tokens (id ->
    tokenizer.AddedToken, as `read_added_tokens` reads them)."""
    try:
        bpe = tokenizers.models.BPE.from_file(str(folder / "vocab.json"), str(folder / "merges.txt"))
    except Exception as e:  # tokenizers raises its own Exception on unreadable files
        raise UserError(f"tokenizer: {folder}: vocab.json/merges.txt do not load ({e})") from e
    tok = tokenizers.Tokenizer(bpe)
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=bool(config.get("add_prefix_space")))
    tok.decoder = tokenizers.decoders.ByteLevel()
    base = tok.get_vocab_size()
    specials = {t for t in ("<s>", "</s>", "<pad>", "<unk>", "<mask>") if tok.token_to_id(t) is not None}
    tok.add_special_tokens([tokenizers.AddedToken(t, special=True, normalized=False) for t in sorted(specials)])
    for i in sorted(added):
        if i < base:
            continue  # a vocabulary entry marked special, e.g. <s>
        if i != tok.get_vocab_size(with_added_tokens=True):
            raise UserError(f"tokenizer: {folder}: added token {added[i].content!r} has id {i}; added ids must "
                            f"follow the {base}-token vocabulary without gaps")
        tok.add_tokens([tokenizers.AddedToken(added[i].content, special=added[i].special, normalized=False,
                                              lstrip=added[i].lstrip, rstrip=added[i].rstrip)])
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "tokenizer.json"
        path.write_text(json.dumps(json.loads(tok.to_str())))
        yield path
