"""Token shards: tokenizing a corpus, the memory-mapped reader, the CLI path with a real tokenizer."""

import hashlib
import json

import numpy as np
import pytest

from codellm.data.build import build_corpus
from codellm.data.cli import main
from codellm.data.shards import TokenShards, read_corpus, tokenize_corpus
from codellm.data.sources import open_source
from codellm.errors import UserError
from codellm.tokenizer import load_tokenizer
from codellm.tokenizer_train import train_tokenizer
from tests.test_data_build import CONFIG, make_archives, py_module, write


class ByteTokenizer:
    """Bytes shifted past three special ids; `vocab_size` is settable to exercise the uint32 path."""

    bos_id, eos_id = 1, 2

    def __init__(self, vocab_size: int = 259):
        self.vocab_size = vocab_size

    def encode(self, text: str) -> list[int]:
        return [b + 3 for b in text.encode()]


@pytest.fixture
def corpus(tmp_path):
    src = make_archives(tmp_path / "archives")[1]
    for i in range(4):  # more packages and documents of different lengths
        write(tmp_path / "archives" / f"p{i}/LICENSE", "MIT License\n")
        write(tmp_path / "archives" / f"p{i}/m.py", py_module(20 + i, n=5 + 3 * i))
    build_corpus([open_source(src)], tmp_path / "corpus", decontam=None, config=CONFIG, progress_every=None)
    return tmp_path / "corpus"


def test_tokenize_and_read_back(tmp_path, corpus):
    tok = ByteTokenizer()
    m = tokenize_corpus(corpus, tok, tmp_path / "tokens", tokenizer_hash="abc", seq_len=64,
                        shard_tokens=1500, progress_every=None)
    assert m["dtype"] == "uint16" and m["tokenizer"]["sha256"] == "abc"
    for split in ("train", "val"):
        docs = list(read_corpus(corpus, split))
        ts = TokenShards(tmp_path / "tokens", split)
        assert len(ts) == len(docs) == m["splits"][split]["docs"] > 0
        for i, d in enumerate(docs):
            assert ts.doc(i).tolist() == tok.encode(d["text"])
        lengths = [len(tok.encode(d["text"])) for d in docs]
        assert ts.doc_lengths().tolist() == lengths and ts.num_tokens == sum(lengths)
        assert m["splits"][split]["docs_longer_than_seq_len"] == sum(n > 64 for n in lengths)
        langs = m["splits"][split]["langs"]
        assert sum(c["tokens"] for c in langs.values()) == ts.num_tokens
        for sh in m["splits"][split]["shards"]:
            for kind in ("bin", "idx"):
                data = (tmp_path / "tokens" / sh[kind]).read_bytes()
                assert hashlib.sha256(data).hexdigest() == sh["sha256"][kind]
    train = TokenShards(tmp_path / "tokens", "train")
    assert train.num_shards > 1  # shard_tokens=1500 forces a rollover
    assert isinstance(train.tokens(0), np.memmap) and train.tokens(0).dtype == np.uint16
    assert train.offsets(0)[0] == 0 and train.offsets(0)[-1] == len(train.tokens(0))
    with pytest.raises(IndexError):
        train.doc(len(train))


def test_large_vocab_uses_uint32_and_out_dir_rules(tmp_path, corpus):
    tokenize_corpus(corpus, ByteTokenizer(70_000), tmp_path / "tokens", progress_every=None)
    assert TokenShards(tmp_path / "tokens", "val").tokens(0).dtype == np.uint32
    with pytest.raises(UserError, match="--force"):
        tokenize_corpus(corpus, ByteTokenizer(), tmp_path / "tokens", progress_every=None)
    tokenize_corpus(corpus, ByteTokenizer(), tmp_path / "tokens", force=True, progress_every=None)
    assert json.loads((tmp_path / "tokens/manifest.json").read_text())["dtype"] == "uint16"
    with pytest.raises(UserError, match="not a codellm-tokens"):
        tokenize_corpus(corpus, ByteTokenizer(), corpus, force=True, progress_every=None)
    with pytest.raises(UserError, match="no manifest.json"):
        tokenize_corpus(tmp_path / "archives", ByteTokenizer(), tmp_path / "t2", progress_every=None)


def test_empty_split_reads_as_zero_docs(tmp_path):
    write(tmp_path / "one/LICENSE", "MIT License\n")
    write(tmp_path / "one/a.py", py_module(1))
    build_corpus([open_source(tmp_path / "one")], tmp_path / "corpus", decontam=None, progress_every=None)
    tokenize_corpus(tmp_path / "corpus", ByteTokenizer(), tmp_path / "tokens", progress_every=None)
    assert len(TokenShards(tmp_path / "tokens", "train")) == 1
    val = TokenShards(tmp_path / "tokens", "val")
    assert len(val) == 0 and val.num_tokens == 0 and list(val) == []


def test_cli_tokenize_with_real_tokenizer(tmp_path, corpus):
    texts = [d["text"] for d in read_corpus(corpus, "train")]
    train_tokenizer(texts, tmp_path / "tok", vocab_size=300, show_progress=False)
    rc = main(["data", "tokenize", "--corpus", str(corpus), "--tokenizer", str(tmp_path / "tok"),
               "--out", str(tmp_path / "tokens"), "--seq-len", "128"])
    assert rc == 0
    tok = load_tokenizer(tmp_path / "tok")
    ts = TokenShards(tmp_path / "tokens", "train")
    assert ts.doc(0).tolist() == tok.encode(texts[0])
    assert len(ts.manifest["tokenizer"]["sha256"]) == 64
