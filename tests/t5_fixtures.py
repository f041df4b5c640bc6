"""Tiny CodeT5-style folders for tests: a RoBERTa byte-level BPE tokenizer (<pad> <s> </s> <unk> <mask> =
0..4, then `<extra_id_N>` sentinels and `[CLM]` as added special tokens, like CodeT5's) trained in-process,
and a random transformers T5 saved beside it."""

from __future__ import annotations

import json
from pathlib import Path

import tokenizers
import torch

from tests.tokenizer_fixtures import CORPUS

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>", "<mask>"]
N_SENTINELS = 8


def make_codet5_tokenizer(out: Path, vocab_size: int = 300) -> Path:
    """tokenizer.json + tokenizer_config.json + special_tokens_map.json in `out`."""
    tok = tokenizers.ByteLevelBPETokenizer(add_prefix_space=False)
    tok.train_from_iterator([CORPUS] * 3, vocab_size=vocab_size, min_frequency=2, special_tokens=SPECIALS)
    extra = [f"<extra_id_{n}>" for n in reversed(range(N_SENTINELS))] + ["[CLM]"]
    tok.add_special_tokens(extra)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "RobertaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>",
        "unk_token": "<unk>", "mask_token": "<mask>", "model_max_length": 512}))
    (out / "special_tokens_map.json").write_text(json.dumps({
        "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>",
        "mask_token": "<mask>", "additional_special_tokens": extra}))
    return out


def make_codet5_dir(out: Path, seed: int = 0, **config) -> Path:
    """A T5ForConditionalGeneration folder (random weights, large enough init that greedy choices are
    decisive) with the tokenizer above; CodeT5's ids: pad 0 (also the decoder start), eos 2."""
    import transformers

    tok_dir = make_codet5_tokenizer(out)
    vocab = tokenizers.Tokenizer.from_file(str(tok_dir / "tokenizer.json")).get_vocab_size(with_added_tokens=True)
    base = dict(vocab_size=vocab, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_decoder_layers=2, num_heads=4,
                relative_attention_num_buckets=8, relative_attention_max_distance=20, dropout_rate=0.0,
                decoder_start_token_id=0, pad_token_id=0, eos_token_id=2, bos_token_id=1, initializer_factor=4.0)
    torch.manual_seed(seed)
    model = transformers.T5ForConditionalGeneration(transformers.T5Config(**(base | config))).eval()
    model.save_pretrained(out)
    return out
