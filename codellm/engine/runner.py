"""The engine loop in a background thread, with a stream per request for threads and for asyncio.

    runner = EngineRunner(engine)                               # starts the thread
    for event in runner.stream(ids, params): ...                # from any thread
    async for event in runner.astream(ids, params): ...         # from an asyncio loop (the HTTP server)
    runner.close()

Each request has a sink, a callable the engine thread hands its events to: `stream` uses a
`queue.SimpleQueue`, `astream` an `asyncio.Queue` fed through `loop.call_soon_threadsafe`, so the event
loop never waits on a step. Leaving a stream early (a client disconnects, a `break`) cancels the request,
which frees its slot at the next step; wrap `astream` in `contextlib.aclosing` so that this happens at
once rather than when the async generator is garbage-collected. If a step raises, every live request
gets a final event with reason "error", the runner stops, and `error` holds the exception.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import AsyncIterator, Callable, Hashable, Iterator

from codellm.engine.engine import Engine, EngineEvent
from codellm.sampling import SamplingParams

Sink = Callable[[EngineEvent], None]


class EngineRunner:
    def __init__(self, engine: Engine):
        self.engine = engine
        self.error: BaseException | None = None
        self._sinks: dict[Hashable, Sink] = {}
        self._lock = threading.Lock()  # registration vs dispatch: no event can precede its sink
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="codellm-engine", daemon=True)
        self._thread.start()

    def submit(self, prompt: list[int] | str, params: SamplingParams, sink: Sink) -> Hashable:
        with self._lock:
            if self._closed or self.error is not None:
                raise RuntimeError(f"the engine runner has stopped ({self.error or 'closed'})")
            rid = self.engine.submit(prompt, params)
            self._sinks[rid] = sink
        return rid

    def cancel(self, request_id: Hashable) -> None:
        self.engine.cancel(request_id)

    def stream(self, prompt: list[int] | str, params: SamplingParams) -> Iterator[EngineEvent]:
        events: queue.SimpleQueue[EngineEvent] = queue.SimpleQueue()
        rid, finished = self.submit(prompt, params, events.put), False
        try:
            while not finished:
                event = events.get()
                finished = event.finished
                yield event
        finally:
            if not finished:
                self.cancel(rid)

    async def astream(self, prompt: list[int] | str, params: SamplingParams) -> AsyncIterator[EngineEvent]:
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[EngineEvent] = asyncio.Queue()
        rid, finished = self.submit(prompt, params, lambda e: loop.call_soon_threadsafe(events.put_nowait, e)), False
        try:
            while not finished:
                event = await events.get()
                finished = event.finished
                yield event
        finally:
            if not finished:
                self.cancel(rid)

    def close(self, timeout: float | None = None) -> None:
        self._closed = True
        self.engine.wake()
        self._thread.join(timeout)

    def _loop(self) -> None:
        try:
            while not self._closed:
                if self.engine.has_work:
                    self._dispatch(self.engine.step())
                else:
                    self.engine.wait_for_work()
        except BaseException as e:  # noqa: BLE001 - reported to every waiting stream, then kept in `error`
            self.error = e
            with self._lock:
                sinks, self._sinks = self._sinks, {}
            for rid, sink in sinks.items():
                self._deliver(rid, sink, EngineEvent(None, "", True, "error", request_id=rid))

    def _dispatch(self, events: list[EngineEvent]) -> None:
        for event in events:
            with self._lock:
                sinks = self._sinks
                sink = sinks.pop(event.request_id, None) if event.finished else sinks.get(event.request_id)
            if sink is not None:
                self._deliver(event.request_id, sink, event)

    def _deliver(self, rid: Hashable, sink: Sink, event: EngineEvent) -> None:
        try:
            sink(event)
        except Exception:  # noqa: BLE001 - the consumer is gone (e.g. its event loop closed): drop the request
            with self._lock:
                self._sinks.pop(rid, None)
            self.cancel(rid)
