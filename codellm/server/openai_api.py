"""OpenAI's API: POST /v1/completions (with a working `suffix`: infilling), /v1/chat/completions, GET /v1/models.

    {"model": "x", "prompt": "def mean(xs):\\n    ", "suffix": "\\n    return total / len(xs)\\n", "max_tokens": 64}

`suffix` renders the prompt with `formats.infill_prompt` and generation stops at <EOT> (vLLM and TGI refuse
`suffix`; SERVING.md pitfall 4). Defaults are OpenAI's: max_tokens 16 for completions (chat: 512, both cut to
what the context leaves), temperature 1, top_p 1, n 1. `model` is echoed back whatever it says: one model
is served. With `n` > 1 and a seed, choice i uses seed + i. `logprobs` are the model's own distribution
(before penalty and temperature), as vLLM reports them; `echo` with `logprobs` is refused (prompt tokens
are not scored). finish_reason is "stop" (EOS, <EOT>, a stop string) or "length"; `stop_reason` (vLLM's
extra) is the stop string, or the id of <EOT>, or null for EOS. Streams end with `data: [DONE]`; a failure
after the stream opened is an event `{"error": {...}}` before it.
"""

from __future__ import annotations

import time
import uuid
from functools import partial

from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from codellm.server.endpoints import endpoint, open_stream, read_json, run_to_end, stream_items
from codellm.server.errors import OPENAI, OPENAI_TYPES, STATUS, ApiError, invalid
from codellm.server.prompts import chat_ids, completion_ids, fit, infill_ids, sampling
from codellm.server.schemas import ChatRequest, CompletionRequest, parse
from codellm.server.service import Choice, Service
from codellm.server.sse import DONE, EventStream, event

COMPLETION_MAX_TOKENS, CHAT_MAX_TOKENS = 16, 512


def routes(service: Service) -> list[Route]:
    post = lambda path, fn: Route(path, endpoint(service, OPENAI, partial(fn, service)), methods=["POST"])
    return [
        post("/v1/completions", completions),
        post("/v1/chat/completions", chat),
        Route("/v1/models", endpoint(service, OPENAI, partial(models, service)), methods=["GET"]),
    ]


async def models(service: Service, request: Request):
    return JSONResponse(
        {
            "object": "list",
            "data": [
                {
                    "id": service.model_id,
                    "object": "model",
                    "created": 0,
                    "owned_by": "codellm",
                    "max_model_len": service.limits.context,
                }
            ],
        }
    )


# --- /v1/completions --------------------------------------------------------------------------------


