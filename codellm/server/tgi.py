"""Text Generation Inference's API: POST /generate, /generate_stream and / (compat); sagemaker.py reuses it.

    {"inputs": "def f(", "parameters": {"max_new_tokens": 32, "details": true}}
    -> {"generated_text": "...", "details": {"finish_reason": "eos_token", "generated_tokens": 9, "seed": null,
                                            "prefill": [], "tokens": [{"id", "text", "logprob", "special"}]}}

Sampling: greedy unless `do_sample` is true or temperature/top_k/top_p/typical_p ask for sampling (TGI's
rule); temperature 0 is greedy and top_p/typical_p 1 are off (TGI rejects them). `frequency_penalty` is
OpenAI's rule (sampling.py). The default max_new_tokens is 256, cut to what the context leaves. A stop
sequence that matched stays at the end of `generated_text` (TGI's rule; OpenAI routes drop it). A token's
`text` is the text it completed in the stream (UTF-8 and stop-string hold-back applied, the matched stop
sequence on the last token, so the texts add up to `generated_text`); special tokens (EOS, EOT) add no text
of their own (TGI shows "</s>"), only what the decoder still held.

`best_of` N (<= --max-best-of, sampling only, no seed, not streamed) samples N sequences and answers with
the one of highest mean token log-probability, the others in `details.best_of_sequences` (TGI's rule).
`decoder_input_details` (not streamed) fills `details.prefill` with the prompt tokens and their
log-probabilities (the first has none).
Errors before a stream opens are HTTP errors (422, 429, ...); after, an event `data:{"error","error_type"}`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from functools import partial

from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from codellm.sampling import SamplingParams
from codellm.server.endpoints import endpoint, open_stream, read_json, run_to_end, stream_items
from codellm.server.errors import TGI, invalid
from codellm.server.prompts import fit, sampling, truncated_ids
from codellm.server.schemas import TGIParameters, TGIRequest, parse
from codellm.server.scoring import prompt_logprobs
from codellm.server.service import Choice, Service
from codellm.server.sse import EventStream, event

DEFAULT_MAX_NEW_TOKENS = 256
FINISH = {"eos": "eos_token", "eot": "eos_token", "stop": "stop_sequence", "length": "length"}


def routes(service: Service) -> list[Route]:
    route = lambda path, fn: Route(path, endpoint(service, TGI, partial(fn, service)), methods=["POST"])
    return [
        route("/generate", generate),
        route("/generate_stream", generate_stream),
        route("/", compat),
    ]


@dataclass
class Job:
    inputs: str
    ids: list[int]
    params: list[SamplingParams]  # one per sequence (best_of)
    p: TGIParameters


def prepare(service: Service, req: TGIRequest, stream: bool = False) -> Job:
    p, limits = req.params, service.limits
    if p.stop and len(p.stop) > limits.max_stop:
        raise invalid("parameters.stop", f"at most {limits.max_stop} stop sequences (got {len(p.stop)})")
    sample = bool(p.do_sample) or any(
        v not in (None, off) for v, off in ((p.temperature, 1.0), (p.top_k, 0), (p.top_p, 1.0), (p.typical_p, 1.0))
    )
    best_of = p.best_of or 1
    if best_of > 1:
        if best_of > limits.max_best_of:
            raise invalid("parameters.best_of", f"must be <= {limits.max_best_of} (--max-best-of; got {best_of})")
        if not sample:
            raise invalid("parameters.best_of", "best_of > 1 needs sampling: set do_sample, temperature, top_k, "
                          "top_p or typical_p")
        if p.seed is not None:
            raise invalid("parameters.seed", "must be unset when best_of > 1 (each sequence draws its own)")
        if stream:
            raise invalid("parameters.best_of", "best_of > 1 is not allowed when streaming")
    if p.decoder_input_details and stream:
        raise invalid("parameters.decoder_input_details", "is not allowed when streaming")
    if p.truncate is not None and p.truncate >= limits.context:
        raise invalid("parameters.truncate", f"must be < {limits.context}, the context (got {p.truncate})")
    ids = truncated_ids(service.tok, req.inputs, p.truncate)
    max_new = fit(
        limits.context,
        len(ids),
        p.max_new_tokens,
        DEFAULT_MAX_NEW_TOKENS,
        prompt_field="inputs",
        max_field="parameters.max_new_tokens",
    )
    temperature = (1.0 if p.temperature is None else p.temperature) if sample else 0.0
    params = [
        sampling(
            max_new_tokens=max_new,
            temperature=temperature,
            top_p=p.top_p,
            top_k=p.top_k,
            repetition_penalty=p.repetition_penalty,
            frequency_penalty=p.frequency_penalty,
            typical_p=p.typical_p,
            seed=p.seed,
            stop=p.stop,
            logprobs=p.top_n_tokens or 0,
        )
        for _ in range(best_of)
    ]
    return Job(req.inputs, ids, params, p)


async def generate(service: Service, request: Request, wrap: bool = False, req: TGIRequest | None = None):
    req = req or parse(TGIRequest, await read_json(request, service.limits.max_body))
    job = prepare(service, req)
    t0 = time.perf_counter()
    prefill = []
    if job.p.details and job.p.decoder_input_details:
        scored = await prompt_logprobs(service, job.ids)
        prefill = [
            {"id": i, "text": service.token_text(i), "logprob": lp}
            for i, (lp, _) in zip(job.ids, scored, strict=True)
        ]
    gen = await run_to_end(request, service, [job.ids] * len(job.params), job.params)
    ranked = sorted(gen.choices, key=mean_logprob, reverse=True)  # stable: ties keep the first
    choice = ranked[0]
    out = {"generated_text": full_text(job, choice)}
    if job.p.details:
        out["details"] = sequence(service, job, choice, prefill)
        del out["details"]["generated_text"]
        if len(ranked) > 1:
            out["details"]["best_of_sequences"] = [sequence(service, job, c, prefill) for c in ranked[1:]]
    ms = (time.perf_counter() - t0) * 1e3
    headers = {
        "x-prompt-tokens": str(len(job.ids)),
        "x-generated-tokens": str(len(choice.tokens)),
        "x-inference-time": f"{ms:.0f}",
        "x-time-per-token": f"{ms / max(len(choice.tokens), 1):.0f}",
    }
    return JSONResponse([out] if wrap else out, headers=headers)


async def generate_stream(service: Service, request: Request, req: TGIRequest | None = None):
    req = req or parse(TGIRequest, await read_json(request, service.limits.max_body))
    job = prepare(service, req, stream=True)
    gen, on_close = open_stream(request, service, [job.ids], job.params)

    async def events():
        index = 0
        async for item in stream_items(gen, lambda err: event({"error": err.message, "error_type": err.kind},
                                                              space=False)):
            if isinstance(item, str):
                yield item
                continue
            choice, ev = item
            index += 1
            out = {"index": index, "token": token(service, ev, choice), "generated_text": None, "details": None}
            if job.p.top_n_tokens:
                out["top_tokens"] = top_tokens(service, ev)
            if ev.finished:
                out["generated_text"] = full_text(job, choice)
                out["details"] = {
                    "finish_reason": FINISH[choice.reason],
                    "generated_tokens": len(choice.tokens),
                    "seed": choice.seed,
                    "input_length": len(job.ids),
                }
            yield event(out, space=False)

    return EventStream(events(), on_close)


async def compat(service: Service, request: Request):
    """TGI's `POST /`: `stream` picks /generate_stream, else /generate's answer in a one-element list."""
    req = parse(TGIRequest, await read_json(request, service.limits.max_body))
    if req.stream:
        return await generate_stream(service, request, req)
    return await generate(service, request, wrap=True, req=req)


def sequence(service: Service, job: Job, choice: Choice, prefill: list) -> dict:
    """One sequence's details (TGI's BestOfSequence; /generate's details are the same less generated_text)."""
    out = {
        "generated_text": full_text(job, choice),
        "finish_reason": FINISH[choice.reason],
        "generated_tokens": len(choice.tokens),
        "seed": choice.seed,
        "prefill": prefill,
        "tokens": [token(service, e, choice) for e in choice.tokens],
    }
    if job.p.top_n_tokens:
        out["top_tokens"] = [top_tokens(service, e) for e in choice.tokens]
    return out


def mean_logprob(choice: Choice) -> float:
    """TGI's best_of ranking: the mean log-probability of a sequence's tokens."""
    lps = [e.logprob for e in choice.tokens if e.logprob is not None]
    return sum(lps) / len(lps) if lps else float("-inf")


def kept_stop(choice: Choice) -> str:
    """The stop sequence that ended the choice: TGI keeps it in the text (OpenAI drops it)."""
    return choice.stop if choice.reason == "stop" and choice.stop else ""


def full_text(job: Job, choice: Choice) -> str:
    return (job.inputs if job.p.return_full_text else "") + choice.text + kept_stop(choice)


def token(service: Service, ev, choice: Choice) -> dict:
    """A token as TGI writes it; the last one carries the matched stop sequence too."""
    text = ev.text + (kept_stop(choice) if ev.finished else "")
    return {"id": ev.token_id, "text": text, "logprob": ev.logprob, "special": service.is_special(ev.token_id)}


def top_tokens(service: Service, ev) -> list[dict]:
    return [
        {"id": i, "text": service.token_text(i), "logprob": lp, "special": service.is_special(i)}
        for i, lp in ev.top_logprobs or []
    ]
