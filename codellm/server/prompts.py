"""Request fields -> prompt ids and SamplingParams: where the server turns text into tokens.

Infilling always goes through `formats.infill_prompt`, the one FIM formatting function; repository context
(`input_extra` of /infill) is plain text put in front of the prefix, so it passes through it too. When a
prompt does not fit, the prefix keeps its end and the suffix its start (the text next to the gap), cut at
line starts where possible; the context fills what is left, keeping its end (nearest the prefix).
"""

from __future__ import annotations

import secrets

from codellm import formats
from codellm.errors import UserError
from codellm.sampling import SamplingParams
from codellm.server.errors import ApiError, invalid
from codellm.tokenizer import Tokenizer

# Below this, sampling is greedy: logits divided by less overflow float32 (and the result is argmax anyway).
MIN_TEMPERATURE = 1e-3


def sampling(
    *,
    max_new_tokens: int,
    temperature: float,
    top_p: float | None = None,
    top_k: int | None = None,
    repetition_penalty: float | None = None,
    seed: int | None = None,
    stop: list[str] | None = None,
    logprobs: int | None = None,
) -> SamplingParams:
    """SamplingParams from request values that the schemas have range-checked; 0 and None mean "off".

    A sampled request without a seed gets a random one, so responses can report the seed they used.
    """
    temperature = 0.0 if temperature < MIN_TEMPERATURE else temperature
    if temperature > 0 and seed is None:
        seed = secrets.randbits(63)
    return SamplingParams(
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p or 1.0,
        top_k=max(top_k or 0, 0),
        repetition_penalty=repetition_penalty or 1.0,
        seed=seed if temperature > 0 else None,
        stop=tuple(stop or ()),
        logprobs=logprobs,
    )


def fit(context: int, n_prompt: int, max_new: int | None, default: int, *, prompt_field: str, max_field: str) -> int:
    """max_new_tokens for a prompt of n_prompt tokens: an explicit value must fit the context; the default
    is cut to what is left."""
    if n_prompt >= context:
        raise invalid(
            prompt_field,
            f"is {n_prompt} tokens but the model's context is {context} tokens (the prompt "
            "must leave room for at least one new token)",
        )
    room = context - n_prompt
    if max_new is None:
        return min(default, room)
    if max_new > room:
        raise invalid(
            max_field,
            f"must be <= {room}: the prompt's {n_prompt} tokens + {max_field} must fit the "
            f"context of {context} tokens (got {max_new})",
        )
    return max_new


def completion_ids(tok: Tokenizer, prompt: str | list[int], field: str = "prompt") -> list[int]:
    if isinstance(prompt, str):
        return tok.encode(prompt, bos=True)
    if min(prompt) < 0 or max(prompt) >= tok.vocab_size:
        raise invalid(field, f"token ids must lie in [0, {tok.vocab_size}) (got {min(prompt)}..{max(prompt)})")
    return list(prompt)


def truncated_ids(tok: Tokenizer, text: str, keep: int | None) -> list[int]:
    """TGI's `truncate`: only the last `keep` tokens of the input, after BOS."""
    ids = tok.encode(text)
    return [tok.bos_id] + (ids[-keep:] if keep is not None else ids)


def chat_ids(tok: Tokenizer, messages: list[dict]) -> list[int]:
    try:
        return formats.chat_tokens(tok, messages)[0]
    except UserError as e:
        raise invalid("messages", str(e).removeprefix("chat: ")) from None


def require_infilling(tok: Tokenizer, field: str) -> None:
    if not tok.has_infilling:
        raise ApiError(
            "not_supported",
            f"{field}: this model's tokenizer has no infilling tokens (<PRE> <SUF> <MID> "
            "<EOT>), so it cannot fill in the middle",
            field,
        )


def infill_ids(tok: Tokenizer, prefix: str, suffix: str, order: str = "psm") -> list[int]:
    require_infilling(tok, "suffix")
    return formats.infill_prompt(tok, prefix, suffix, order)


def infill_with_context(
    tok: Tokenizer, prefix: str, suffix: str, order: str, extra: list[tuple[str, str]], budget: int
) -> tuple[list[int], bool]:
    """Infilling prompt ids within `budget` tokens, with other files' text as context; -> (ids, truncated)."""
    require_infilling(tok, "input_prefix")
    avail = budget - len(formats.infill_prompt(tok, "", "", order))
    n_prefix, n_suffix = len(tok.encode(prefix)), len(tok.encode_nospace(suffix))
    truncated = n_prefix + n_suffix > avail
    if truncated:  # llama.cpp's split: the suffix gets at least a quarter, the prefix the rest
        suffix = keep_start(tok, suffix, max(avail // 4, avail - n_prefix))
        prefix = keep_end(tok, prefix, avail - len(tok.encode_nospace(suffix)))
    context = context_text(extra)
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
