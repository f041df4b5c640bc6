"""What every route shares: the API-key check, reading a JSON body within the size limit, errors written in
the route family's envelope, and the access-log notes a route leaves for `app.Observe`."""

from __future__ import annotations

import json
import sys
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable

from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response

from codellm.errors import UserError
from codellm.server import auth
from codellm.server.errors import ApiError, Family
from codellm.server.service import HEARTBEAT_S, ClientGone, Generation, Service
from codellm.server.sse import KEEP_ALIVE

Handler = Callable[[Request], Awaitable[Response]]
CLIENT_CLOSED = 499  # nginx's status for "the client closed the connection before the response"


def endpoint(service: Service, family: Family, handler: Handler, *, auth_required: bool = True) -> Handler:
    """Wrap a route: API key first, then the handler; every failure becomes the family's error response."""

    async def run(request: Request) -> Response:
        try:
            if auth_required and not auth.authorized(service.api_keys, request.headers.get("authorization")):
                given = "authorization" in request.headers
                raise ApiError(
                    "authentication",
                    "invalid API key"
                    if given
                    else "this server needs an API key: send the header `Authorization: Bearer KEY`",
                )
            return await handler(request)
        except ApiError as e:
            notes(request)["error"] = e.message
            return family.response(e)
        except UserError as e:
            notes(request)["error"] = str(e)
            return family.response(ApiError("validation", str(e)))
        except (ClientGone, ClientDisconnect):
            notes(request)["disconnected"] = True
            return Response(status_code=CLIENT_CLOSED)
        except Exception as e:  # noqa: BLE001 - a bug: log it, answer in the family's envelope
            traceback.print_exc(file=sys.stderr)
            return family.response(ApiError("internal", f"internal error: {type(e).__name__}: {e}"))

    return run


async def read_json(request: Request, limit: int):
    """The request body as JSON; 413 past `limit` bytes (checked while reading, chunked bodies too)."""
    length = request.headers.get("content-length", "")
    too_large = ApiError(
        "payload_too_large", f"body: the request body is over the limit of {limit:,} bytes (--max-body-size)", "body"
    )
    if length.isdigit() and int(length) > limit:
        raise too_large
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise too_large
    try:
        data = json.loads(body, parse_constant=_no_constant)
    except (ValueError, RecursionError) as e:
        raise ApiError("validation", f"body: not valid JSON ({e})", "body") from None
    if b"\\u" in body and _has_lone_surrogate(data):
        raise ApiError(
            "validation",
            "body: a string holds an unpaired surrogate escape (\\ud800-\\udfff), which is not text",
            "body",
        )
    return data


def _has_lone_surrogate(data) -> bool:
    """JSON allows escapes like "\\ud800" alone; such strings cannot be encoded, tokenized or sent back."""
    try:
        json.dumps(data, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _no_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


def notes(request: Request) -> dict:
    """This request's line in the access log (Observe writes it when the response has ended)."""
    return request.scope.setdefault("codellm", {})


def note_generation(request: Request, gen: Generation | None, stream: bool) -> None:
    if gen is None:
        return
    reasons = [c.reason for c in gen.choices if c.reason]
    notes(request).update(
        prompt_tokens=gen.prompt_tokens,
        completion_tokens=gen.completion_tokens,
        stream=stream,
        finish_reason=reasons[0] if len(set(reasons)) == 1 else reasons or None,
    )


def failure(reason: str | None) -> ApiError | None:
    """The error for a choice that did not end normally (the engine failed, or shutdown cancelled it)."""
    if reason == "error":
        return ApiError("generation", "generation failed: the engine stopped (the server log has the cause)")
    if reason == "cancelled":
        return ApiError("unavailable", "the server is shutting down: the request was cancelled")
    return None


async def run_to_end(request: Request, service: Service, prompts: list[list[int]], params: list) -> Generation:
    """Admit, generate every choice to its end (cancelled if the client disconnects), release; raise an
    ApiError if a choice did not end normally."""
    slot, gen = service.admit(), None
    try:
        gen = service.start(prompts, params)
        await gen.collect(request.receive)
    finally:
        if gen is not None:
            gen.close()
        slot.release()
        note_generation(request, gen, stream=False)
    for choice in gen.choices:
        if err := failure(choice.reason):
            raise err
    return gen


async def stream_items(gen, error_event: Callable[[ApiError], str]) -> AsyncIterator[str | tuple]:
    """What a streamed generation's route sends, in order: an SSE keep-alive comment (str) when the engine
    is quiet for HEARTBEAT_S, the route's own error event (str, last) for a choice that failed, and each
    (choice, engine event) pair for the route to encode."""
    async for item in gen.events(HEARTBEAT_S):
        if item is None:
            yield KEEP_ALIVE
            continue
        if err := failure(item[1].reason):
            yield error_event(err)
            return
        yield item


def open_stream(request: Request, service: Service, prompts: list[list[int]], params: list):
    """Admit and start a streamed generation -> (gen, on_close) for `sse.EventStream`."""
    slot = service.admit()
    try:
        gen = service.start(prompts, params)
    except BaseException:
        slot.release()
        raise

    def on_close():
        if any(not c.done for c in gen.choices):
            notes(request)["disconnected"] = True
        gen.close()
        slot.release()
        note_generation(request, gen, stream=True)

    return gen, on_close