async def completions(service: Service, request: Request, body: dict | None = None):
    req = parse(CompletionRequest, body if body is not None else await read_json(request, service.limits.max_body))
    texts, prompts, params = prepare_completions(service, req)
    n, created, rid = req.n or 1, int(time.time()), f"cmpl-{uuid.uuid4().hex}"
    head = {"id": rid, "object": "text_completion", "created": created, "model": service.model_id}
    echo = lambda c: texts[c.index // n] if req.echo else ""
    usage = lambda gen: _usage(sum(map(len, prompts[::n])), gen.completion_tokens)
    if not req.stream:
        gen = await run_to_end(request, service, prompts, params)
        choices = [
            {
                "index": c.index,
                "text": echo(c) + c.text,
                "finish_reason": _finish(c.reason),
                "stop_reason": _stop_reason(service, c),
                "logprobs": completion_logprobs(service, c.tokens, len(echo(c))) if req.logprobs is not None else None,
            }
            for c in gen.choices
        ]
        return JSONResponse(head | {"choices": choices, "usage": usage(gen)})

    gen, on_close = open_stream(request, service, prompts, params)

    async def events():
        offsets = [len(echo(c)) for c in gen.choices]
        for c in gen.choices if req.echo else []:
            yield event(
                head | {"choices": [{"index": c.index, "text": echo(c), "logprobs": None, "finish_reason": None}]}
            )
        async for item in stream_items(gen, error_event):
            if isinstance(item, str):
                yield item
                continue
            c, ev = item
            if not ev.text and not ev.finished and req.logprobs is None:
                continue
            out = {"index": c.index, "text": ev.text, "logprobs": None, "finish_reason": None}
            if req.logprobs is not None and ev.token_id is not None:
                out["logprobs"] = completion_logprobs(service, [ev], offsets[c.index])
                offsets[c.index] += len(service.token_text(ev.token_id))
            if ev.finished:
                out |= {"finish_reason": _finish(c.reason), "stop_reason": _stop_reason(service, c)}
            yield event(head | {"choices": [out]})
        else:
            if req.stream_options and req.stream_options.include_usage:
                yield event(head | {"choices": [], "usage": usage(gen)})
        yield DONE

    return EventStream(events(), on_close)


def prepare_completions(service: Service, req: CompletionRequest):
    """-> (prompt texts for echo, prompt ids per choice, SamplingParams per choice)."""
    tok, limits, n = service.tok, service.limits, req.n or 1
    prompt = req.prompt
    many = isinstance(prompt, list) and not isinstance(prompt[0], int)
    items = prompt if many else [prompt]
    if len(items) * n > limits.max_prompts:
        raise invalid(
            "n" if n > 1 else "prompt",
            f"at most {limits.max_prompts} choices per request (prompts x n); got {len(items)} x {n}",
        )
    _check_common(service, req)
    if req.echo and req.logprobs is not None:
        raise ApiError(
            "not_supported", "echo: echo with logprobs is not supported (prompt tokens are not scored)", "echo"
        )
    texts, prompts, params = [], [], []
    temperature = 1.0 if req.temperature is None else req.temperature
    for k, item in enumerate(items):
        field = f"prompt.{k}" if many else "prompt"
        if req.suffix is not None:
            if not isinstance(item, str):
                raise invalid("suffix", "needs a text prompt, not token ids")
            ids = infill_ids(tok, item, req.suffix)
        else:
            ids = completion_ids(tok, item, field)
        max_new = fit(
            limits.context, len(ids), req.max_tokens, COMPLETION_MAX_TOKENS, prompt_field=field, max_field="max_tokens"
        )
        texts.append(item if isinstance(item, str) else tok.decode(item))
        for j in range(n):
            seed = None if req.seed is None else (req.seed + j) % 2**64
            prompts.append(ids)
            params.append(
                sampling(
                    max_new_tokens=max_new,
                    temperature=temperature,
                    top_p=req.top_p,
                    top_k=req.top_k,
                    repetition_penalty=req.repetition_penalty,
                    seed=seed,
                    stop=req.stop,
                    logprobs=req.logprobs,
                )
            )
    return texts, prompts, params


def completion_logprobs(service: Service, tokens: list, offset: int) -> dict:
    """The legacy completions `logprobs` object for these token events; text_offset counts from `offset`."""
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for ev in tokens:
        text = service.token_text(ev.token_id)
        top = {service.token_text(i): lp for i, lp in ev.top_logprobs or []}
        top.setdefault(text, ev.logprob)
        for key, value in zip(out, (text, ev.logprob, top, offset), strict=True):
            out[key].append(value)
        offset += len(text)
    return out


# --- /v1/chat/completions ---------------------------------------------------------------------------


async def chat(service: Service, request: Request, body: dict | None = None):
    req = parse(ChatRequest, body if body is not None else await read_json(request, service.limits.max_body))
    _check_common(service, req)
    if req.top_logprobs is not None and not req.logprobs:
        raise invalid("top_logprobs", "needs logprobs: true")
    ids = chat_ids(service.tok, [{"role": m.role, "content": m.text()} for m in req.messages])
    field = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
    max_new = fit(
        service.limits.context,
        len(ids),
        req.max_completion_tokens or req.max_tokens,
        CHAT_MAX_TOKENS,
        prompt_field="messages",
        max_field=field,
    )
    n, logprobs = req.n or 1, (req.top_logprobs or 0) if req.logprobs else None
    params = [
        sampling(
            max_new_tokens=max_new,
            temperature=1.0 if req.temperature is None else req.temperature,
            top_p=req.top_p,
            top_k=req.top_k,
            repetition_penalty=req.repetition_penalty,
            seed=None if req.seed is None else (req.seed + j) % 2**64,
            stop=req.stop,
            logprobs=logprobs,
        )
        for j in range(n)
    ]
    head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": service.model_id}
    lp = lambda tokens: {"content": chat_logprobs(service, tokens)} if req.logprobs else None
    if not req.stream:
        gen = await run_to_end(request, service, [ids] * n, params)
        choices = [
            {
                "index": c.index,
                "message": {"role": "assistant", "content": c.text},
                "logprobs": lp(c.tokens),
                "finish_reason": _finish(c.reason),
                "stop_reason": _stop_reason(service, c),
            }
            for c in gen.choices
        ]
        return JSONResponse(
            head | {"object": "chat.completion", "choices": choices, "usage": _usage(len(ids), gen.completion_tokens)}
        )

    gen, on_close = open_stream(request, service, [ids] * n, params)
    head["object"] = "chat.completion.chunk"

    async def events():
        for c in gen.choices:
            yield event(
                head
                | {
                    "choices": [
                        {
                            "index": c.index,
                            "delta": {"role": "assistant", "content": ""},
                            "logprobs": None,
                            "finish_reason": None,
                        }
                    ]
                }
            )
        async for item in stream_items(gen, error_event):
            if isinstance(item, str):
                yield item
                continue
            c, ev = item
            if not ev.text and not ev.finished and not req.logprobs:
                continue
            out = {
                "index": c.index,
                "delta": {"content": ev.text} if ev.text else {},
                "finish_reason": None,
                "logprobs": lp([ev]) if ev.token_id is not None else None,
            }
            if ev.finished:
                out |= {"finish_reason": _finish(c.reason), "stop_reason": _stop_reason(service, c)}
            yield event(head | {"choices": [out]})
        else:
            if req.stream_options and req.stream_options.include_usage:
                yield event(head | {"choices": [], "usage": _usage(len(ids), gen.completion_tokens)})
        yield DONE

    return EventStream(events(), on_close)


def chat_logprobs(service: Service, tokens: list) -> list[dict]:
    entry = lambda text, lp: {"token": text, "logprob": lp, "bytes": list(text.encode())}
    return [
        entry(service.token_text(ev.token_id), ev.logprob)
        | {"top_logprobs": [entry(service.token_text(i), lp) for i, lp in ev.top_logprobs or []]}
        for ev in tokens
    ]


# --- shared -----------------------------------------------------------------------------------------


def _check_common(service: Service, req) -> None:
    if len(req.stop) > service.limits.max_stop:
        raise invalid("stop", f"at most {service.limits.max_stop} stop sequences (got {len(req.stop)})")
    if req.stream_options is not None and not req.stream:
        raise invalid("stream_options", "is only allowed with stream: true")


def error_event(err: ApiError) -> str:
    status = STATUS[err.kind][OPENAI.column]
    return event(
        {"error": {"message": err.message, "type": OPENAI_TYPES[err.kind], "param": err.param, "code": status}}
    )


def _finish(reason: str | None) -> str | None:
    return {"eos": "stop", "eot": "stop", "stop": "stop", "length": "length"}.get(reason)


def _stop_reason(service: Service, c: Choice) -> str | int | None:
    if c.reason == "stop":
        return c.stop
    if c.reason == "eot":
        return service.tok.eot_id
    return None


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }
