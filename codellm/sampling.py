"""The sampling contract every generator follows: `SamplingParams`, the next-token rule `sample_next`
(Llama / HF semantics), per-request RNGs, prompt-length checks, and token healing (a prompt's last token
backed off, the first new token restricted). The reference generator (generate.py) and the engine both
sample through here, which is what makes a seeded request draw the same tokens in either.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from codellm.errors import UserError

# Below this, sampling is greedy: logits divided by less overflow float32 (and the result is argmax anyway).
MIN_TEMPERATURE = 1e-3


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0 means greedy
    top_p: float = 1.0  # nucleus: keep the smallest set of tokens whose probability reaches top_p
    top_k: int = 0  # 0 means no top-k cut
    repetition_penalty: float = 1.0  # CTRL/HF rule over prompt and generated tokens; 1 is off
    # OpenAI's rule over the generated tokens only (as vLLM): logit -= frequency * count + presence * (count > 0)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    typical_p: float = 1.0  # locally typical sampling (Meister et al. 2022, HF's TypicalLogitsWarper); 1 is off
    seed: int | None = None
    stop: tuple[str, ...] = ()  # stop strings, matched on decoded text, not included in the output
    stop_ids: tuple[int, ...] = ()  # extra stop token ids (EOS and EOT always stop)
    # engine only: put each sampled token's log-probability on its event, and the `logprobs` likeliest
    # alternatives (0: none); None: compute nothing. Raw model distribution: before penalty and temperature.
    logprobs: int | None = None
    # token healing: back off the prompt's last token when longer tokens start with its text (a prompt that
    # ends in "\n" before a tokenizer's "\n    " tokens), and let the first new token start with that text
    heal: bool = False

    def __post_init__(self):
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_ids", tuple(self.stop_ids))
        problems = []
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            problems.append(f"max_new_tokens must be an integer >= 1 (got {self.max_new_tokens!r})")
        if not self.temperature >= 0:
            problems.append(f"temperature must be >= 0 (got {self.temperature!r})")
        if not 0 < self.top_p <= 1:
            problems.append(f"top_p must be in (0, 1] (got {self.top_p!r})")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            problems.append(f"top_k must be an integer >= 0 (got {self.top_k!r})")
        if not self.repetition_penalty > 0:
            problems.append(f"repetition_penalty must be > 0 (got {self.repetition_penalty!r})")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                problems.append(f"{name} must be in [-2, 2] (got {getattr(self, name)!r})")
        if not 0 < self.typical_p <= 1:
            problems.append(f"typical_p must be in (0, 1] (got {self.typical_p!r})")
        if any(not isinstance(s, str) or not s for s in self.stop):
            problems.append("stop strings must be non-empty strings")
        if self.logprobs is not None and (not isinstance(self.logprobs, int) or not 0 <= self.logprobs <= 20):
            problems.append(f"logprobs must be an integer in [0, 20] or None (got {self.logprobs!r})")
        if problems:
            raise UserError("; ".join(problems))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def penalised(self) -> bool:
        """Whether sampling reads the tokens so far (a penalty is on): callers pass them as `context`."""
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0


def sample_next(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None,
                context: torch.Tensor | None = None, n_prompt: int = 0) -> int:
    """Pick the next token from one row of logits (vocab,), a pure function of its inputs. `context` holds
    the prompt's `n_prompt` ids and then the generated ones (needed when `params.penalised`).

    Order (vLLM's and TGI's): repetition penalty, presence/frequency penalties, then (sampling only)
    temperature, top-k, top-p, typical-p."""
    logits = penalise(logits.float(), params, context, n_prompt)
    if params.greedy:
        return int(logits.argmax())
    logits = logits / params.temperature
    if params.top_k:
        kth = torch.topk(logits, min(params.top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if params.top_p < 1.0:
        # Llama's rule: drop a token when the mass strictly before it already reaches top_p
        sorted_probs, order = probs.sort(descending=True)
        drop = sorted_probs.cumsum(0) - sorted_probs > params.top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(0, order, sorted_probs)
    if params.typical_p < 1.0:
        probs = typical(probs / probs.sum(), params.typical_p)
    return int(torch.multinomial(probs / probs.sum(), 1, generator=generator))


def penalise(logits: torch.Tensor, params: SamplingParams, context: torch.Tensor | None, n_prompt: int = 0):
    """logits (vocab,) float32 with the repetition penalty (CTRL/HF: every token of `context`) and OpenAI's
    presence/frequency penalties (the generated tokens, `context[n_prompt:]`) applied."""
    if context is None or not context.numel():
        return logits
    if params.repetition_penalty != 1.0:
        seen = logits[context]
        logits = logits.scatter(0, context, torch.where(seen > 0, seen / params.repetition_penalty,
                                                        seen * params.repetition_penalty))
    generated = context[n_prompt:]
    if (params.presence_penalty or params.frequency_penalty) and generated.numel():
        counts = torch.bincount(generated, minlength=logits.numel()).to(logits.dtype)
        logits = logits - params.frequency_penalty * counts - params.presence_penalty * (counts > 0).to(logits.dtype)
    return logits


def typical(probs: torch.Tensor, mass: float) -> torch.Tensor:
    """Locally typical sampling: keep the tokens whose surprisal is closest to the distribution's entropy
    until they hold `mass` of the probability (at least one token); HF's TypicalLogitsWarper rule, on a
    normalised probability row (zeros stay out)."""
    logp = probs.log()
    entropy = -(probs * logp).nansum()
    shifted = (-logp - entropy).abs()  # inf for tokens already dropped: they sort last
    sorted_shift, order = shifted.sort()
    cumulative = probs[order].cumsum(0)
    last = min(int((cumulative < mass).sum()), probs.numel() - 1)
    drop = sorted_shift > sorted_shift[last]
    drop[0] = False
    return probs.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), 0.0)


def make_generator(seed: int | None, device="cpu") -> torch.Generator:
    gen = torch.Generator(device=device)
    if seed is None:
        gen.seed()
    else:
        gen.manual_seed(seed)
    return gen


@dataclass(frozen=True)
class Healing:
    """A healed prompt's backed-off text, and the tokens the first new token may be (their text starts
    with it); the text is already in the caller's prompt, so it is not output again."""

    text: str
    allowed: tuple[int, ...]


def heal_prompt(tok, ids: list[int]) -> tuple[list[int], Healing | None]:
    """Token healing (Lundberg 2023, guidance): a prompt that ends inside what the tokenizer would merge
    with the next text (e.g. "\n" where training text has "\n   " + " return") ends on a token the model
    rarely saw followed by code. Back off that token and constrain the first new one to start with its
    text, so the model picks the merged token itself. Prompts whose last token no longer token extends
    are left as they are."""
    if len(ids) < 2 or tok.is_special(ids[-1]):
        return ids, None
    texts = tok.continuation_texts
    tail = texts[ids[-1]]
    if not tail or "\ufffd" in tail:  # a piece of a multi-byte character: no text to match
        return ids, None
    allowed = tuple(i for i, t in enumerate(texts) if t.startswith(tail) and not tok.is_special(i))
    return (ids[:-1], Healing(tail, allowed)) if len(allowed) > 1 else (ids, None)


def restrict(logits: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """logits (vocab,) with every token outside `allowed` (ids) at -inf."""
    return torch.full_like(logits, float("-inf")).index_copy_(0, allowed, logits[allowed])


def check_prompt_fits(prompt_len: int, max_seq_len: int):
    if prompt_len >= max_seq_len:
        raise UserError(f"prompt is {prompt_len} tokens but the model's context is {max_seq_len} tokens "
                        "(it must leave room for at least one new token)")
