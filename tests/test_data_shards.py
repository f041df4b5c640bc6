"""Reading a corpus dir's JSONL shards, and the command set: `data build` only, no token shards that
training would never read (training tokenizes the text as it reads it)."""

import json

import pytest

from codellm.data.build import build_corpus
from codellm.data.cli import main
from codellm.data.shards import load_manifest, read_corpus
from codellm.data.sources import open_source
from codellm.errors import UserError
from tests.test_data_build import CONFIG, make_archives, py_module, write


@pytest.fixture
def corpus(tmp_path):
    src = make_archives(tmp_path / "archives")[1]
    for i in range(4):  # more packages and documents of different lengths
        write(tmp_path / "archives" / f"p{i}/LICENSE", "MIT License\n")
        write(tmp_path / "archives" / f"p{i}/m.py", py_module(20 + i, n=5 + 3 * i))
    build_corpus([open_source(src)], tmp_path / "corpus", decontam=None, config=CONFIG, progress_every=None)
    return tmp_path / "corpus"


def test_read_corpus_yields_every_document_in_shard_order(corpus):
    manifest = load_manifest(corpus, "codellm-corpus/1", "--corpus")
    for split in ("train", "val"):
        lines = [json.loads(line) for shard in manifest["splits"][split]["shards"]
                 for line in (corpus / shard["file"]).read_text().splitlines()]
        assert list(read_corpus(corpus, split)) == lines and len(lines) == manifest["splits"][split]["docs"]
    assert manifest["splits"]["train"]["docs"] > 0


def test_load_manifest_names_the_flag_and_the_format(tmp_path, corpus):
    with pytest.raises(UserError, match="--corpus .*: no manifest.json"):
        load_manifest(tmp_path, "codellm-corpus/1", "--corpus")
    with pytest.raises(UserError, match="manifest format is 'codellm-corpus/1', expected 'other/1'"):
        load_manifest(corpus, "other/1", "--corpus")


def test_data_has_build_and_no_tokenize(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["data", "tokenize", "--corpus", "c", "--tokenizer", "t", "--out", "o"])
    assert exit_info.value.code == 2 and "invalid choice: 'tokenize'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["data", "--help"])
    assert "build" in capsys.readouterr().out


def test_empty_split_reads_as_zero_docs(tmp_path):
    write(tmp_path / "one/LICENSE", "MIT License\n")
    write(tmp_path / "one/a.py", py_module(1))
    build_corpus([open_source(tmp_path / "one")], tmp_path / "corpus", decontam=None, progress_every=None)
    assert len(list(read_corpus(tmp_path / "corpus", "train"))) == 1
    assert list(read_corpus(tmp_path / "corpus", "val")) == []
