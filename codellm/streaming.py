"""The text side of generation: ids in, `Event`s out. UTF-8-safe incremental text, stop ids and stop
strings matched on decoded text with hold-back, and the healed prefix a token-healed prompt must not
repeat. Shared by the reference generator (pull) and the engine (push, one request among many).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field

from codellm.sampling import SamplingParams


@dataclass
class Event:
    """One step of a text stream: the new token, the text it completed (may be empty), and how it ended."""

    token_id: int | None
    text: str
    finished: bool = False
    reason: str | None = None  # "length" | "eos" | "eot" | "stop" (a stop id or string)
    stop: str | None = None  # the stop string that matched
    logprob: float | None = None  # of token_id, when SamplingParams.logprobs is set (engine only)
    top_logprobs: list[tuple[int, float]] | None = None  # (id, logprob) of the likeliest tokens, best first


@dataclass
class StopMatcher:
    """Finds stop strings in streamed text and holds back a tail that could still become one."""

    stops: tuple[str, ...]
    text: str = ""
    emitted: int = 0
    matched: str | None = field(default=None, init=False)

    def push(self, delta: str) -> str:
        """Add decoded text; return what may be shown now (never part of a stop string)."""
        start = self.emitted  # held-back text starts here; everything before it was cleared
        self.text += delta
        hits = [(i, s) for s in self.stops if (i := self.text.find(s, start)) >= 0]
        if hits:
            cut, self.matched = min(hits)
            return self._emit(cut)
        return self._emit(len(self.text) - self._pending_prefix())

    def flush(self) -> str:
        return "" if self.matched is not None else self._emit(len(self.text))

    def _pending_prefix(self) -> int:
        """Length of the longest tail of the text that is a proper prefix of some stop string."""
        best = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(self.text) - self.emitted), best, -1):
                if self.text.endswith(s[:n]):
                    best = n
                    break
        return best

    def _emit(self, end: int) -> str:
        out, self.emitted = self.text[self.emitted:end], max(self.emitted, end)
        return out


class TextStream:
    """The text side of one generation, pushed one token at a time: ids in, `Event`s out.

    EOS and EOT always end the stream, as do `params.stop_ids` and `params.stop` strings. Shared by
    `stream_text` (pull) and the engine (push, one request among many).
    """

    def __init__(self, tok, params: SamplingParams, healed: str = ""):
        self.ends = {tok.eos_id: "eos"} | ({tok.eot_id: "eot"} if tok.eot_id is not None else {})
        self.stop_ids = set(self.ends) | set(params.stop_ids)
        self.decoder, self.matcher = tok.stream_decoder(), StopMatcher(params.stop)
        self.healed = healed  # the text of a healed prompt's backed-off token: in the prompt, not output

    def _decoded(self, text: str) -> str:
        if self.healed:
            n = len(os.path.commonprefix([text, self.healed]))
            text, self.healed = text[n:], self.healed[n:]
        return text

    def push(self, token: int) -> Event:
        if token in self.stop_ids:
            return self.finish(self.ends.get(token, "stop"), token)
        text = self.matcher.push(self._decoded(self.decoder.push(token)))
        if self.matcher.matched is not None:
            return Event(token, text, True, "stop", self.matcher.matched)
        return Event(token, text)

    def finish(self, reason: str, token: int | None = None) -> Event:
        """Last event: whatever text the decoder and the matcher still hold (a stop string may end it)."""
        text = self.matcher.push(self._decoded(self.decoder.flush()))
        if self.matcher.matched is not None:
            return Event(token, text, True, "stop", self.matcher.matched)
        return Event(token, text + self.matcher.flush(), True, reason)


def collect(events: Iterator[Event]) -> str:
    return "".join(e.text for e in events)
