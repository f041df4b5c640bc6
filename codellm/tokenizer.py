"""Tokenizer: one API over SentencePiece (`tokenizer.model`) and HF tokenizers (`tokenizer.json`) files.

Special ids (BOS/EOS/pad and the infilling tokens) are always looked up by name in the loaded tokenizer,
never hard-coded: Code Llama's pieces are `▁<PRE>` `▁<SUF>` `▁<MID>` `▁<EOT>` (ids 32007-32010), the
tokenizers codellm trains name them `<PRE>` `<SUF>` `<MID>` `<EOT>`.

Leading spaces. SentencePiece adds an implicit leading space ("dummy prefix") to every `encode`, and
its decoders strip the first space of their output. Infilling needs text encoded without that space
(`encode_nospace`) and generated text decoded as a continuation that keeps it (`decode_continuation`,
`IncrementalDecoder`). Meta's `encode("☺" + s)[2:]` trick is not used: it silently drops a real token
whenever the vocabulary merges `▁☺`. Instead a second tokenizer is built with the leading-space rule
switched off, which matches transformers' `CodeLlamaTokenizer(legacy=False)` id for id.
"""

from __future__ import annotations

import json
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import sentencepiece as spm
import tokenizers
from sentencepiece import sentencepiece_model_pb2

from codellm.errors import UserError

# Candidate names per infilling role; a tokenizer_config.json entry (e.g. "prefix_token") comes first.
INFILL_PIECES = {
    "prefix": ("▁<PRE>", "<PRE>"),
    "suffix": ("▁<SUF>", "<SUF>"),
    "middle": ("▁<MID>", "<MID>"),
    "eot": ("▁<EOT>", "<EOT>"),
}


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load the tokenizer of a checkpoint directory; `tokenizer.json` wins over `tokenizer.model`."""
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"tokenizer: directory {path} does not exist")
    config = _read_config(path / "tokenizer_config.json")
    if (path / "tokenizer.json").is_file():
        return HFTokenizer(path / "tokenizer.json", config)
    if (path / "tokenizer.model").is_file():
        return SentencePieceTokenizer(path / "tokenizer.model", config, read_added_tokens(path, config))
    if (path / "vocab.json").is_file() and (path / "merges.txt").is_file():  # CodeT5's RoBERTa-style files
        from codellm.t5.tokenizer import tokenizer_json

        with tokenizer_json(path, config, read_added_tokens(path, config)) as json_path:
            return HFTokenizer(json_path, config)
    raise UserError(f"tokenizer: {path} contains neither tokenizer.json nor tokenizer.model (nor CodeT5's "
                    "vocab.json + merges.txt)")


class Tokenizer(ABC):
    """Text <-> ids. Subclasses provide the backend; ids of special tokens are set by `_init_ids`."""

    vocab_size: int
    bos_id: int | None
    eos_id: int | None
    pad_id: int | None
    prefix_id: int | None
    suffix_id: int | None
    middle_id: int | None
    eot_id: int | None
    special_ids: frozenset[int]  # never part of decoded text

    @abstractmethod
    def _encode(self, text: str, nospace: bool) -> list[int]: ...

    @abstractmethod
    def _decode(self, ids: list[int]) -> str: ...

    @abstractmethod
    def piece_to_id(self, piece: str) -> int | None:
        """Id of a vocabulary entry, None if the vocabulary has no such entry."""

    def _init_ids(self, config: dict, bos: int | None, eos: int | None, pad: int | None,
                  special: set[int]) -> None:
        self.bos_id, self.eos_id, self.pad_id = bos, eos, pad
        for role, names in INFILL_PIECES.items():
            configured = _token_name(config.get(f"{role}_token"))
            candidates = ([configured] if configured else []) + list(names)
            ids = [self.piece_to_id(name) for name in candidates]
            setattr(self, f"{role}_id", next((i for i in ids if i is not None), None))
        named = (bos, eos, pad, self.prefix_id, self.suffix_id, self.middle_id, self.eot_id)
        self.special_ids = frozenset(special | {i for i in named if i is not None})
        self._anchor = self._find_anchor()
        self._anchor_text = self._decode([self._anchor])

    def _find_anchor(self) -> int:
        # A plain token to decode in front of a continuation: decoders strip the first "▁" of their
        # output, so decoding [anchor, *ids] and dropping the anchor's text keeps the leading space.
        for text in ("\n", "a"):
            ids = self._encode(text, nospace=True)
            if len(ids) == 1 and self._decode(ids) == text:
                return ids[0]
        raise UserError("tokenizer: cannot encode '\\n' or 'a' as a single token")

    @property
    def has_infilling(self) -> bool:
        return None not in (self.prefix_id, self.suffix_id, self.middle_id, self.eot_id)

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        """Like Meta's `Tokenizer.encode`: SentencePiece adds its implicit leading space."""
        ids = self._encode(text, nospace=False)
        if bos:
            ids.insert(0, self._require(self.bos_id, "BOS"))
        if eos:
            ids.append(self._require(self.eos_id, "EOS"))
        return ids

    def encode_nospace(self, text: str) -> list[int]:
        """Encode without the implicit leading space (Meta's `encode_infilling`)."""
        return self._encode(text, nospace=True)

    def decode(self, ids: list[int]) -> str:
        """Text of `ids`, special tokens skipped; SentencePiece-style decoders drop one leading space."""
        return self._decode([i for i in ids if i not in self.special_ids])

    def decode_continuation(self, ids: list[int]) -> str:
        """Text of `ids` as it continues earlier text: keeps a leading space (Meta's `decode_infilling`)."""
        text = self._decode([self._anchor] + [i for i in ids if i not in self.special_ids])
        return text[len(self._anchor_text):]

    @cached_property
    def continuation_texts(self) -> list[str]:
        """Every token's text as a continuation (token healing matches a prompt's tail against them)."""
        return [self.decode_continuation([i]) for i in range(self.vocab_size)]

    def is_special(self, token_id: int) -> bool:
        return token_id in self.special_ids

    def stream_decoder(self) -> IncrementalDecoder:
        return IncrementalDecoder(self)

    def _require(self, token_id: int | None, name: str) -> int:
        if token_id is None:
            raise UserError(f"tokenizer: has no {name} token")
        return token_id


