"""Training data: the infilling transform, packing, SFT masks, docstring mining, resumable streams."""

import ast
import json
import random

import pytest
import torch

from codellm.errors import UserError
from codellm.train.batches import (
    DocumentExamples,
    Example,
    JsonlStream,
    Mixture,
    Packer,
    corpus_files,
    fim_transform,
    make_batches,
    row_pieces,
)
from codellm.train.config import TrainConfig
from codellm.train.docstrings import docstring_dialogs
from tests.train_fixtures import make_corpus

DOC = 'def greet(name):\n    """Say hello."""\n    print(f"héllo {name} 日本")  # ✨\n    return len(name)\n'


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_corpus(tmp_path_factory.mktemp("corpus"))


def test_fim_rate_and_psm_spm_split(sp):
    rng, n = random.Random(0), 3000
    kinds = [fim_transform(sp, rng, DOC, 10_000, 0.9, 0.5)[1] for _ in range(n)]
    fim = n - kinds.count("ar")
    assert abs(fim / n - 0.9) < 0.03
    assert abs(kinds.count("psm") / fim - 0.5) < 0.04


def test_infilling_example_reconstructs_the_document(tok):
    rng = random.Random(1)
    seen = set()
    for k in range(200):
        text = DOC[: rng.randint(0, len(DOC))] if k % 4 else DOC
        ids, kind = fim_transform(tok, rng, text, 10_000, 1.0, 0.5)
        seen.add(kind)
        assert ids[:2] == [tok.bos_id, tok.prefix_id] and ids[-1] == tok.eot_id and ids.count(tok.eot_id) == 1
        mid_at, suf_at = ids.index(tok.middle_id), ids.index(tok.suffix_id)
        suffix = tok.decode_continuation(ids[suf_at + 1 : mid_at])
        if kind == "psm":  # <s> <PRE> prefix <SUF> suffix <MID> middle <EOT>
            prefix_middle = tok.decode(ids[2:suf_at]) + tok.decode_continuation(ids[mid_at + 1 : -1])
        else:  # <s> <PRE> <SUF> suffix <MID> prefix+middle <EOT>
            assert suf_at == 2
            prefix_middle = tok.decode(ids[mid_at + 1 : -1])
        assert prefix_middle + suffix == text
    assert seen == {"psm", "spm"}


def test_documents_longer_than_a_row_stay_left_to_right(sp):
    rng = random.Random(2)
    plain = sp.encode(DOC, bos=True, eos=True)
    for _ in range(50):
        assert fim_transform(sp, rng, DOC, len(plain) - 1, 1.0, 0.5) == (plain, "ar")
    assert fim_transform(sp, rng, DOC, len(plain), 1.0, 0.5)[1] != "ar"


class ListSource:
    def __init__(self, examples):
        self.examples, self.i = examples, 0

    def __next__(self):
        self.i += 1
        return self.examples[(self.i - 1) % len(self.examples)]

    def state_dict(self) -> dict:
        return {"i": self.i}

    def load_state_dict(self, state: dict) -> None:
        self.i = state["i"]


def test_packer_concatenates_documents_without_losing_tokens():
    docs = [Example(list(range(100 * k, 100 * k + n))) for k, n in enumerate([3, 11, 1, 7, 20])]
    packer = Packer(ListSource(docs), seq_len=7, pad_id=-1)
    rows = [packer.next_row() for _ in range(6)]
    assert all(len(ids) == 8 and weights == [1] * 8 for ids, weights in rows)
    stream = [t for d in docs for t in d.ids] * 2
    assert [t for ids, _ in rows for t in ids] == stream[:48]


def test_packer_keeps_dialogs_whole_and_pads():
    dialogs = [Example([1, 2, 3, 4, 5], [0, 0, 1, 1, 1], whole=True), Example([6, 7, 8], [0, 1, 1], whole=True)]
    packer = Packer(ListSource(dialogs), seq_len=6, pad_id=0)
    rows = [packer.next_row() for _ in range(3)]
    assert rows[0] == ([1, 2, 3, 4, 5, 0, 0], [0, 0, 1, 1, 1, 0, 0])  # [6, 7, 8] does not fit: new row
    assert rows[1] == ([6, 7, 8, 0, 0, 0, 0], [0, 1, 1, 0, 0, 0, 0])
    assert rows[2][0][:5] == [1, 2, 3, 4, 5]


