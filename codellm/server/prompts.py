"""Request fields -> prompt ids and SamplingParams: where the server turns text into tokens.

Infilling always goes through `formats.infill_prompt`, the one FIM formatting function; repository context
(`input_extra` of /infill) is plain text put in front of the prefix, so it passes through it too. Prompts
that do not fit follow codellm/prompt_rules.py, the rules the eval harness uses too; here they become
errors named after the request's fields.
"""

from __future__ import annotations

import secrets

from codellm import formats
from codellm.errors import UserError
from codellm.prompt_rules import fit_infill
from codellm.sampling import MIN_TEMPERATURE, SamplingParams
from codellm.server.errors import ApiError, invalid
from codellm.tokenizer import Tokenizer


def sampling(
    *,
    max_new_tokens: int,
    temperature: float,
    top_p: float | None = None,
    top_k: int | None = None,
    repetition_penalty: float | None = None,
    presence_penalty: float | None = None,
    frequency_penalty: float | None = None,
    typical_p: float | None = None,
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
        presence_penalty=presence_penalty or 0.0,
        frequency_penalty=frequency_penalty or 0.0,
        typical_p=typical_p or 1.0,
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
    return fit_infill(tok, prefix, suffix, order, budget, extra)