class SentencePieceTokenizer(Tokenizer):
    """`tokenizer.model`, plus the tokens a transformers save adds on top of it (`read_added_tokens`):
    Code Llama's infilling tokens may live there instead of in the SentencePiece vocabulary."""

    def __init__(self, model_path: Path, config: dict, added: dict[int, AddedToken] | None = None):
        proto = model_path.read_bytes()
        try:
            self._sp = spm.SentencePieceProcessor(model_proto=proto)
            self._sp_nospace = spm.SentencePieceProcessor(model_proto=_without_dummy_prefix(proto))
        except Exception as e:  # sentencepiece raises bare RuntimeError / protobuf DecodeError
            raise UserError(f"tokenizer: {model_path} is not a SentencePiece model ({e})") from e
        sp, added = self._sp, added or {}
        n_pieces = sp.get_piece_size()
        extra = sorted(i for i in added if i >= n_pieces)
        if extra and extra != list(range(n_pieces, n_pieces + len(extra))):
            gap = next(i for i in range(n_pieces, extra[-1]) if i not in added)
            raise UserError(f"tokenizer: added tokens must continue {model_path.name}'s {n_pieces} pieces without "
                            f"a gap, but id {gap} is missing (ids {extra[0]}..{extra[-1]})")
        self.vocab_size = n_pieces + len(extra)
        self._added_ids = {t.content: i for i, t in added.items()}  # looked up before the pieces, as transformers does
        self._added_text = {i: added[i].content for i in extra}  # text of ids beyond the SentencePiece vocabulary
        # Non-special added tokens split the text before SentencePiece sees it; special ones stay text.
        self._split_tokens = {t.content: (i, t) for i, t in added.items() if not t.special and t.content}
        self._split_re = re.compile("|".join(map(re.escape, sorted(self._split_tokens, key=len, reverse=True))))
        optional = lambda i: i if i >= 0 else None  # sentencepiece says -1 for "no such token"
        control = {i for i in range(n_pieces) if sp.is_control(i)} | {i for i, t in added.items() if t.special}
        self._init_ids(config, optional(sp.bos_id()), optional(sp.eos_id()), optional(sp.pad_id()), control)

    def _encode(self, text: str, nospace: bool) -> list[int]:
        if not self._split_tokens:
            return (self._sp_nospace if nospace else self._sp).encode(text)
        # transformers' (legacy=False) slow Llama tokenizer: the dummy prefix goes in front of the whole text,
        # which is split at added tokens; each piece of text between them is encoded without a dummy prefix.
        text = text if nospace or not text else " " + text
        ids, start, pending = [], 0, []
        for match in self._split_re.finditer(text):
            token_id, token = self._split_tokens[match.group()]
            pending.append((text[start:match.start()], token.lstrip, token_id, token.rstrip))
            start = match.end()
        chunks, strip_next = [], False
        for chunk, lstrip, token_id, rstrip in pending:
            chunk = chunk.lstrip() if strip_next else chunk
            chunks.append((chunk.rstrip() if lstrip else chunk, token_id))
            strip_next = rstrip
        last = text[start:]
        chunks.append((last.lstrip() if strip_next else last, None))
        for chunk, token_id in chunks:
            ids += self._sp_nospace.encode(chunk) if chunk else []
            ids += [token_id] if token_id is not None else []
        return ids

    def _decode(self, ids: list[int]) -> str:
        if not self._added_text:
            return self._sp.decode(ids)
        # runs of SentencePiece ids between added tokens; only the first run drops its leading space
        parts, run = [], []
        for i in [*ids, None]:
            if i is not None and i not in self._added_text:
                run.append(i)
                continue
            if run:
                parts.append((self._sp_nospace if parts else self._sp).decode(run))
                run = []
            if i is not None:
                parts.append(self._added_text[i])
        return "".join(parts)

    def piece_to_id(self, piece: str) -> int | None:
        if piece in self._added_ids:
            return self._added_ids[piece]
        i = self._sp.piece_to_id(piece)  # unknown pieces map to the unk id
        return i if self._sp.id_to_piece(i) == piece else None