def test_packer_interleave_spreads_a_long_document_and_loses_nothing():
    """A document 40 rows long among short ones: in order it fills 40 consecutive rows; interleaved over
    8 open documents it takes a fraction of each stretch of rows, every document still in order."""
    long_doc = Example(list(range(10_000, 10_000 + 40 * 8)))
    docs = [long_doc] + [Example(list(range(100 * k, 100 * k + 5 + k % 7))) for k in range(1, 60)]

    def rows_of_long(interleave):
        packer = Packer(ListSource(docs), seq_len=7, pad_id=-1, interleave=interleave, seed="t")
        rows = [packer.next_row()[0] for _ in range(40)]
        return rows, [sum(t >= 10_000 for t in row) / len(row) for row in rows]

    _, in_order = rows_of_long(1)
    assert all(share == 1.0 for share in in_order)
    rows, spread = rows_of_long(8)
    assert sum(spread) / len(spread) < 0.4 and sum(share == 1.0 for share in spread) < 10
    stream = [t for row in rows for t in row]
    for doc in docs:  # every document's tokens appear in order (those packed so far)
        seen = [t for t in stream if t in set(doc.ids)]
        assert seen == doc.ids[:len(seen)]


def test_packer_interleave_state_resumes_exactly():
    docs = [Example(list(range(100 * k, 100 * k + 3 + 5 * (k % 4)))) for k in range(30)]
    first = Packer(ListSource(docs), seq_len=7, pad_id=-1, interleave=4, seed="r")
    for _ in range(5):
        first.next_row()
    state = json.loads(json.dumps(first.state_dict()))
    expected = [first.next_row() for _ in range(10)]
    second = Packer(ListSource(docs), seq_len=7, pad_id=-1, interleave=4, seed="other")
    second.load_state_dict(state)
    assert [second.next_row() for _ in range(10)] == expected


def test_packer_interleave_refuses_whole_examples():
    packer = Packer(ListSource([Example([1, 2], [0, 1], whole=True)]), seq_len=6, pad_id=0, interleave=2)
    with pytest.raises(ValueError, match="one at a time"):
        packer.next_row()


def test_sft_loss_mask_covers_exactly_the_answers(sp, tmp_path):
    dialogs = [[{"role": "user", "content": f"question {i}?"}, {"role": "assistant", "content": f"answer {i} ok"},
                {"role": "user", "content": "more"}, {"role": "assistant", "content": f"second {i}"}]
               for i in range(5)]
    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps({"system": "be brief", "messages": d}) + "\n" for d in dialogs))
    cfg = TrainConfig.for_stage("sft", out=str(tmp_path / "run"), init="x", sft_data=(str(data),), seq_len=96,
                                rehearsal=0.0)
    tokens, weights = make_batches(cfg, sp, 96, "train").next_batch(4)
    answers = []
    for ids, w in zip(tokens.tolist(), weights.tolist(), strict=True):
        runs, current = [], []
        for t, keep in zip(ids, w, strict=True):
            if keep:
                current.append(t)
            elif current:
                runs, current = runs + [current], []
        answers += [r for r in runs + ([current] if current else [])]
    assert all(r[-1] == sp.eos_id for r in answers)
    texts = [sp.decode(r[:-1]) for r in answers]
    pairs = {(d[1]["content"] + " ", d[3]["content"] + " ") for d in dialogs}  # Meta's template: "{answer} </s>"
    assert len(texts) >= 4 and len(texts) % 2 == 0  # dialogs are never cut across rows
    assert all((first, second) in pairs for first, second in zip(texts[0::2], texts[1::2], strict=True))


FIXTURE_PY = '''
import functools


@functools.cache
def fib(n: int) -> int:
    """Return the n-th Fibonacci number, computed recursively."""
    if n < 2:
        return n
    return fib(n - 1) + fib(n - 2)


class Stack:
    def push(self, item):
        """Push an item onto the top of the stack."""
        self.items.append(item)
        return self

    def __len__(self):
        """Number of items on the stack."""
        return len(self.items)


def short():
    """Does it."""
    return 1


def only_docstring():
    """This function has nothing but a docstring."""


def test_fib():
    """Check the first Fibonacci numbers."""
    assert fib(10) == 55
'''


def test_docstring_mining_on_a_fixture_file():
    dialogs = docstring_dialogs(FIXTURE_PY)
    assert len(dialogs) == 2
    (fib_user, fib_code), (push_user, push_code) = [(d[0]["content"], d[1]["content"]) for d in dialogs]
    assert fib_user.startswith("Write a Python function `def fib(n: int) -> int:`")
    assert "Return the n-th Fibonacci number, computed recursively." in fib_user
    assert fib_code.startswith("@functools.cache\ndef fib(n: int) -> int:\n    if n < 2:") and '"""' not in fib_code
    assert "`def push(self, item):`" in push_user
    assert push_code == "def push(self, item):\n    self.items.append(item)\n    return self"
    ast.parse(fib_code), ast.parse(push_code)
    assert docstring_dialogs("def broken(:\n") == []


