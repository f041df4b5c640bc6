"""The server's state and its one way to generate: admission, engine requests seen from the event loop, shutdown.

    slot = service.admit()                        # 429 past --max-concurrent-requests, 503 while shutting down
    gen = service.start(prompts, params)          # one engine request per choice, submitted at once
    async for choice, event in gen.events(): ...  # token events as they come, every choice interleaved
    gen.close(); slot.release()                   # always (finally): cancels what still runs, frees the slot

All routes share ONE `EngineRunner`, so requests from every client are batched together. Events reach the
event loop through `loop.call_soon_threadsafe` into a queue per HTTP request: the loop never waits on a
step. When a request reaches its token limit the engine emits the last token and then a separate "length"
event with no token; `events` merges the two, so every finished event that ends normally carries a token.

A client that disconnects cancels its engine requests at once: streams notice through Starlette (the
response task is cancelled), non-streaming requests through `collect`, which races the generation against
the connection's `http.disconnect`. Shutdown (SIGTERM/SIGINT): new requests get 503, running ones may
finish within the grace period, then they are cancelled and end with an error event or response.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Awaitable, Hashable
from dataclasses import dataclass, field
from time import perf_counter

from codellm.engine import EngineEvent, EngineRunner
from codellm.errors import UserError
from codellm.sampling import SamplingParams
from codellm.server.errors import ApiError
from codellm.server.metrics import Metrics

HEARTBEAT_S = 15.0  # a stream with nothing to say for this long sends an SSE comment (proxies drop idle streams)


@dataclass
class Limits:
    context: int  # tokens per request, prompt + generated (--max-total-tokens, at most the model's context)
    max_concurrent: int = 128
    max_stop: int = 4
    max_best_of: int = 2  # TGI's best_of (--max-best-of)
    max_body: int = 2 << 20
    max_prompts: int = 16  # prompts x n choices in one OpenAI request


class ClientGone(Exception):
    """The client disconnected before its non-streaming response was ready."""


class Service:
    def __init__(
        self,
        runner: EngineRunner,
        tok,
        model_id: str,
        limits: Limits,
        *,
        api_keys: list[bytes] = (),
        require_eula: bool = False,
        dtype: str = "float32",
        device: str = "cpu",
        served_names: list[str] = (),
    ):
        self.runner, self.tok, self.model_id, self.limits = runner, tok, model_id, limits
        self.model_names = list(dict.fromkeys([model_id, *served_names]))  # what OpenAI's `model` may say
        self.api_keys, self.require_eula, self.dtype, self.device = list(api_keys), require_eula, dtype, device
        self.in_flight = 0
        self.draining = False
        self.live: set[Generation] = set()
        self.metrics = Metrics(runner.engine, lambda: self.in_flight)
        self._texts: dict[int, str] = {}
        names = {"bos": "<s>", "eos": "</s>", "prefix": "<PRE>", "suffix": "<SUF>", "middle": "<MID>", "eot": "<EOT>"}
        self._special = {i: name for role, name in names.items() if (i := getattr(tok, f"{role}_id")) is not None}

    @property
    def healthy(self) -> bool:
        return self.runner.error is None and not self.draining

    def admit(self) -> Admission:
        if self.draining:
            raise ApiError("unavailable", "the server is shutting down")
        if self.runner.error is not None:
            raise ApiError("unavailable", f"the engine has stopped ({self.runner.error!r})")
        if self.in_flight >= self.limits.max_concurrent:
            raise ApiError(
                "overloaded",
                f"Model is overloaded: {self.in_flight} requests are running "
                f"(--max-concurrent-requests {self.limits.max_concurrent}); retry later",
            )
        return Admission(self)

    def start(self, prompts: list[list[int]], params: list[SamplingParams]) -> Generation:
        gen = Generation(self, prompts, params)
        self.live.add(gen)
        self.metrics.prompt_tokens.inc(sum(map(len, prompts)))
        return gen

    def model_name(self, requested: str | None) -> str:
        """The name to answer with for a request's `model` (unset: the first); 404 model_not_found for
        a name this server does not serve (as OpenAI and vLLM answer)."""
        if requested is None:
            return self.model_id
        if requested not in self.model_names:
            raise ApiError(
                "not_found",
                f"model: the model `{requested}` does not exist (this server serves "
                f"{', '.join(f'`{n}`' for n in self.model_names)}; `codellm serve --served-model-name` adds names)",
                "model",
                code="model_not_found",
            )
        return requested

    def begin_shutdown(self) -> None:
        self.draining = True

    def cancel_all(self) -> None:
        """Shutdown: cancel every running request; each ends with its "cancelled" event (an error to clients)."""
        for gen in list(self.live):
            gen.cancel()

    def token_text(self, token_id: int) -> str:
        """A token's own text (logprob listings): special tokens by name, others decoded as a continuation."""
        if token_id not in self._texts:
            special = self._special.get(token_id, "") if self.tok.is_special(token_id) else None
            self._texts[token_id] = special if special is not None else self.tok.decode_continuation([token_id])
        return self._texts[token_id]

    def is_special(self, token_id: int | None) -> bool:
        return token_id is not None and self.tok.is_special(token_id)


class Admission:
    """A place among the --max-concurrent-requests; `release` is idempotent."""

    def __init__(self, service: Service):
        self.service, self.held = service, True
        service.in_flight += 1

    def release(self) -> None:
        if self.held:
            self.held = False
            self.service.in_flight -= 1


