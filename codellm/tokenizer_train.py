"""Train a byte-level BPE tokenizer for code with HF `tokenizers`.

Byte-level means every string is encodable (no unknown token) and decoding is lossless. Digits are split
one per token, which helps arithmetic and keeps numbers from eating vocabulary. No implicit leading space
is added (`add_prefix_space=False`), so `encode` and `encode_nospace` agree for these tokenizers.

Special tokens take the first ids, with BOS/EOS where Llama has them (codellm's ModelConfig defaults):

    0 <pad>   1 <s> (BOS)   2 </s> (EOS)   3 <PRE>   4 <SUF>   5 <MID>   6 <EOT>

The output directory holds tokenizer.json, tokenizer_config.json and special_tokens_map.json; it loads
with `codellm.tokenizer.load_tokenizer` and with `transformers.AutoTokenizer.from_pretrained`.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from codellm.errors import UserError

PAD, BOS, EOS = "<pad>", "<s>", "</s>"
INFILL_TOKENS = ["<PRE>", "<SUF>", "<MID>", "<EOT>"]
SPECIAL_TOKENS = [PAD, BOS, EOS, *INFILL_TOKENS]
MIN_VOCAB_SIZE = len(SPECIAL_TOKENS) + 256 + 1  # specials, the 256 bytes, at least one merge
OUTPUT_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def train_tokenizer(
    texts: Iterable[Path | str],
    out_dir: str | Path,
    vocab_size: int = 16384,
    min_frequency: int = 2,
    show_progress: bool = True,
) -> Path:
    """Train on documents (a Path is a file holding one, a str is one); write the tokenizer to `out_dir`.

    The files are written to a temporary directory next to `out_dir` and then moved into place, so an
    interrupted run never leaves a half-written tokenizer behind.
    """
    if vocab_size < MIN_VOCAB_SIZE:
        raise UserError(f"vocab_size must be at least {MIN_VOCAB_SIZE}, got {vocab_size}")
    out_dir = Path(out_dir)
    documents = _Counted(_documents(texts))

    tok = _untrained_tokenizer()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=show_progress,
    )
    tok.train_from_iterator(documents, trainer)
    if documents.chars == 0:
        raise UserError("tokenizer training input is empty (no files or only empty texts)")
    tok.post_processor = processors.TemplateProcessing(  # what AutoTokenizer users expect from Llama
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, tok.token_to_id(BOS))])
    _write_atomically(tok, out_dir)
    return out_dir


def _untrained_tokenizer() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    return tok


def _documents(items: Iterable[Path | str]) -> Iterator[str]:
    """Texts of `items`: a Path is read as one document, a str is the document itself."""
    if isinstance(items, list | tuple):  # fail before a long training run, not in the middle of it
        for p in items:
            if isinstance(p, Path) and not p.is_file():
                raise UserError(f"tokenizer training file {p} does not exist")
    return (item.read_text(encoding="utf-8", errors="replace") if isinstance(item, Path) else item
            for item in items)


class _Counted:
    """Iterates texts and counts their characters, to detect empty input after a single pass."""

    def __init__(self, texts: Iterable[str]):
        self._texts = texts
        self.chars = 0

    def __iter__(self) -> Iterator[str]:
        for text in self._texts:
            self.chars += len(text)
            yield text


def _hf_config() -> tuple[dict, dict]:
    special_map = {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD,
                   "additional_special_tokens": INFILL_TOKENS}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special_map,
        "add_bos_token": True,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,  # would rewrite " ." to "." in decoded code
        "model_max_length": 1_000_000_000,
    }
    return config, special_map


def _write_atomically(tok: Tokenizer, out_dir: Path) -> None:
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's 0700 would become the tokenizer directory's mode
    try:
        tok.save(str(tmp / "tokenizer.json"))
        config, special_map = _hf_config()
        (tmp / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
        (tmp / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2) + "\n")
        if out_dir.exists():  # e.g. a checkpoint directory: replace our files, keep the rest
            for name in OUTPUT_FILES:
                os.replace(tmp / name, out_dir / name)
        else:
            tmp.rename(out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
