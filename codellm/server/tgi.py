"""Text Generation Inference's API: POST /generate, /generate_stream and / (compat); sagemaker.py reuses it.

    {"inputs": "def f(", "parameters": {"max_new_tokens": 32, "details": true}}
    -> {"generated_text": "...", "details": {"finish_reason": "eos_token", "generated_tokens": 9, "seed": null,
                                            "prefill": [], "tokens": [{"id", "text", "logprob", "special"}]}}

Sampling: greedy unless `do_sample` is true or temperature/top_k/top_p ask for sampling (TGI's rule);
temperature 0 is greedy and top_p 1 is off (TGI rejects both). The default max_new_tokens is 256, cut to
what the context leaves. A token's `text` is the text it completed in the stream (UTF-8 and stop-string
hold-back applied, so the texts add up to `generated_text`); special tokens (EOS, EOT) add no text of their
own (TGI shows "</s>"), only what the decoder still held.
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
    params: SamplingParams
    p: TGIParameters


def prepare(service: Service, req: TGIRequest) -> Job:
    p, limits = req.params, service.limits
    if p.stop and len(p.stop) > limits.max_stop:
        raise invalid("parameters.stop", f"at most {limits.max_stop} stop sequences (got {len(p.stop)})")
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
    sample = (
        bool(p.do_sample) or p.temperature not in (None, 1.0) or p.top_k not in (None, 0) or p.top_p not in (None, 1.0)
    )
    temperature = (1.0 if p.temperature is None else p.temperature) if sample else 0.0
    params = sampling(
        max_new_tokens=max_new,
        temperature=temperature,
        top_p=p.top_p,
        top_k=p.top_k,
        repetition_penalty=p.repetition_penalty,
        seed=p.seed,
        stop=p.stop,
        logprobs=p.top_n_tokens or 0,
    )
    return Job(req.inputs, ids, params, p)


async def generate(service: Service, request: Request, wrap: bool = False, req: TGIRequest | None = None):
    req = req or parse(TGIRequest, await read_json(request, service.limits.max_body))
    job = prepare(service, req)
    t0 = time.perf_counter()
    gen = await run_to_end(request, service, [job.ids], [job.params])
    choice = gen.choices[0]
    out = {"generated_text": full_text(job, choice)}
    if job.p.details:
        out["details"] = {
            "finish_reason": FINISH[choice.reason],
            "generated_tokens": len(choice.tokens),
            "seed": choice.seed,
            "prefill": [],
            "tokens": [token(service, e) for e in choice.tokens],
        }
        if job.p.top_n_tokens:
            out["details"]["top_tokens"] = [top_tokens(service, e) for e in choice.tokens]
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
    job = prepare(service, req)
    gen, on_close = open_stream(request, service, [job.ids], [job.params])

    async def events():
        index = 0
        async for item in stream_items(gen, lambda err: event({"error": err.message, "error_type": err.kind},
                                                              space=False)):
            if isinstance(item, str):
                yield item
                continue
            choice, ev = item
            index += 1
            out = {"index": index, "token": token(service, ev), "generated_text": None, "details": None}
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


def full_text(job: Job, choice: Choice) -> str:
    return (job.inputs if job.p.return_full_text else "") + choice.text


def token(service: Service, ev) -> dict:
    return {"id": ev.token_id, "text": ev.text, "logprob": ev.logprob, "special": service.is_special(ev.token_id)}


def top_tokens(service: Service, ev) -> list[dict]:
    return [
        {"id": i, "text": service.token_text(i), "logprob": lp, "special": service.is_special(i)}
        for i, lp in ev.top_logprobs or []
    ]
