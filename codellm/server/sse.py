"""Server-sent events: encoding, and a streaming response that always cleans up.

TGI writes `data:{json}` (no space), OpenAI and llama.cpp `data: {json}`; clients accept both. Events are
separated by a blank line; a line starting with `:` is a comment (keep-alive), which every client ignores.
OpenAI streams end with `data: [DONE]`; TGI's last event is the one with `generated_text`; llama.cpp's
the one with `"stop": true`.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable

from starlette.responses import StreamingResponse

HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}  # nginx: do not buffer the stream
KEEP_ALIVE = ": keep-alive\n\n"
DONE = "data: [DONE]\n\n"


def event(obj, space: bool = True) -> str:
    return ("data: " if space else "data:") + json.dumps(obj, ensure_ascii=False, separators=(",", ":")) + "\n\n"


class EventStream(StreamingResponse):
    """text/event-stream from an async iterator of encoded events; `on_close` runs however the response ends
    (finished, client gone, server stopping), even if the iterator never started."""

    def __init__(self, events: AsyncIterator[str], on_close: Callable[[], None]):
        super().__init__(events, media_type="text/event-stream", headers=HEADERS)
        self.on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()
