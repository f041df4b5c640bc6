"""Small throwaway tokenizers for tests, trained in-process in well under a second.

`make_sentencepiece_dir` mimics Code Llama's tokenizer (SentencePiece BPE, byte fallback, implicit
leading space, `▁<PRE>`-style infilling pieces, unk/bos/eos = 0/1/2); `make_bpe_dir` is codellm's own
byte-level BPE. Both write only into the directory they are given.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import sentencepiece as spm

from codellm.tokenizer_train import train_tokenizer

CORPUS = '''\
def add(a, b):
    """Return the sum of a and b."""
    return a + b


class Point:
    def __init__(self, x: float, y: float) -> None:
        self.x = x
        self.y = y

    def norm(self) -> float:
        return (self.x ** 2 + self.y ** 2) ** 0.5


for i in range(10):
    if i % 2 == 0:
        print(f"even {i}")  # café, naïve, résumé
    else:
        continue

greeting = "こんにちは 日本"  # 日本語
emoji = "🙂 ✨"
values = [1, 2, 3, 42, 1000]
mapping = {"key": "value", "other": None}
while True:
    break
'''

CODE_LLAMA_TOKENIZER_CONFIG = {
    "tokenizer_class": "CodeLlamaTokenizer",
    "bos_token": "<s>",
    "eos_token": "</s>",
    "unk_token": "<unk>",
    "pad_token": None,
    "prefix_token": "▁<PRE>",
    "suffix_token": "▁<SUF>",
    "middle_token": "▁<MID>",
    "eot_token": "▁<EOT>",
    "fill_token": "<FILL_ME>",
    "add_bos_token": True,
    "add_eos_token": False,
    "clean_up_tokenization_spaces": False,
    "legacy": None,
}


def make_sentencepiece_dir(path: Path, vocab_size: int = 400) -> Path:
    """A Code Llama-like `tokenizer.model` + `tokenizer_config.json` in `path`."""
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(  # Llama 2's trainer settings, scaled down
        sentence_iterator=iter(CORPUS.splitlines() * 4),
        model_writer=model,
        model_type="bpe",
        vocab_size=vocab_size,
        hard_vocab_limit=False,
        character_coverage=1.0,
        byte_fallback=True,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        user_defined_symbols=["▁<PRE>", "▁<SUF>", "▁<MID>", "▁<EOT>"],
        minloglevel=2,
    )
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / "tokenizer.model").write_bytes(model.getvalue())
    (path / "tokenizer_config.json").write_text(json.dumps(CODE_LLAMA_TOKENIZER_CONFIG, indent=2))
    return path


def make_bpe_dir(path: Path, vocab_size: int = 512) -> Path:
    """codellm's byte-level BPE tokenizer (tokenizer.json + HF configs) trained into `path`."""
    return train_tokenizer([CORPUS] * 4, path, vocab_size=vocab_size, show_progress=False)
