"""OpenAI's API: POST /v1/completions (with a working `suffix`: infilling), /v1/chat/completions, GET /v1/models
and /v1/models/{id}.

    {"model": "x", "prompt": "def mean(xs):\\n    ", "suffix": "\\n    return total / len(xs)\\n", "max_tokens": 64}

`suffix` renders the prompt with `formats.infill_prompt` and generation stops at <EOT> (vLLM and TGI refuse
`suffix`; SERVING.md pitfall 4). Defaults are OpenAI's: max_tokens 16 for completions (chat: 512, both cut to
what the context leaves), temperature 1, top_p 1, n 1. `model` must be one of the served names (the model
directory's name or --model-id, and each --served-model-name), or unset; another name is a 404
`model_not_found`, as OpenAI and vLLM answer. With `n` > 1 and a seed, choice i uses seed + i.
`presence_penalty` and `frequency_penalty` follow OpenAI's rule over the generated tokens (sampling.py).
`logprobs` are the model's own distribution (before penalty and temperature), as vLLM reports them; `echo`
with `logprobs` lists the prompt's tokens first (a leading BOS left out, as it is not in the echoed text;
the first token without context has a null logprob), and `echo` with `max_tokens` 0 scores the prompt alone
(lm-evaluation-harness's loglikelihood requests). Chat role "developer" is read as "system"; a message
without `content` is a 400. finish_reason is "stop" (EOS, <EOT>, a stop string) or "length"; the stop string
is not in the text; `stop_reason` (vLLM's extra) is the stop string, or the id of <EOT>, or null for EOS.
Streams end with `data: [DONE]`; a failure after the stream opened is an event `{"error": {...}}` before it.
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
from codellm.server.scoring import prompt_logprobs
from codellm.server.service import Choice, Service
from codellm.server.sse import DONE, EventStream, event

COMPLETION_MAX_TOKENS, CHAT_MAX_TOKENS = 16, 512


def routes(service: Service) -> list[Route]:
    post = lambda path, fn: Route(path, endpoint(service, OPENAI, partial(fn, service)), methods=["POST"])
    return [
        post("/v1/completions", completions),
        post("/v1/chat/completions", chat),
        Route("/v1/models", endpoint(service, OPENAI, partial(models, service)), methods=["GET"]),
        Route("/v1/models/{model_id:path}", endpoint(service, OPENAI, partial(model, service)), methods=["GET"]),
    ]


def _model(service: Service, name: str) -> dict:
    return {"id": name, "object": "model", "created": 0, "owned_by": "codellm", "max_model_len": service.limits.context}


async def models(service: Service, request: Request):
    return JSONResponse({"object": "list", "data": [_model(service, name) for name in service.model_names]})


async def model(service: Service, request: Request):
    return JSONResponse(_model(service, service.model_name(request.path_params["model_id"])))


# --- /v1/completions --------------------------------------------------------------------------------


async def completions(service: Service, request: Request, body: dict | None = None, check_model: bool = True):
    """`check_model`: False for SageMaker's /invocations, whose endpoint is the model (its body's name is unchecked)."""
    req = parse(CompletionRequest, body if body is not None else await read_json(request, service.limits.max_body))
    name = service.model_name(req.model) if check_model else service.model_id
    texts, prompts, params = prepare_completions(service, req)
    n, created, rid = req.n or 1, int(time.time()), f"cmpl-{uuid.uuid4().hex}"
    head = {"id": rid, "object": "text_completion", "created": created, "model": name}
    echo = lambda c: texts[c.index // n] if req.echo else ""
    usage = lambda gen: _usage(sum(map(len, prompts[::n])), gen.completion_tokens if gen else 0)
    scored = {}  # prompt index -> its logprobs object (echo with logprobs)
    if req.echo and req.logprobs is not None:
        for k in range(0, len(prompts), n):
            scored[k // n] = echo_logprobs(
                service, prompts[k], await prompt_logprobs(service, prompts[k], req.logprobs)
            )
    echo_lp = lambda c: scored.get(c.index // n)
    if req.max_tokens == 0:  # echo alone: the prompt scored, nothing generated
        choices = [
            {
                "index": i,
                "text": echo(SimpleChoice(i)),
                "finish_reason": "length",
                "stop_reason": None,
                "logprobs": echo_lp(SimpleChoice(i)),
            }
            for i in range(len(prompts))
        ]
        return JSONResponse(head | {"choices": choices, "usage": usage(None)})
    if not req.stream:
        gen = await run_to_end(request, service, prompts, params)
        choices = [
            {
                "index": c.index,
                "text": echo(c) + c.text,
                "finish_reason": _finish(c.reason),
                "stop_reason": _stop_reason(service, c),
                "logprobs": _joined(echo_lp(c), completion_logprobs(service, c.tokens, len(echo(c))))
                if req.logprobs is not None
                else None,
            }
            for c in gen.choices
        ]
        return JSONResponse(head | {"choices": choices, "usage": usage(gen)})

    gen, on_close = open_stream(request, service, prompts, params)

    async def events():
        offsets = [len(echo(c)) for c in gen.choices]
        for c in gen.choices if req.echo else []:
            yield event(
                head | {"choices": [{"index": c.index, "text": echo(c), "logprobs": echo_lp(c), "finish_reason": None}]}
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
    if req.max_tokens == 0 and (not req.echo or req.stream):
        raise invalid("max_tokens", "must be >= 1 (0 only with echo: true and no stream, to score the prompt; got 0)")
    if req.echo and req.suffix is not None and req.logprobs is not None:
        raise ApiError("not_supported", "echo: echo with logprobs needs a prompt without suffix", "echo")
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
            limits.context,
            len(ids),
            1 if req.max_tokens == 0 else req.max_tokens,  # 0: nothing is generated (echo only)
            COMPLETION_MAX_TOKENS,
            prompt_field=field,
            max_field="max_tokens",
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
                    presence_penalty=req.presence_penalty,
                    frequency_penalty=req.frequency_penalty,
                    seed=seed,
                    stop=req.stop,
                    logprobs=req.logprobs,
                )
            )
    return texts, prompts, params


class SimpleChoice:
    """A choice that generated nothing (echo with max_tokens 0): only its index."""

    def __init__(self, index: int):
        self.index = index


def echo_logprobs(service: Service, ids: list[int], scored: list) -> dict:
    """The legacy logprobs object of an echoed prompt: its tokens from offset 0, a leading BOS left out
    (its text is not in the echo); a token without context has null logprob and top_logprobs."""
    start = 1 if ids and ids[0] == service.tok.bos_id else 0
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    offset = 0
    for i, (lp, top) in zip(ids[start:], scored[start:], strict=True):
        text = service.token_text(i)
        alternatives = None
        if lp is not None:
            alternatives = {service.token_text(t): v for t, v in top}
            alternatives.setdefault(text, lp)
        for key, value in zip(out, (text, lp, alternatives, offset), strict=True):
            out[key].append(value)
        offset += len(text)
    return out


def _joined(first: dict | None, second: dict) -> dict:
    return second if first is None else {k: first[k] + second[k] for k in first}


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


async def chat(service: Service, request: Request, body: dict | None = None, check_model: bool = True):
    req = parse(ChatRequest, body if body is not None else await read_json(request, service.limits.max_body))
    name = service.model_name(req.model) if check_model else service.model_id
    _check_common(service, req)
    if req.top_logprobs is not None and not req.logprobs:
        raise invalid("top_logprobs", "needs logprobs: true")
    roles = {"developer": "system"}  # OpenAI's newer name for the system message
    ids = chat_ids(service.tok, [{"role": roles.get(m.role, m.role), "content": m.text()} for m in req.messages])
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
            presence_penalty=req.presence_penalty,
            frequency_penalty=req.frequency_penalty,
            seed=None if req.seed is None else (req.seed + j) % 2**64,
            stop=req.stop,
            logprobs=logprobs,
        )
        for j in range(n)
    ]
    head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": name}
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
