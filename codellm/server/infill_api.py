"""llama.cpp's POST /infill: fill the gap at the cursor, with other files of the repository as context.

    {"input_prefix": "def load(path):\\n    ", "input_suffix": "\\n    return data\\n",
     "input_extra": [{"filename": "utils/io.py", "text": "def read_text(path): ..."}], "n_predict": 64}
    -> {"content": "data = json.loads(read_text(path))", "stop": true, "stop_type": "eos", "tokens_evaluated": 57,
        "tokens_predicted": 9, "truncated": false, "timings": {...}, ...}

`prompt` (llama.vscode sends the cursor's line there) continues the prefix, as llama.cpp's code does.
`input_extra` goes in front of the prefix, each file under a `--- filename ---` line, within the token
budget: context - n_predict (-1 or unset: 128 reserved); when it does not fit, the prefix keeps its end and
the suffix its start (`prompts.infill_with_context`). `order` is "psm" (default) or "spm" (llama.cpp's
--spm-infill, per request here). Sampling defaults are llama.cpp's (temperature 0.8, top_k 40, top_p 0.95);
`seed` -1 is random; n_predict -1 runs until <EOT> or the context is full. `stop_type` is "eos" (EOS or
<EOT>), "limit" or "word". Streams are `data: {"content": "...", "stop": false}` events and a last one with
`"stop": true`, content "" and the fields above; no [DONE]. A model without infilling tokens answers 501.
llama.cpp options codellm does not implement (min_p, cache_prompt, t_max_predict_ms, samplers) are ignored.
"""

from __future__ import annotations

from functools import partial

from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from codellm import formats
from codellm.server.endpoints import endpoint, open_stream, read_json, run_to_end, stream_items
from codellm.server.errors import LLAMACPP, LLAMACPP_TYPES, STATUS, invalid
from codellm.server.prompts import fit, infill_with_context, require_infilling, sampling
from codellm.server.schemas import InfillRequest, parse
from codellm.server.service import Service
from codellm.server.sse import EventStream, event

RESERVED = 128  # new tokens kept free of the prompt when n_predict is unset or -1
STOP_TYPE = {"eos": "eos", "eot": "eos", "length": "limit", "stop": "word"}


def routes(service: Service) -> list[Route]:
    return [Route("/infill", endpoint(service, LLAMACPP, partial(infill, service)), methods=["POST"])]


async def infill(service: Service, request: Request):
    req = parse(InfillRequest, await read_json(request, service.limits.max_body))
    tok, limits = service.tok, service.limits
    require_infilling(tok, "input_prefix")
    if len(req.stop) > limits.max_stop:
        raise invalid("stop", f"at most {limits.max_stop} stop sequences (got {len(req.stop)})")
    explicit = req.n_predict is not None and req.n_predict > 0
    budget = limits.context - (req.n_predict if explicit else RESERVED)
    if budget <= len(formats.infill_prompt(tok, "", "", req.order)):
        raise invalid(
            "n_predict",
            f"must leave room for the prompt in the context of {limits.context} tokens (got {req.n_predict})",
        )
    extra = [(chunk.filename, chunk.text) for chunk in req.input_extra]
    ids, truncated = infill_with_context(tok, req.input_prefix + req.prompt, req.input_suffix, req.order, extra, budget)
    room = limits.context - len(ids)
    max_new = fit(
        limits.context,
        len(ids),
        req.n_predict if explicit else None,
        room if req.n_predict == -1 else RESERVED,
        prompt_field="input_prefix",
        max_field="n_predict",
    )
    params = sampling(
        max_new_tokens=max_new,
        temperature=req.temperature,
        top_p=req.top_p,
        top_k=req.top_k,
        repetition_penalty=req.repeat_penalty,
        seed=None if req.seed == -1 else req.seed,
        stop=req.stop,
        logprobs=req.n_probs or None,
    )
    final = lambda gen, c, content: {
        "content": content,
        "stop": True,
        "model": service.model_id,
        "id_slot": 0,
        "stop_type": STOP_TYPE[c.reason],
        "stopping_word": c.stop or "",
        "tokens_evaluated": len(ids),
        "tokens_predicted": len(c.tokens),
        "tokens_cached": 0,
        "truncated": truncated,
        "has_new_line": "\n" in c.text,
        "timings": gen.timings(c),
    }
    if not req.stream:
        gen = await run_to_end(request, service, [ids], [params])
        c = gen.choices[0]
        out = final(gen, c, c.text)
        if req.n_probs:
            out["completion_probabilities"] = probabilities(service, c.tokens)
        return JSONResponse(out)

    gen, on_close = open_stream(request, service, [ids], [params])

    async def events():
        async for item in stream_items(gen, llamacpp_error_event):
            if isinstance(item, str):
                yield item
                continue
            c, ev = item
            if ev.text or req.n_probs:  # the last token's text too: the final event's content is "" as llama.cpp's
                out = {"content": ev.text, "stop": False}
                if req.n_probs and ev.token_id is not None:
                    out["completion_probabilities"] = probabilities(service, [ev])
                yield event(out)
            if ev.finished:
                yield event(final(gen, c, ""))

    return EventStream(events(), on_close)


def llamacpp_error_event(err) -> str:
    """llama.cpp's error shape for a failure in the middle of a stream."""
    status = STATUS[err.kind][LLAMACPP.column]
    return event({"error": {"code": status, "message": err.message, "type": LLAMACPP_TYPES[err.kind]}})


def probabilities(service: Service, tokens: list) -> list[dict]:
    """llama.cpp's `completion_probabilities` (n_probs): each token with its top alternatives."""
    entry = lambda i, lp: {
        "id": i,
        "token": service.token_text(i),
        "logprob": lp,
        "bytes": list(service.token_text(i).encode()),
    }
    return [
        entry(ev.token_id, ev.logprob) | {"top_logprobs": [entry(i, lp) for i, lp in ev.top_logprobs or []]}
        for ev in tokens
    ]
