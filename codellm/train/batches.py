"""Training batches: document streams -> examples (causal, infilling, chat) -> packed rows.

Every stage is a different example source over the same packer, and every piece is resumable: its
`state_dict()` (JSON-able: file positions, the transform's RNG, partly packed rows) restores the exact
stream, so a resumed run sees the same tokens as an uninterrupted one.

Packing policy: rows hold `seq_len + 1` tokens (inputs = row[:-1], targets = row[1:]; rows do not
overlap, so a row's first token is context only). Documents are `BOS text EOS` (or an infilling
example) concatenated back to back, and a document that does not fit continues in the next row;
attention is not masked at document boundaries (as Llama). Documents are interleaved (`--interleave`,
8 open at once, each row piece continuing a random one), so a long file spreads over many steps. Chat
examples are packed one at a time and kept whole: one that does not fit in what is left of a row starts
a new row (the rest is padding with loss weight 0), and one longer than a row is skipped. Every token
carries a loss weight: 1 for documents, the answer mask for chat, 0 for padding.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from codellm.errors import UserError
from codellm.formats import chat_tokens, infill_example, split_document
from codellm.tokenizer import Tokenizer
from codellm.train.config import TrainConfig
from codellm.train.docstrings import docstring_dialogs
from codellm.train.streams import JsonlStream, corpus_files, rng_state, set_rng_state


@dataclass
class Example:
    ids: list[int]
    weights: list[int] | None = None  # loss weight per token; None = all 1
    whole: bool = False  # never split across rows (chat dialogs)


def fim_transform(tok: Tokenizer, rng: random.Random, text: str, max_len: int, fim_rate: float,
                  spm_rate: float) -> tuple[list[int], str]:
    """One document as a training sequence and its kind ("ar", "psm" or "spm").

    With probability `fim_rate` a document that fits in one row (`max_len` tokens) becomes an
    infilling example: two character positions split it into prefix/middle/suffix, and the order is SPM
    with probability `spm_rate`. Longer documents stay left-to-right (Code Llama paper §2.3).
    """
    ids = tok.encode(text, bos=True, eos=True)
    if len(ids) > max_len or rng.random() >= fim_rate:
        return ids, "ar"
    prefix, middle, suffix = split_document(rng, text)
    order = "spm" if rng.random() < spm_rate else "psm"
    return infill_example(tok, prefix, middle, suffix, order), order


def row_pieces(text: str, n_tokens: int, row_tokens: int) -> list[str]:
    """`text` (`n_tokens` long) cut at line ends into pieces of about 90% of a row each, from its own
    characters per token, so each piece fits a row and can become an infilling example."""
    chars = max(1, int(len(text) / n_tokens * row_tokens * 0.9))
    pieces, start = [], 0
    while start < len(text):
        end = start + chars
        if end < len(text) and (newline := text.rfind("\n", start, end)) > start:
            end = newline + 1
        pieces.append(text[start:end])
        start = end
    return pieces


class DocumentExamples:
    """Corpus documents as causal / infilling examples.

    `fim_level` "document" is the paper's rule: only a document that fits in a row can become an infilling
    example. "context" (Bavarian et al. 2022's context-level FIM) first cuts a longer document into row-sized
    pieces at line ends, each then a document of its own: with short rows most tokens sit in long files (a
    site-packages corpus at 1,024 tokens: 39% of documents but 3.5% of tokens fit), so small models trained
    on short rows learn infilling only this way."""

    def __init__(self, docs: JsonlStream, tok: Tokenizer, seq_len: int, fim_rate: float, spm_rate: float,
                 seed: int | str, fim_level: str = "document"):
        self.docs, self.tok, self.seq_len, self.fim_rate, self.spm_rate = docs, tok, seq_len, fim_rate, spm_rate
        self.rng, self.fim_level = random.Random(seed), fim_level
        self.pieces: list[str] = []  # the rest of a document cut into pieces ("context")

    def __next__(self) -> Example:
        if not self.pieces:
            text = next(self.docs)["text"]
            self.pieces = [text]
            if self.fim_level == "context" and (n := len(self.tok.encode(text, bos=True, eos=True))) > self.seq_len:
                self.pieces = row_pieces(text, n, self.seq_len + 1)
        ids, _ = fim_transform(self.tok, self.rng, self.pieces.pop(0), self.seq_len + 1, self.fim_rate,
                               self.spm_rate)
        return Example(ids)

    def state_dict(self) -> dict:
        return {"docs": self.docs.state_dict(), "rng": rng_state(self.rng), "pieces": list(self.pieces)}

    def load_state_dict(self, state: dict) -> None:
        self.docs.load_state_dict(state["docs"])
        set_rng_state(self.rng, state["rng"])
        self.pieces = list(state.get("pieces", []))


class ChatExamples:
    """Dialogs (lists of {role, content}) as [INST] examples with the loss on answers only.

    A dialog longer than a row is skipped: cut, it would lose its answer or the prompt the answer needs.
    """

    MAX_SKIPPED = 1000  # in a row: then no dialog fits and the stream would spin forever

    def __init__(self, dialogs: Iterator[list[dict]], tok: Tokenizer, max_len: int):
        self.dialogs, self.tok, self.max_len = dialogs, tok, max_len

    def __next__(self) -> Example:
        for _ in range(self.MAX_SKIPPED):
            ids, mask = chat_tokens(self.tok, next(self.dialogs))
            if len(ids) <= self.max_len:
                return Example(ids, mask, whole=True)
        raise UserError(f"{self.MAX_SKIPPED} dialogs in a row are longer than a row of {self.max_len} tokens: "
                        "raise --seq-len")

    def state_dict(self) -> dict:
        return self.dialogs.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.dialogs.load_state_dict(state)


class UserDialogs:
    """{"system"?, "messages": [...]} records of the user's SFT files as message lists."""

    def __init__(self, records: JsonlStream):
        self.records = records

    def __next__(self) -> list[dict]:
        return self.messages(next(self.records))

    @staticmethod
    def messages(record) -> list[dict]:
        if not isinstance(record, dict) or not isinstance(record.get("messages"), list):
            raise UserError(f"--sft-data: each line must be an object with a 'messages' list, got {str(record)[:80]}")
        system = [{"role": "system", "content": record["system"]}] if record.get("system") else []
        return system + record["messages"]

    def state_dict(self) -> dict:
        return self.records.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.records.load_state_dict(state)


class MinedDialogs:
    """Docstring -> function dialogs mined from Python documents (see docstrings.py)."""

    def __init__(self, docs: JsonlStream):
        self.docs, self.pending = docs, []

    def __next__(self) -> list[dict]:
        give_up = self.docs.pos["epoch"] + 2  # a whole epoch without a single documented function
        while not self.pending:
            if self.docs.pos["epoch"] >= give_up:
                raise UserError("no Python function with a docstring to mine in --corpus; "
                                "pass --no-mine-docstrings and --sft-data FILE")
            self.pending = docstring_dialogs(next(self.docs)["text"])
        return self.pending.pop(0)

    def state_dict(self) -> dict:
        return {"docs": self.docs.state_dict(), "pending": list(self.pending)}

    def load_state_dict(self, state: dict) -> None:
        self.docs.load_state_dict(state["docs"])
        self.pending = list(state["pending"])


class Mixture:
    """Draws each example from one of several sources with the given probabilities."""

    def __init__(self, sources: list[tuple[object, float]], seed: int | str):
        self.sources = [s for s, w in sources if w > 0]
        self.weights = [w for _, w in sources if w > 0]
        self.rng = random.Random(seed)

    def __next__(self):
        return next(self.rng.choices(self.sources, self.weights)[0])

    def state_dict(self) -> dict:
        return {"rng": rng_state(self.rng), "sources": [s.state_dict() for s in self.sources]}

    def load_state_dict(self, state: dict) -> None:
        set_rng_state(self.rng, state["rng"])
        for source, s in zip(self.sources, state["sources"], strict=True):
            source.load_state_dict(s)


class Packer:
    """Packs examples into rows of `seq_len + 1` tokens (see the module docstring for the policy).

    `interleave` examples are open at once, and each piece of a row continues a random one of them (a
    seeded, resumable choice): a document hundreds of rows long then spreads over hundreds of steps
    instead of filling consecutive ones (one 1 MB generated file flooded dozens of steps of the default
    model's run and moved its loss by 3 nats). 1 = one example at a time, in order; whole examples
    (dialogs) need that."""

    def __init__(self, examples, seq_len: int, pad_id: int, interleave: int = 1, seed: str = "pack"):
        self.examples, self.row_len, self.pad_id, self.interleave = examples, seq_len + 1, pad_id, interleave
        self.open: list[tuple[list[int], list[int]]] = []  # (ids, weights) of examples partly packed
        self.rng = random.Random(seed)

    def next_row(self) -> tuple[list[int], list[int]]:
        ids, weights = [], []
        while len(ids) < self.row_len:
            if len(self.open) < self.interleave:
                ex = next(self.examples)
                if ex.whole and self.interleave > 1:
                    raise ValueError("whole examples (dialogs) are packed one at a time: interleave=1")
                self.open.append((ex.ids, ex.weights if ex.weights is not None else [1] * len(ex.ids)))
                if ex.whole and len(ex.ids) > self.row_len - len(ids):
                    break  # pad this row; the dialog starts the next one (it fits in a row)
                continue
            i = self.rng.randrange(len(self.open)) if len(self.open) > 1 else 0
            ex_ids, ex_weights = self.open[i]
            take = self.row_len - len(ids)
            ids += ex_ids[:take]
            weights += ex_weights[:take]
            if len(ex_ids) > take:
                self.open[i] = (ex_ids[take:], ex_weights[take:])
            else:
                del self.open[i]
        pad = self.row_len - len(ids)
        return ids + [self.pad_id] * pad, weights + [0] * pad

    def next_batch(self, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(tokens, weights), each (rows, seq_len + 1)."""
        batch = [self.next_row() for _ in range(rows)]
        return torch.tensor([b[0] for b in batch]), torch.tensor([b[1] for b in batch], dtype=torch.float32)

    def state_dict(self) -> dict:
        return {"examples": self.examples.state_dict(), "open": [[list(i), list(w)] for i, w in self.open],
                "rng": rng_state(self.rng)}

    def load_state_dict(self, state: dict) -> None:
        self.examples.load_state_dict(state["examples"])
        if "open" in state:
            self.open = [(list(i), list(w)) for i, w in state["open"]]
            set_rng_state(self.rng, state["rng"])
        else:  # a checkpoint from before interleaving: one partly packed example
            self.open = [(list(state["rest"][0]), list(state["rest"][1]))] if state["rest"][0] else []


def make_batches(cfg: TrainConfig, tok: Tokenizer, seq_len: int, split: str, rank: int = 0,
                 world: int = 1) -> Packer | None:
    """The packed stream of one stage for this rank; None when `split` has nothing for the stage
    (e.g. validation of SFT on user dialogs only, which have no held-out split)."""
    d = cfg.data
    pad_id = tok.pad_id if tok.pad_id is not None else tok.eos_id

    def docs(langs: tuple[str, ...]) -> JsonlStream:
        keep = (lambda doc: doc.get("lang") in langs) if langs else None
        what = f"{'/'.join(langs)} documents" if langs else "documents"
        return JsonlStream(corpus_files(d.corpus, split), rank, world, cfg.seed, keep, what)

    documents = None
    if d.corpus is not None and (cfg.stage != "sft" or d.rehearsal > 0):
        documents = DocumentExamples(docs(d.langs), tok, seq_len, d.fim_rate, d.spm_rate,
                                     seed=f"{cfg.seed}-fim-{split}-{rank}", fim_level=d.fim_level)
    if cfg.stage != "sft":
        return Packer(documents, seq_len, pad_id, d.interleave, seed=f"{cfg.seed}-pack-{split}-{rank}")
    dialogs = []
    if d.mine_docstrings and d.corpus is not None:
        dialogs.append((MinedDialogs(docs(("python",))), d.mined_share if d.sft_data else 1.0))
    if d.sft_data and split == "train":
        files = [Path(f) for f in d.sft_data]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise UserError(f"--sft-data: no such file(s): {', '.join(missing)}")
        records = JsonlStream(files, rank, world, cfg.seed, what="SFT dialogs")
        dialogs.append((UserDialogs(records), 1.0 - d.mined_share if len(dialogs) else 1.0))
    if not dialogs:
        if split == "train":
            raise UserError("--stage sft has no dialogs: pass --sft-data FILE or mine a --corpus")
        return None
    chat = ChatExamples(Mixture(dialogs, seed=f"{cfg.seed}-dialogs-{split}-{rank}"), tok, seq_len + 1)
    rehearsal = d.rehearsal if documents is not None else 0.0
    examples = Mixture([(chat, 1.0 - rehearsal), (documents, rehearsal)], seed=f"{cfg.seed}-mix-{split}-{rank}")
    return Packer(examples, seq_len, pad_id)



SUMMARY_SAMPLE = 200  # Python documents mined to estimate the number of docstring dialogs
SUMMARY_TOKENIZED = 1000  # user dialogs tokenized to count those longer than a row


def sft_summary(cfg: TrainConfig, tok: Tokenizer) -> str:
    """One line saying how many dialogs an sft run has: the --sft-data files' counted, the docstring dialogs
    mined from the corpus estimated from its first Python documents (exact when there are few), and how many
    are longer than a row (ChatExamples skips those)."""
    d, row = cfg.data, cfg.data.seq_len + 1
    parts = []
    if d.sft_data:
        n = long = 0
        for n, (path, line) in enumerate(_lines(d.sft_data), 1):
            if n <= SUMMARY_TOKENIZED:
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise UserError(f"--sft-data {path}: a line is not JSON ({e})") from None
                long += len(chat_tokens(tok, UserDialogs.messages(record))[0]) > row
        checked = f"the first {SUMMARY_TOKENIZED:,}" if n > SUMMARY_TOKENIZED else "them"
        parts.append(f"--sft-data {n:,} dialog{'s' * (n != 1)} ({long:,} of {checked} longer than a row of {row} "
                     "tokens)")
    if d.mine_docstrings and d.corpus is not None:
        parts.append(_mined_dialogs(cfg, tok, row))
    rehearsal = f"; {d.rehearsal:.0%} of examples are pretraining documents" if d.corpus and d.rehearsal else ""
    return f"sft data: {' + '.join(parts) or 'no dialogs'}{rehearsal}"


def _lines(files) -> Iterator[tuple[str, bytes]]:
    for path in files:
        if Path(path).is_file():
            with open(path, "rb") as f:
                yield from ((path, line) for line in f if line.strip())


def _mined_dialogs(cfg: TrainConfig, tok: Tokenizer, row: int) -> str:
    from codellm.data.build import FORMAT
    from codellm.data.shards import load_manifest, read_corpus

    split = load_manifest(Path(cfg.data.corpus), FORMAT, "--corpus")["splits"]["train"]
    total = split.get("langs", {}).get("python", {}).get("docs")  # corpora built by `data build` have it
    docs = dialogs = long = 0
    for doc in read_corpus(Path(cfg.data.corpus), "train"):
        if doc.get("lang") != "python":
            continue
        if docs == SUMMARY_SAMPLE and total is not None:
            break
        docs += 1
        if docs <= SUMMARY_SAMPLE:
            found = docstring_dialogs(doc["text"])
            dialogs += len(found)
            long += sum(len(chat_tokens(tok, dialog)[0]) > row for dialog in found)
    total = docs if total is None else total
    if total <= SUMMARY_SAMPLE:
        return (f"{dialogs:,} docstring dialogs mined from {total:,} Python documents ({long:,} longer than a row "
                f"of {row} tokens)")
    scale = total / SUMMARY_SAMPLE
    return (f"~{dialogs * scale:,.0f} docstring dialogs mined from {total:,} Python documents (estimated from the "
            f"first {SUMMARY_SAMPLE}; ~{long * scale:,.0f} longer than a row of {row} tokens)")