class HFTokenizer(Tokenizer):
    def __init__(self, json_path: Path, config: dict):
        try:
            spec = json.loads(json_path.read_text(encoding="utf-8"))
            self._tok = tokenizers.Tokenizer.from_str(json.dumps(spec))  # decodes
            self._tok_nospace = tokenizers.Tokenizer.from_str(json.dumps(_without_prefix_space(spec)))
        except Exception as e:  # json errors or tokenizers' own Exception on a bad spec
            raise UserError(f"tokenizer: {json_path} is not a valid tokenizer.json ({e})") from e
        # All encoding goes through _tok_nospace, adding SentencePiece's dummy prefix by hand when the file
        # has one: tokenizer.json variants differ from SentencePiece at the edges (Metaspace "first" adds
        # no space to text that starts with one; a Prepend normalizer adds one after every added token).
        self._dummy_prefix = self._tok.encode("a").ids != self._tok_nospace.encode("a").ids
        # Literal "<s>" or "<PRE>" in user text or training data must stay text, never become control tokens.
        self._tok_nospace.encode_special_tokens = True
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        special = {i for i, t in self._tok.get_added_tokens_decoder().items() if t.special}
        named = lambda key, default: self.piece_to_id(_token_name(config.get(key)) or default)
        self._init_ids(config, named("bos_token", "<s>"), named("eos_token", "</s>"),
                       named("pad_token", "<pad>"), special)

    def _encode(self, text: str, nospace: bool) -> list[int]:
        if self._dummy_prefix and not nospace and text:
            text = " " + text
        return self._tok_nospace.encode(text, add_special_tokens=False).ids

    def _decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=False)

    def piece_to_id(self, piece: str) -> int | None:
        return self._tok.token_to_id(piece)


class IncrementalDecoder:
    """Turns a stream of generated ids into text deltas whose concatenation is the continuation's text.

    Keeps a small window: the tokens emitted last (context, so leading spaces and merges decode right)
    plus tokens held back while they end in an incomplete UTF-8 character (decoders show those as
    U+FFFD). Each step decodes only the window, so the cost per token does not grow with the output.
    This is the prefix_offset/read_offset technique of TGI and vLLM.
    """

    MAX_HELD = 16  # give up waiting for a character to complete: the model produced invalid UTF-8

    def __init__(self, tok: Tokenizer):
        self._tok = tok
        self._window = [tok._anchor]  # the anchor stands in for earlier text (see decode_continuation)
        self._read = 1  # window[:_read] was emitted, window[_read:] is held back
        self._emitted = tok._anchor_text

    def push(self, token_id: int) -> str:
        """Feed one id; returns the text it completes (often "", e.g. for special tokens)."""
        if self._tok.is_special(token_id):
            return ""
        self._window.append(token_id)
        text = self._tok._decode(self._window)
        if text.endswith("\ufffd") and len(self._window) - self._read < self.MAX_HELD:
            return ""
        return self._emit(text)

    def flush(self) -> str:
        """Text still held back at the end of generation (an incomplete character shows as U+FFFD)."""
        if self._read == len(self._window):
            return ""
        return self._emit(self._tok._decode(self._window))

    def _emit(self, text: str) -> str:
        delta = text[len(self._emitted):]
        self._window = self._window[self._read:]
        self._read = len(self._window)
        self._emitted = self._tok._decode(self._window)
        return delta


