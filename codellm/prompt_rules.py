"""Prompts that must fit a context: one set of rules for the CLI, the server and the eval harness.

A completion prompt that is too long keeps BOS and its end (the text next to where generation starts).
An infilling prompt keeps the text next to the gap: the prefix its end, the suffix its start, cut at line
starts where possible (the suffix gets at least a quarter of the room, as llama.cpp's server splits it);
other files' text given as context fills what is left, keeping its end (nearest the prefix). Every
infilling prompt is built by `formats.infill_prompt`, the one FIM formatting function.
"""

from __future__ import annotations

from codellm import formats
from codellm.tokenizer import Tokenizer


def fit_completion(tok: Tokenizer, text: str, budget: int) -> tuple[list[int], bool]:
    """BOS + the prompt's tokens, its start dropped when there are more than `budget`; -> (ids, truncated)."""
    ids = tok.encode(text, bos=True)
    if len(ids) <= budget:
        return ids, False
    return ids[:1] + ids[len(ids) - budget + 1:], True


def fit_infill(tok: Tokenizer, prefix: str, suffix: str, order: str, budget: int,
               extra: list[tuple[str, str]] = ()) -> tuple[list[int], bool]:
    """Infilling prompt ids within `budget` tokens, with other files' text as context; -> (ids, truncated)."""
    avail = budget - len(formats.infill_prompt(tok, "", "", order))
    n_prefix, n_suffix = len(tok.encode(prefix)), len(tok.encode_nospace(suffix))
    truncated = n_prefix + n_suffix > avail
    if truncated:
        suffix = keep_start(tok, suffix, max(avail // 4, avail - n_prefix))
        prefix = keep_end(tok, prefix, avail - len(tok.encode_nospace(suffix)))
    context = context_text(list(extra))
    if context:
        room = avail - len(tok.encode(prefix)) - len(tok.encode_nospace(suffix))
        kept = keep_end(tok, context, room)
        truncated |= kept != context
        prefix = kept + prefix
    ids = formats.infill_prompt(tok, prefix, suffix, order)
    while len(ids) > budget:  # tokens can merge across the joins: drop a little more of the prefix
        truncated = True
        prefix = keep_end(tok, prefix, len(tok.encode(prefix)) - (len(ids) - budget))
        ids = formats.infill_prompt(tok, prefix, suffix, order)
    return ids, truncated


def context_text(extra: list[tuple[str, str]]) -> str:
    """Other files of the repository, each under a `--- filename ---` line, then a blank line."""
    parts = [f"--- {name} ---\n{text}" + ("" if text.endswith("\n") else "\n") for name, text in extra]
    return "".join(parts) + "\n" if parts else ""


def keep_end(tok: Tokenizer, text: str, limit: int) -> str:
    """The longest tail of `text` that encodes to at most `limit` tokens, starting at a line when it can."""
    start = _cut(lambda s: len(tok.encode(text[s:])), len(text), limit)
    if start > 0 and text[start - 1] != "\n" and (nl := text.find("\n", start)) >= 0 and nl + 1 < len(text):
        start = nl + 1
    return text[start:]


def keep_start(tok: Tokenizer, text: str, limit: int) -> str:
    """The longest head of `text` that encodes to at most `limit` tokens, ending after a newline when it can."""
    end = len(text) - _cut(lambda e: len(tok.encode_nospace(text[: len(text) - e])), len(text), limit)
    if end < len(text) and (nl := text.rfind("\n", 0, end)) > 0:
        end = nl + 1
    return text[:end]


def _cut(count, length: int, limit: int) -> int:
    """How many characters to drop (from the start of a tail, or the end of a head) so that count() <= limit.

    Drops in proportion to the excess, a few encodes in all (a binary search would encode long texts ~20 times).
    """
    if limit <= 0:
        return length
    cut = 0
    while cut < length and (n := count(cut)) > limit:
        cut = min(length, cut + max(1, (length - cut) * (n - limit) // n))
    return cut