def test_jsonl_stream_ranks_are_disjoint_and_resume_exactly(corpus):
    files = corpus_files(corpus, "train")
    stream = JsonlStream(files)
    epochs = [[next(stream)["path"] for _ in range(24)] for _ in range(2)]
    assert sorted(epochs[0]) == sorted(epochs[1]) and len(set(epochs[0])) == 24  # each epoch: all, once
    assert epochs[0] != epochs[1] and epochs[0] != sorted(epochs[0], key=lambda p: int(p[3:].split("/")[0]))
    per_rank = [[next(s)["path"] for _ in range(8)] for s in (JsonlStream(files, r, 2) for r in range(2))]
    assert not set(per_rank[0]) & set(per_rank[1]) and len(set(per_rank[0] + per_rank[1])) == 16
    python_only = JsonlStream(files, keep=lambda d: d["lang"] == "python")
    assert all(next(python_only)["lang"] == "python" for _ in range(40))  # crosses epochs
    state = json.loads(json.dumps(python_only.state_dict()))
    expected = [next(python_only)["path"] for _ in range(20)]
    again = JsonlStream(files, keep=lambda d: d["lang"] == "python")
    again.load_state_dict(state)
    assert [next(again)["path"] for _ in range(20)] == expected
    with pytest.raises(UserError, match="no rust documents"):
        next(JsonlStream(files, keep=lambda d: d["lang"] == "rust", what="rust documents"))


@pytest.mark.parametrize("stage", ["pretrain", "sft"])
def test_batch_stream_resumes_exactly(sp, corpus, tmp_path, stage):
    cfg = TrainConfig.for_stage(stage, out=str(tmp_path), init="x", corpus=str(corpus), rehearsal=0.3)
    first = make_batches(cfg, sp, 384, "train")
    for _ in range(3):
        first.next_batch(2)
    state = json.loads(json.dumps(first.state_dict()))
    expected = [first.next_batch(2) for _ in range(4)]
    second = make_batches(cfg, sp, 384, "train")
    second.load_state_dict(state)
    for (t1, w1), (t2, w2) in zip(expected, [second.next_batch(2) for _ in range(4)], strict=True):
        assert torch.equal(t1, t2) and torch.equal(w1, w2)


def test_context_level_fim_cuts_long_documents_into_row_pieces(sp, corpus):
    long_doc = "".join(f"def f{i}(x):\n    return x + {i}\n\n" for i in range(300))
    n = len(sp.encode(long_doc, bos=True, eos=True))
    pieces = row_pieces(long_doc, n, 128)
    assert "".join(pieces) == long_doc and len(pieces) > 1 and all(p.endswith("\n") for p in pieces)
    assert all(len(sp.encode(p, bos=True, eos=True)) <= 128 for p in pieces)

    class OneDoc:  # a document stream of this one long file
        def __next__(self):
            return {"text": long_doc}

        def state_dict(self):
            return {}

        def load_state_dict(self, state):
            pass

    kinds = {}
    for level in ("document", "context"):
        docs = DocumentExamples(OneDoc(), sp, 127, 1.0, 0.5, seed=0, fim_level=level)
        kinds[level] = [sp.prefix_id in next(docs).ids for _ in range(40)]
    assert not any(kinds["document"]) and all(kinds["context"])  # the paper's rule leaves it left-to-right
    docs = DocumentExamples(OneDoc(), sp, 127, 0.5, 0.5, seed=0, fim_level="context")
    next(docs), next(docs)
    state = json.loads(json.dumps(docs.state_dict()))
    expected = [next(docs).ids for _ in range(5)]
    again = DocumentExamples(OneDoc(), sp, 127, 0.5, 0.5, seed=0, fim_level="context")
    again.load_state_dict(state)
    assert [next(again).ids for _ in range(5)] == expected and state["pieces"]


def test_rehearsal_share():
    class Tagged:
        def __init__(self, tag):
            self.tag = tag

        def __next__(self):
            return self.tag

    mix = Mixture([(Tagged("sft"), 0.92), (Tagged("doc"), 0.08)], seed=0)
    draws = [next(mix) for _ in range(5000)]
    assert abs(draws.count("doc") / 5000 - 0.08) < 0.015


def test_bad_sft_records_name_the_problem(sp, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n{not json\n')
    cfg = TrainConfig.for_stage("sft", out=str(tmp_path / "run"), init="x", sft_data=(str(bad),))
    with pytest.raises(UserError, match="bad.jsonl: the line at byte 50 is not JSON"):
        make_batches(cfg, sp, 64, "train").next_batch(4)


def test_runs_saved_before_interleaving_resume_in_order(tmp_path):
    saved = TrainConfig.for_stage("pretrain", out=str(tmp_path), init="x", corpus="c").to_dict()
    del saved["data"]["interleave"]
    assert TrainConfig.from_dict(saved).data.interleave == 1
    assert TrainConfig.for_stage("pretrain", out=str(tmp_path), init="x", corpus="c").data.interleave == 8
