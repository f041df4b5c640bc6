"""The token formats of Code Llama: infilling (PSM/SPM) and the Llama-2 chat template.

This is the only place these formats exist: the pretraining FIM transform, SFT data, inference and the
server all call these functions, so training and serving cannot drift apart.

Infilling layouts (Meta's codellama `generation.py:infilling_prompt_tokens`, Code Llama paper §2.3):

    PSM:  <s> <PRE> enc(prefix) <SUF> enc_nospace(suffix) <MID> | enc_nospace(middle) <EOT>
    SPM:  <s> <PRE> <SUF> enc_nospace(suffix) <MID> enc(prefix) | ...middle <EOT>

`|` separates the prompt from what the model generates. The prefix keeps SentencePiece's implicit
leading space; suffix and middle do not (the middle is decoded as a continuation at inference).
"""

from __future__ import annotations

import random
from typing import Literal

from codellm.errors import UserError
from codellm.tokenizer import Tokenizer

Order = Literal["psm", "spm"]
ORDERS: tuple[Order, ...] = ("psm", "spm")

B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"
# Meta's chat_completion refuses messages containing these: they would forge turn boundaries.
RESERVED_MARKERS = (B_INST, E_INST, "<<SYS>>", "<</SYS>>")
ROLES = ("system", "user", "assistant")


def infill_prompt(tok: Tokenizer, prefix: str, suffix: str, order: Order = "psm") -> list[int]:
    """Prompt ids for filling the gap between `prefix` and `suffix`; generate until `tok.eot_id`."""
    bos, pre, suf, mid, _ = _infill_ids(tok, order)
    if order == "psm":
        return [bos, pre, *tok.encode(prefix), suf, *tok.encode_nospace(suffix), mid]
    return [bos, pre, suf, *tok.encode_nospace(suffix), mid, *tok.encode(prefix)]


def infill_text(prefix: str, suffix: str, order: Order = "psm") -> str:
    """The infilling prompt as text, for text-only APIs (TGI's `inputs`) in front of a Code Llama tokenizer,
    which reads the sentinels as its special pieces (Code Llama's own spacing: `<PRE> ` then the prefix)."""
    if order == "psm":
        return f"<PRE> {prefix} <SUF>{suffix} <MID>"
    return f"<PRE> <SUF>{suffix} <MID> {prefix}"


def infill_example(tok: Tokenizer, prefix: str, middle: str, suffix: str, order: Order = "psm") -> list[int]:
    """A FIM training sequence. No EOS follows <EOT> (the paper does not add one).

    SPM encodes prefix + middle as one string, as the Code Llama paper says: tokens never break at the
    prefix|middle boundary in SPM, while they can in PSM.
    """
    bos, pre, suf, mid, eot = _infill_ids(tok, order)
    if order == "psm":
        return infill_prompt(tok, prefix, suffix, "psm") + tok.encode_nospace(middle) + [eot]
    return [bos, pre, suf, *tok.encode_nospace(suffix), mid, *tok.encode(prefix + middle), eot]


def split_document(rng: random.Random, text: str) -> tuple[str, str, str]:
    """(prefix, middle, suffix) at two character positions drawn uniformly and sorted; pieces may be empty."""
    i, j = sorted(rng.randint(0, len(text)) for _ in range(2))
    return text[:i], text[i:j], text[j:]


def _infill_ids(tok: Tokenizer, order: str) -> tuple[int, int, int, int, int]:
    if order not in ORDERS:
        raise UserError(f"infilling order must be one of {', '.join(ORDERS)}, got {order!r}")
    if not tok.has_infilling or tok.bos_id is None:
        raise UserError("tokenizer has no infilling tokens (<s> <PRE> <SUF> <MID> <EOT>)")
    return tok.bos_id, tok.prefix_id, tok.suffix_id, tok.middle_id, tok.eot_id


def chat_text(messages: list[dict]) -> str:
    """The Llama-2 chat prompt as a string, byte-exact with Meta's `chat_completion` and HF's template."""
    out = []
    for user, answer in _turns(messages):
        out.append(f"<s>{B_INST} {user} {E_INST}")
        if answer is not None:
            out.append(f" {answer} </s>")
    return "".join(out)


def chat_tokens(tok: Tokenizer, messages: list[dict]) -> tuple[list[int], list[int]]:
    """(ids, loss_mask) of a dialog; the mask is 1 on each answer and the EOS that closes it.

    Each turn is encoded on its own, as Meta does, so a turn's tokens never merge with the next one.
    """
    ids: list[int] = []
    mask: list[int] = []
    for user, answer in _turns(messages):
        prompt = tok.encode(f"{B_INST} {user} {E_INST}", bos=True)
        if answer is None:
            ids += prompt
            mask += [0] * len(prompt)
            continue
        turn = tok.encode(f"{B_INST} {user} {E_INST} {answer} ", bos=True, eos=True)
        # The answer starts where the turn's tokens stop matching the prompt's (a merge across the
        # boundary, if the vocabulary has one, counts as answer).
        n_prompt = _common_prefix_len(prompt, turn)
        ids += turn
        mask += [0] * n_prompt + [1] * (len(turn) - n_prompt)
    return ids, mask


def _turns(messages: list[dict]) -> list[tuple[str, str | None]]:
    """Validated (user, answer) pairs, stripped; the system prompt is folded into the first user message.

    The last pair has answer None when the dialog ends with a user message (a prompt for generation).
    """
    _validate(messages)
    contents = [m["content"] for m in messages]
    if messages[0]["role"] == "system":
        contents = [B_SYS + contents[0] + E_SYS + contents[1]] + contents[2:]
    contents = [c.strip() for c in contents]
    users, answers = contents[0::2], contents[1::2]
    return [(u, answers[k] if k < len(answers) else None) for k, u in enumerate(users)]


def _validate(messages: list[dict]) -> None:
    has_system = bool(messages) and messages[0].get("role") == "system"
    if len(messages) <= has_system:
        raise UserError("chat: messages must contain at least one user message")
    for k, m in enumerate(messages):
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise UserError(f"chat: messages[{k}].role must be one of {', '.join(ROLES)}, got {role!r}")
        if not isinstance(content, str):
            raise UserError(f"chat: messages[{k}].content must be a string")
        if any(marker in content for marker in RESERVED_MARKERS):
            raise UserError(f"chat: messages[{k}].content contains a reserved marker "
                            f"({' '.join(RESERVED_MARKERS)})")
        expected = "user" if (k - has_system) % 2 == 0 else "assistant"
        if k >= has_system and role != expected:
            raise UserError(f"chat: messages[{k}].role must be {expected!r} (roles alternate user/assistant "
                            f"after an optional first system message), got {role!r}")


def _common_prefix_len(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n
