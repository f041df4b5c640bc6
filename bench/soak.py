"""Soak test of `codellm serve`: many concurrent streaming clients on loopback for a bounded time, a share of
them hanging up mid-stream; does the server stay correct, bounded and leak-free?

    .venv/bin/python bench/soak.py [--model models/default] [--clients 64] [--duration 300]
        [--disconnect-share 0.25] [--threads 2] [--server-args "--max-batch 16"] [--json out.json]

Each of `--clients` clients loops until `--duration` seconds have passed: it picks a route in turn (TGI
/generate_stream, OpenAI /v1/completions and /v1/chat/completions with stream, llama.cpp /infill when the
model can infill), a prompt of 32, 128 or 384 tokens cut from the standard library's sources, and 16-96 new
tokens (sampled at temperature 0.8), and reads the stream to its end; with probability `--disconnect-share`
it instead closes its socket after 1-8 events. Clients start spread over the first two seconds. No request
starts after the deadline; the ones running then finish.

Reported: requests completed and disconnected on purpose; 5xx answers and error events inside 200 streams
(goal 0 both), other failures (429, timeouts, broken streams); p50/p99 of the time to the first event with
generated text and of end-to-end latency (to the last event) of completed requests; requests/s and
generated tokens/s; the server's RSS when idle after start, after the first tenth of the run (warm:
allocator pools and caches filled), its peak, and at the end (goal: end close to warm); and, once the load
has drained, KV slots leaked (free slots when idle before the run minus free slots after it) and requests
still admitted or running (goal 0 all), with the engine's cancelled-request counter beside the hang-ups.

The HTTP client is bench/serve.py's asyncio one (timestamps as bytes arrive; leaving its generator closes
the socket, a real disconnect). RSS is read from /proc (Linux).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import shlex
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve import HTTPError, Server, code_prompts, codellm_ready, sse_post, thread_env  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = REPO / "models" / "default"
PROMPT_TOKENS = (32, 128, 384)
REQUEST_TIMEOUT_S = 120.0


@dataclass
class Tally:
    completed: int = 0
    disconnected: int = 0  # hung up on purpose
    server_errors: int = 0  # HTTP 5xx
    stream_errors: int = 0  # an error event inside a 200 stream
    other_failures: dict[str, int] = field(default_factory=dict)
    ttft: list[float] = field(default_factory=list)
    e2e: list[float] = field(default_factory=list)
    by_route: dict[str, int] = field(default_factory=dict)

    def fail(self, kind: str) -> None:
        self.other_failures[kind] = self.other_failures.get(kind, 0) + 1


def body(path: str, prompt: str, max_tokens: int, seed: int) -> dict:
    if path == "/generate_stream":
        return {
            "inputs": prompt,
            "parameters": {"max_new_tokens": max_tokens, "do_sample": True, "temperature": 0.8, "seed": seed},
        }
    if path == "/v1/chat/completions":
        messages = [{"role": "user", "content": "Explain this code:\n" + prompt}]
        return {"messages": messages, "max_tokens": max_tokens, "temperature": 0.8, "seed": seed, "stream": True}
    if path == "/infill":
        cut = len(prompt) // 2
        return {
            "input_prefix": prompt[:cut],
            "input_suffix": prompt[cut:],
            "n_predict": max_tokens,
            "temperature": 0.8,
            "seed": seed,
            "stream": True,
        }
    return {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0.8, "seed": seed, "stream": True}


def read_event(path: str, data: str) -> tuple[bool, bool]:
    """(an error event, carries generated text or a token)."""
    if data == "[DONE]":
        return False, False
    obj = json.loads(data)
    if "error" in obj:
        return True, False
    if path == "/generate_stream":
        return False, obj.get("token") is not None
    if path == "/infill":
        return False, bool(obj.get("content"))
    choice = (obj.get("choices") or [{}])[0]
    return False, bool(choice.get("text") or (choice.get("delta") or {}).get("content"))


async def one(url: str, path: str, payload: dict, hang_up_after: int | None, api_key: str | None, tally: Tally):
    t0 = time.perf_counter()
    first = last = None
    events = 0
    try:
        async with asyncio.timeout(REQUEST_TIMEOUT_S):
            async with contextlib.aclosing(sse_post(url + path, payload, api_key)) as stream:
                async for t, data in stream:
                    error, text = read_event(path, data)
                    if error:
                        tally.stream_errors += 1
                        return
                    events += 1
                    first = first or (t if text else None)
                    last = t
                    if hang_up_after is not None and events >= hang_up_after:
                        break  # aclosing closes the generator: its `finally` closes the socket
    except HTTPError as e:
        if e.status >= 500:
            tally.server_errors += 1
        else:
            tally.fail(f"HTTP {e.status}")
        return
    except TimeoutError:
        tally.fail("timeout")
        return
    except (OSError, ValueError, asyncio.IncompleteReadError) as e:
        tally.fail(type(e).__name__)
        return
    if hang_up_after is not None and events >= hang_up_after:
        tally.disconnected += 1
        return
    if first is None:
        tally.fail("no text streamed")
        return
    tally.completed += 1
    tally.by_route[path] = tally.by_route.get(path, 0) + 1
    tally.ttft.append(first - t0)
    tally.e2e.append(last - t0)


async def client(k: int, url: str, routes: list[str], prompts: list[str], deadline: float, args, tally: Tally):
    rng = random.Random(args.seed * 1000 + k)
    await asyncio.sleep(rng.uniform(0, 2))
    i = k
    while time.monotonic() < deadline:
        path = routes[i % len(routes)]
        i += 1
        hang_up = rng.randint(1, 8) if rng.random() < args.disconnect_share else None
        payload = body(path, rng.choice(prompts), rng.randint(16, 96), rng.randrange(2**31))
        await one(url, path, payload, hang_up, args.api_key, tally)


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def get(url: str, api_key: str | None) -> bytes:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=30) as r:
        return r.read()


def metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    raise KeyError(f"/metrics has no {name}")


def metrics(url: str, api_key: str | None) -> str:
    return get(url + "/metrics", api_key).decode()


async def soak(url: str, pid: int, routes: list[str], prompts: list[str], args) -> dict:
    before = metrics(url, args.api_key)
    rss = {"idle": rss_mib(pid)}
    tally = Tally()
    t0 = time.monotonic()
    deadline = t0 + args.duration
    samples: list[float] = []

    async def sample_rss():
        warm_at = t0 + max(args.duration / 10, 5)
        while True:
            await asyncio.sleep(1.0)
            samples.append(rss_mib(pid))
            if "warm" not in rss and time.monotonic() >= warm_at:
                rss["warm"] = samples[-1]

    sampler = asyncio.ensure_future(sample_rss())
    try:
        await asyncio.gather(*(client(k, url, routes, prompts, deadline, args, tally) for k in range(args.clients)))
    finally:
        sampler.cancel()
    wall = time.monotonic() - t0
    # the load is over: every engine request should end within a step or two
    drained_by = time.monotonic() + 30
    while True:
        after = metrics(url, args.api_key)
        busy = metric(after, "codellm_http_requests_in_flight") + metric(after, "codellm_running_requests")
        if busy == 0 or time.monotonic() > drained_by:
            break
        await asyncio.sleep(0.2)
    rss["end"] = rss_mib(pid)
    rss["peak"] = max(samples + [rss["end"]])
    rss.setdefault("warm", samples[0] if samples else rss["end"])
    delta = lambda name: metric(after, name) - metric(before, name)  # noqa: E731
    pct = lambda xs, q: float(np.percentile(xs, q) * 1000) if xs else float("nan")  # noqa: E731
    return {
        "clients": args.clients,
        "duration_s": round(wall, 1),
        "disconnect_share": args.disconnect_share,
        "completed": tally.completed,
        "completed_by_route": tally.by_route,
        "disconnected": tally.disconnected,
        "http_5xx": tally.server_errors,
        "stream_error_events": tally.stream_errors,
        "other_failures": tally.other_failures,
        "requests_per_s": round((tally.completed + tally.disconnected) / wall, 2),
        "generated_tokens_per_s": round(delta("codellm_generated_tokens_total") / wall, 1),
        "ttft_p50_ms": pct(tally.ttft, 50),
        "ttft_p99_ms": pct(tally.ttft, 99),
        "e2e_p50_ms": pct(tally.e2e, 50),
        "e2e_p99_ms": pct(tally.e2e, 99),
        "rss_mib": {k: round(v, 1) for k, v in rss.items()},
        "kv_slots_free_idle": metric(before, "codellm_kv_slots_free"),
        "kv_slots_leaked": metric(before, "codellm_kv_slots_free") - metric(after, "codellm_kv_slots_free"),
        "in_flight_after": metric(after, "codellm_http_requests_in_flight"),
        "running_after": metric(after, "codellm_running_requests"),
        "engine_cancelled": delta("codellm_requests_cancelled_total"),
    }


def table(r: dict) -> str:
    routes = ", ".join(f"{k} {v}" for k, v in r["completed_by_route"].items())
    rows = [
        ("clients x duration", f"{r['clients']} x {r['duration_s']:g} s ({r['disconnect_share']:.0%} hang up)"),
        ("requests completed", f"{r['completed']} ({routes})"),
        ("requests disconnected on purpose", f"{r['disconnected']} (engine cancelled {r['engine_cancelled']:g})"),
        ("HTTP 5xx / error events in streams", f"{r['http_5xx']} / {r['stream_error_events']}"),
        ("other failures", ", ".join(f"{k} {v}" for k, v in r["other_failures"].items()) or "0"),
        ("throughput", f"{r['requests_per_s']} req/s, {r['generated_tokens_per_s']} generated tok/s"),
        ("time to first text p50 / p99", f"{r['ttft_p50_ms']:.0f} / {r['ttft_p99_ms']:.0f} ms"),
        ("end-to-end latency p50 / p99", f"{r['e2e_p50_ms']:.0f} / {r['e2e_p99_ms']:.0f} ms"),
        (
            "server RSS idle / warm / peak / end",
            " / ".join(f"{r['rss_mib'][k]:.0f}" for k in ("idle", "warm", "peak", "end")) + " MiB",
        ),
        (
            "after the load: KV slots leaked, requests admitted, running",
            f"{r['kv_slots_leaked']:g} (of {r['kv_slots_free_idle']:g}), "
            f"{r['in_flight_after']:g}, {r['running_after']:g}",
        ),
    ]
    return "\n".join(["| measure | value |", "|---|---|", *(f"| {a} | {b} |" for a, b in rows)])


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="HF-layout model directory")
    ap.add_argument("--clients", type=int, default=64, help="concurrent streaming clients (default: 64)")
    ap.add_argument("--duration", type=float, default=300.0, help="seconds of load (default: 300)")
    ap.add_argument("--disconnect-share", type=float, default=0.25, help="share of requests that hang up (0.25)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads of the server (default: 2)")
    ap.add_argument("--server-args", default="", help="more `codellm serve` arguments, e.g. '--max-batch 32'")
    ap.add_argument("--api-key", default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--start-timeout", type=float, default=180.0)
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()
    if not args.model.is_dir():
        raise SystemExit(f"bench/soak.py: model directory {args.model} not found (--model DIR)")
    if args.clients < 1 or args.duration <= 0 or not 0 <= args.disconnect_share <= 1:
        raise SystemExit("bench/soak.py: --clients >= 1, --duration > 0 and --disconnect-share in [0, 1]")

    from codellm.tokenizer import load_tokenizer

    tok = load_tokenizer(args.model)
    prompts = [p for n in PROMPT_TOKENS for p in code_prompts(tok.encode, tok.decode, 8, n)]
    cmd = [sys.executable, "-m", "codellm", "serve", "--model", str(args.model), "--host", "127.0.0.1"]
    cmd += ["--port", "0", "--max-concurrent-requests", str(max(128, args.clients)), "--no-access-log"]
    cmd += shlex.split(args.server_args) + (["--api-key", args.api_key] if args.api_key else [])
    with tempfile.TemporaryDirectory() as tmp:
        server = Server(
            "codellm", cmd, Path(tmp) / "serve.log", codellm_ready, thread_env(args.threads), args.start_timeout
        )
        try:
            info = json.loads(get(server.url + "/info", args.api_key))
            routes = ["/generate_stream", "/v1/completions", "/v1/chat/completions"]
            routes += ["/infill"] if info.get("infilling") else []
            print(
                f"soak: {args.clients} clients for {args.duration:g} s against {server.url} ({info['model_id']}, "
                f"max batch {info['max_batch_size']}); routes {', '.join(routes)}",
                flush=True,
            )
            result = asyncio.run(soak(server.url, server.proc.pid, routes, prompts, args))
        finally:
            server.stop()
        result["server_exit_code"] = server.proc.returncode
    result["command"] = " ".join(["bench/soak.py", *sys.argv[1:]])
    print(table(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
