"""`codellm tokenizer train` on a corpus built by `codellm data build`, end to end."""

import subprocess
import sys

from codellm.tokenizer import load_tokenizer
from tests.train_fixtures import make_corpus


def test_tokenizer_train_on_corpus(tmp_path):
    corpus = make_corpus(tmp_path / "corpus")
    out = subprocess.run([sys.executable, "-m", "codellm", "tokenizer", "train", "--corpus", str(corpus),
                          "--out", str(tmp_path / "tok"), "--vocab-size", "300", "--max-docs", "5"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    tok = load_tokenizer(tmp_path / "tok")
    assert tok.has_infilling and tok.vocab_size <= 300
    assert tok.decode(tok.encode("def f(x):\n    return x")) == "def f(x):\n    return x"


def test_tokenizer_train_bad_max_docs(tmp_path):
    out = subprocess.run([sys.executable, "-m", "codellm", "tokenizer", "train", "--corpus", str(tmp_path),
                          "--out", str(tmp_path / "tok"), "--max-docs", "0"], capture_output=True, text=True)
    assert out.returncode == 2 and "--max-docs" in out.stderr


def test_tokenizer_train_refuses_an_existing_out_without_force(tmp_path):
    import os

    corpus = make_corpus(tmp_path / "corpus")
    argv = [sys.executable, "-m", "codellm", "tokenizer", "train", "--corpus", str(corpus), "--out",
            str(tmp_path / "tok"), "--vocab-size", "300", "--max-docs", "5"]
    old = os.umask(0o022)
    try:
        first = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    finally:
        os.umask(old)
    assert first.returncode == 0, first.stderr
    assert (tmp_path / "tok").stat().st_mode & 0o777 == 0o755  # not mkdtemp's 0700
    (tmp_path / "tok" / "tokenizer.json").write_text("mine")
    again = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert again.returncode == 2 and "already exists; pass --force" in again.stderr
    assert (tmp_path / "tok" / "tokenizer.json").read_text() == "mine"
    forced = subprocess.run([*argv, "--force"], capture_output=True, text=True, timeout=120)
    assert forced.returncode == 0, forced.stderr
    assert load_tokenizer(tmp_path / "tok").has_infilling
