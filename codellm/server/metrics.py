"""Prometheus metrics (GET /metrics), in a registry of the server's own.

    codellm_requests_total{route,status}              HTTP requests answered (route "other" for unknown paths)
    codellm_request_duration_seconds{route}           request start to last byte (a stream's whole life)
    codellm_http_requests_in_flight                   admitted generation requests (--max-concurrent-requests)
    codellm_queue_depth                               engine requests waiting for a KV slot
    codellm_running_requests                          engine requests in a slot (prefilling or decoding)
    codellm_kv_slots_free                             KV cache slots not in use
    codellm_time_to_first_token_seconds               submit to first token, per engine request
    codellm_time_per_output_token_seconds             (last token - first token) / (tokens - 1)
    codellm_prompt_tokens_total                       prompt tokens submitted
    codellm_generated_tokens_total                    tokens generated
    codellm_requests_cancelled_total                  engine requests cancelled (client gone, shutdown)

Names follow vLLM's and TGI's where they exist (SERVING.md §1.1, §1.2), under the codellm_ prefix.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
PER_TOKEN = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self, engine, in_flight: Callable[[], int]):
        r = self.registry = CollectorRegistry()
        self.requests = Counter(
            "codellm_requests", "HTTP requests by route and status", ["route", "status"], registry=r
        )
        self.duration = Histogram(
            "codellm_request_duration_seconds",
            "HTTP request duration (streams: until the last event)",
            ["route"],
            buckets=LATENCY,
            registry=r,
        )
        self.ttft = Histogram("codellm_time_to_first_token_seconds", "time to first token", buckets=LATENCY, registry=r)
        self.tpot = Histogram(
            "codellm_time_per_output_token_seconds",
            "time per output token after the first",
            buckets=PER_TOKEN,
            registry=r,
        )
        self.prompt_tokens = Counter("codellm_prompt_tokens", "prompt tokens submitted", registry=r)
        self.generated_tokens = Counter("codellm_generated_tokens", "tokens generated", registry=r)
        self.cancelled = Counter("codellm_requests_cancelled", "engine requests cancelled", registry=r)
        sched, cache = engine.scheduler, engine.cache
        # read from the event loop while the engine thread steps: len() of a list or deque is atomic
        gauges = {
            "codellm_http_requests_in_flight": ("admitted generation requests", in_flight),
            "codellm_queue_depth": ("engine requests waiting for a KV slot", lambda: len(sched.waiting)),
            "codellm_running_requests": (
                "engine requests prefilling or decoding",
                lambda: len(sched.prefilling) + len(sched.decoding),
            ),
            "codellm_kv_slots_free": ("KV cache slots not in use", lambda: cache.n_free),
        }
        for name, (doc, fn) in gauges.items():
            Gauge(name, doc, registry=r).set_function(fn)

    def request(self, route: str, status: int, seconds: float) -> None:
        self.requests.labels(route, str(status)).inc()
        self.duration.labels(route).observe(seconds)

    def finished(self, ttft: float | None, tpot: float | None, tokens: int, cancelled: bool) -> None:
        """One engine request ended."""
        if ttft is not None:
            self.ttft.observe(ttft)
        if tpot is not None:
            self.tpot.observe(tpot)
        self.generated_tokens.inc(tokens)
        if cancelled:
            self.cancelled.inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