@dataclass(eq=False)
class Choice:
    """One engine request of an HTTP request (OpenAI `n` and prompt lists make several)."""

    index: int
    n_prompt: int
    allowed: int  # new tokens it may make: the engine ends it with "length" after this many
    seed: int | None
    rid: Hashable | None = None
    tokens: list[EngineEvent] = field(default_factory=list)  # the events that carry a token
    text: str = ""
    reason: str | None = None  # set when finished
    stop: str | None = None
    pending: EngineEvent | None = None  # the last allowed token, until the "length" event joins it
    t_first: float | None = None
    t_last: float | None = None

    @property
    def done(self) -> bool:
        return self.reason is not None


class Generation:
    def __init__(self, service: Service, prompts: list[list[int]], params: list[SamplingParams]):
        self.service = service
        self.queue: asyncio.Queue[tuple[int, EngineEvent]] = asyncio.Queue()
        self.t0 = perf_counter()
        context = service.runner.engine.model.cfg.max_seq_len
        self.choices = [
            Choice(i, len(ids), min(context, len(ids) + p.max_new_tokens) - len(ids), p.seed)
            for i, (ids, p) in enumerate(zip(prompts, params, strict=True))
        ]
        self._open = len(self.choices)
        loop = asyncio.get_running_loop()
        try:
            for choice, ids, p in zip(self.choices, prompts, params, strict=True):
                deliver = lambda e, i=choice.index: loop.call_soon_threadsafe(self.queue.put_nowait, (i, e))
                choice.rid = service.runner.submit(ids, p, deliver)
        except UserError as e:
            self.cancel()
            raise ApiError("validation", str(e)) from None
        except RuntimeError as e:
            self.cancel()
            raise ApiError("unavailable", f"the engine has stopped: {e}") from None

    @property
    def prompt_tokens(self) -> int:
        return sum(c.n_prompt for c in self.choices)

    @property
    def completion_tokens(self) -> int:
        return sum(len(c.tokens) for c in self.choices)

    async def events(self, heartbeat: float | None = None) -> AsyncIterator[tuple[Choice, EngineEvent] | None]:
        """(choice, event) until every choice has finished; None after `heartbeat` seconds without one."""
        while self._open:
            try:
                index, event = await asyncio.wait_for(self.queue.get(), heartbeat)
            except TimeoutError:
                yield None
                continue
            choice = self.choices[index]
            if event.token_id is not None and not event.finished and len(choice.tokens) + 1 == choice.allowed:
                choice.pending = event  # the engine sends the "length" event right after it, in the same step
                continue
            if choice.pending is not None:
                event = dataclasses.replace(
                    choice.pending,
                    text=choice.pending.text + event.text,
                    finished=True,
                    reason=event.reason,
                    stop=event.stop,
                )
                choice.pending = None
            if event.token_id is not None:
                choice.t_last = perf_counter()
                choice.t_first = choice.t_first or choice.t_last
                choice.tokens.append(event)
            choice.text += event.text
            if event.finished:
                self._finish(choice, event.reason, event.stop)
            yield choice, event

    async def collect(self, receive) -> None:
        """Run every choice to its end (non-streaming); if the client disconnects first, raise ClientGone."""

        async def drain():
            async for _ in self.events():
                pass

        await until_disconnect(receive, drain())

    def cancel(self) -> None:
        """Stop what still runs; the engine's "cancelled" events still come through `events` (shutdown)."""
        for choice in self.choices:
            if not choice.done and choice.rid is not None:
                self.service.runner.cancel(choice.rid)

    def close(self) -> None:
        """Nobody listens any more: cancel what still runs and count it as cancelled (idempotent). The
        slots free at the engine's next step."""
        self.cancel()
        for choice in self.choices:
            if not choice.done:
                self._finish(choice, "cancelled")
        self.service.live.discard(self)

    def _finish(self, choice: Choice, reason: str, stop: str | None = None) -> None:
        choice.reason, choice.stop = reason, stop
        self._open -= 1
        n = len(choice.tokens)
        ttft = choice.t_first - self.t0 if choice.t_first is not None else None
        tpot = (choice.t_last - choice.t_first) / (n - 1) if n > 1 else None
        self.service.metrics.finished(ttft, tpot, n, reason == "cancelled")
        if not self._open:
            self.service.live.discard(self)

    def timings(self, choice: Choice) -> dict:
        """llama.cpp's `timings` of one choice (prompt: submit to first token; predicted: the rest)."""
        first, last, n = choice.t_first or self.t0, choice.t_last or self.t0, len(choice.tokens)
        prompt_ms, predicted_ms = (first - self.t0) * 1e3, (last - first) * 1e3
        return {
            "prompt_n": choice.n_prompt,
            "prompt_ms": prompt_ms,
            "prompt_per_token_ms": prompt_ms / max(choice.n_prompt, 1),
            "prompt_per_second": choice.n_prompt / (prompt_ms / 1e3) if prompt_ms > 0 else None,
            "predicted_n": n,
            "predicted_ms": predicted_ms,
            "predicted_per_token_ms": predicted_ms / (n - 1) if n > 1 else None,
            "predicted_per_second": (n - 1) / (predicted_ms / 1e3) if n > 1 and predicted_ms > 0 else None,
        }


async def until_disconnect(receive, work: Awaitable):
    """Await `work` unless the client disconnects first (then cancel it and raise ClientGone)."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_disconnected(receive))
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in (task, gone):
            if not t.done():
                t.cancel()
    if task.done() and not task.cancelled():
        return task.result()
    raise ClientGone


async def _disconnected(receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