@dataclass(frozen=True)
class AddedToken:
    """A token transformers keeps beside the SentencePiece vocabulary (its `AddedToken`)."""
    content: str
    special: bool
    lstrip: bool = False  # swallows the whitespace on its left when it splits text
    rstrip: bool = False


SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


def read_added_tokens(folder: Path, config: dict) -> dict[int, AddedToken]:
    """Added tokens of a slow-tokenizer save, id -> token, read as transformers reads them:
    tokenizer_config.json's `added_tokens_decoder` when it has one, else the legacy `added_tokens.json`
    (content -> id; special when tokenizer_config.json or special_tokens_map.json names it)."""
    source = folder / "tokenizer_config.json"
    if "added_tokens_decoder" in config:
        decoder = config["added_tokens_decoder"]
        if not isinstance(decoder, dict):
            raise UserError(f"tokenizer: {source}: added_tokens_decoder must be an object of id -> token")
        tokens = {}
        for key, entry in decoder.items():
            if not (isinstance(key, str) and key.isdigit()) or not isinstance(entry, dict) \
                    or not isinstance(entry.get("content"), str):
                raise UserError(f"tokenizer: {source}: added_tokens_decoder entry {key!r} must map a "
                                f"non-negative id to {{\"content\": ..., \"special\": ...}}")
            tokens[int(key)] = AddedToken(entry["content"], bool(entry.get("special", False)),
                                          bool(entry.get("lstrip", False)), bool(entry.get("rstrip", False)))
        return tokens
    path = folder / "added_tokens.json"
    if not path.is_file():
        return {}
    encoder = _read_config(path)
    if not isinstance(encoder, dict) or not all(isinstance(i, int) and i >= 0 for i in encoder.values()):
        raise UserError(f"tokenizer: {path} must be an object of token -> non-negative id")
    names = set()
    for spec in (config, _read_config(folder / "special_tokens_map.json")):
        names |= {_token_name(spec.get(key)) for key in SPECIAL_TOKEN_KEYS}
        names |= {_token_name(t) for t in spec.get("additional_special_tokens") or []}
    return {i: AddedToken(content, content in names) for content, i in encoder.items()}


def _read_config(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise UserError(f"tokenizer: {path} is not valid JSON ({e})") from e


def _token_name(value: str | dict | None) -> str | None:
    """tokenizer_config.json writes special tokens as a string or as an AddedToken dict."""
    return value.get("content") if isinstance(value, dict) else value


def _without_dummy_prefix(proto: bytes) -> bytes:
    model = sentencepiece_model_pb2.ModelProto.FromString(proto)
    model.normalizer_spec.add_dummy_prefix = False
    return model.SerializeToString()


def _without_prefix_space(spec: dict) -> dict:
    """A tokenizer.json spec that encodes text without a leading "▁"/space (Code Llama's or ours)."""
    spec = dict(spec)
    spec["normalizer"] = _drop_prepend(spec.get("normalizer"))
    spec["pre_tokenizer"] = _no_prefix_pretokenizer(spec.get("pre_tokenizer"))
    return spec


def _drop_prepend(normalizer: dict | None) -> dict | None:
    if normalizer is None or normalizer["type"] == "Prepend":
        return None
    if normalizer["type"] == "Sequence":
        kept = [n for n in map(_drop_prepend, normalizer["normalizers"]) if n is not None]
        return {**normalizer, "normalizers": kept}
    return normalizer


def _no_prefix_pretokenizer(pre: dict | None) -> dict | None:
    if pre is None:
        return None
    if pre["type"] == "Sequence":
        return {**pre, "pretokenizers": [_no_prefix_pretokenizer(p) for p in pre["pretokenizers"]]}
    if pre["type"] == "Metaspace":
        pre = {k: v for k, v in pre.items() if k != "add_prefix_space"}  # pre-0.15 spelling
        return {**pre, "prepend_scheme": "never"}
    if pre["type"] == "ByteLevel":
        return {**pre, "add_prefix_space": False}
    return pre
