"""Serving benchmark in the style of vLLM's benchmark_serving: `codellm serve` under N concurrent streaming
clients, and llama.cpp's server (llama-cpp-python) on the same weights under the same load.

    .venv/bin/python bench/serve.py [--model models/default] [--concurrency 1,8,32] [--requests N]
        [--prompt-tokens 256] [--output-tokens 64] [--endpoint completions|generate_stream]
        [--threads 2] [--json out.json]

Per level, `--requests` requests (default 2 x concurrency) start at once behind a semaphore of the level's
concurrency (vLLM's --request-rate inf with --max-concurrency). Per request, from the client's streaming
loop: TTFT = time to the first chunk with text, ITL = gaps between successive chunks (pooled over all
requests), E2E = send to last chunk, TPOT = (E2E - TTFT) / (output tokens - 1). Output tokens come from the
server's usage / details when it reports them, else the number of chunks. Throughput is over the level's
wall time (first send to last completion). One warm-up request per server is not counted.

Prompts are fixed-length token windows (`--prompt-tokens`, in each server's own tokenizer) cut from
CPython's standard library sources: plain code, not benchmark data. Output length is pinned: codellm gets
`ignore_eos` (vLLM's extension), llama.cpp `min_tokens`. A server that rejects the field runs without it, and
one that ignores it is caught when the warm-up request stops short; either way a note says the lengths vary
(up to `--output-tokens`). Sampling is greedy on both. `codellm serve` runs at its defaults (e.g. --max-batch)
plus `--server-args`, with --max-concurrent-requests set to the top level so nothing is refused.

llama.cpp runs when `llama_cpp` and its server (`pip install 'llama-cpp-python[server]'`) import and a GGUF
can be made: `--gguf FILE`, or converted from the model with bench/engine.py's helpers (see its docstring for
the converter recipe). Its server handles one request at a time (requests queue); it is started with
`--interrupt_requests False` so a new request does not cut off the running one. Otherwise one line says why
it was skipped. The HTTP client is a small asyncio one: no dependency, timestamps taken as bytes arrive.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np

REPO = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = REPO / "models" / "default"
# Prompt sources: large, stable modules of the standard library of the Python running the benchmark.
PROMPT_FILES = [
    "argparse.py",
    "ast.py",
    "dataclasses.py",
    "functools.py",
    "inspect.py",
    "pathlib.py",
    "shutil.py",
    "subprocess.py",
    "textwrap.py",
    "typing.py",
    "tarfile.py",
    "zipfile.py",
]


# --- prompts -----------------------------------------------------------------------------------------


def code_prompts(encode, decode, n: int, tokens: int) -> list[str]:
    """`n` texts of `tokens` tokens each (as `encode` counts them), consecutive windows of stdlib source."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = [stdlib / f for f in PROMPT_FILES if (stdlib / f).is_file()] or sorted(stdlib.glob("*.py"))
    out = []
    for path in files:
        ids = encode(path.read_text(encoding="utf-8", errors="replace"))
        out += [decode(ids[i : i + tokens]) for i in range(0, len(ids) - tokens + 1, tokens)]
        if len(out) >= n:
            return out[:n]
    raise SystemExit(
        f"bench/serve.py: the prompt files give only {len(out)} prompts of {tokens} tokens; ask for fewer or shorter"
    )


# --- a streaming HTTP client on asyncio streams -------------------------------------------------------


class HTTPError(Exception):
    def __init__(self, status: int, body: str):
        super().__init__(f"HTTP {status}: {body[:300]}")
        self.status = status


async def sse_post(url: str, payload: dict, api_key: str | None = None):
    """POST JSON to `url` and yield (arrival time, data) for each server-sent event, until the stream ends."""
    u = urlsplit(url)
    reader, writer = await asyncio.open_connection(u.hostname, u.port, limit=1 << 22)
    try:
        body = json.dumps(payload).encode()
        head = [
            f"POST {u.path} HTTP/1.1",
            f"Host: {u.netloc}",
            "Content-Type: application/json",
            "Accept: text/event-stream",
            f"Content-Length: {len(body)}",
            "Connection: close",
        ]
        if api_key:
            head.append(f"Authorization: Bearer {api_key}")
        writer.write(("\r\n".join(head) + "\r\n\r\n").encode() + body)
        await writer.drain()
        status = int((await reader.readline()).split()[1])
        headers = {}
        while (line := await reader.readline()) not in (b"\r\n", b"\n", b""):
            k, _, v = line.decode("latin-1").partition(":")
            headers[k.strip().lower()] = v.strip().lower()
        chunks = _chunked(reader) if "chunked" in headers.get("transfer-encoding", "") else _until_eof(reader)
        if status != 200:
            raise HTTPError(status, b"".join([c async for c in chunks]).decode(errors="replace"))
        buf = b""
        async for chunk in chunks:
            t = time.perf_counter()
            buf = (buf + chunk).replace(b"\r\n", b"\n")  # sse-starlette ends lines with CRLF
            *events, buf = buf.split(b"\n\n")
            for event in events:
                data = [line[5:].removeprefix(b" ") for line in event.split(b"\n") if line.startswith(b"data:")]
                if data:
                    yield t, b"\n".join(data).decode()
    finally:
        writer.close()


async def _chunked(reader):
    while size := int((await reader.readline()).split(b";")[0], 16):
        yield (await reader.readexactly(size + 2))[:-2]


async def _until_eof(reader):
    while chunk := await reader.read(1 << 16):
        yield chunk


# --- the APIs ----------------------------------------------------------------------------------------


@dataclass
class Api:
    """One route's request body and how to read its stream: text pieces, and token counts when reported."""

    path: str
    pin_field: dict  # what pins the output length on this server; dropped if the server rejects it
    extra: dict = field(default_factory=dict)  # optional fields, likewise dropped on rejection

    def body(self, prompt: str, max_tokens: int) -> dict:
        if self.path == "/generate_stream":
            return {
                "inputs": prompt,
                "parameters": {
                    "max_new_tokens": max_tokens,
                    "do_sample": False,
                    "details": True,
                    **self.pin_field,
                    **self.extra,
                },
            }
        return {
            "prompt": prompt,
            "max_tokens": max_tokens,
            "temperature": 0.0,
            "stream": True,
            **self.pin_field,
            **self.extra,
        }

    def read(self, obj: dict) -> tuple[bool, int | None, int | None]:
        """(is a token chunk, output tokens if reported, prompt tokens if reported)."""
        if "error" in obj:
            raise HTTPError(200, json.dumps(obj))
        if self.path == "/generate_stream":
            details = obj.get("details") or {}
            return obj.get("token") is not None, details.get("generated_tokens"), details.get("prefill_tokens")
        usage = obj.get("usage") or {}
        choices = obj.get("choices") or [{}]
        return bool(choices[0].get("text")), usage.get("completion_tokens"), usage.get("prompt_tokens")


@dataclass
class RequestResult:
    ok: bool = False
    error: str = ""
    ttft: float = 0.0
    e2e: float = 0.0
    itl: list[float] = field(default_factory=list)
    chunks: int = 0
    output_tokens: int = 0
    prompt_tokens: int | None = None


async def one_request(url: str, api: Api, prompt: str, max_tokens: int, api_key: str | None) -> RequestResult:
    r = RequestResult()
    t0 = last = time.perf_counter()
    reported = None
    try:
        async for t, data in sse_post(url + api.path, api.body(prompt, max_tokens), api_key):
            if data == "[DONE]":
                break
            is_token, n_out, n_in = api.read(json.loads(data))
            reported = n_out if n_out is not None else reported
            r.prompt_tokens = n_in if n_in is not None else r.prompt_tokens
            if is_token:
                if r.chunks == 0:
                    r.ttft = t - t0
                else:
                    r.itl.append(t - last)
                r.chunks += 1
                last = t
        r.e2e = last - t0
        r.output_tokens = reported if reported is not None else r.chunks
        r.ok = r.chunks > 0
        r.error = "" if r.ok else "no tokens streamed"
    except Exception as e:  # noqa: BLE001 - a failed request is a result, not a crash
        r.error = f"{type(e).__name__}: {e}"
    return r


async def run_level(
    url: str, api: Api, prompts: list[str], concurrency: int, max_tokens: int, api_key: str | None
) -> tuple[float, list[RequestResult]]:
    sem = asyncio.Semaphore(concurrency)

    async def limited(prompt):
        async with sem:
            return await one_request(url, api, prompt, max_tokens, api_key)

    t0 = time.perf_counter()
    results = await asyncio.gather(*(limited(p) for p in prompts))
    return time.perf_counter() - t0, list(results)


def summarize(duration: float, results: list[RequestResult]) -> dict:
    ok = [r for r in results if r.ok]
    ms = lambda xs, q: float(np.percentile(xs, q) * 1000) if len(xs) else float("nan")  # noqa: E731
    ttft = [r.ttft for r in ok]
    tpot = [(r.e2e - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]
    itl = [x for r in ok for x in r.itl]
    e2e = [r.e2e for r in ok]
    out_tokens = sum(r.output_tokens for r in ok)
    prompt_tokens = [r.prompt_tokens for r in ok if r.prompt_tokens is not None]
    return {
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "duration_s": duration,
        "req_per_s": len(ok) / duration,
        "output_tok_per_s": out_tokens / duration,
        "mean_output_tokens": out_tokens / len(ok) if ok else 0.0,
        "mean_prompt_tokens": float(np.mean(prompt_tokens)) if prompt_tokens else None,
        **{
            f"{name}_p{q}_ms": ms(xs, q)
            for name, xs in (("ttft", ttft), ("tpot", tpot), ("itl", itl), ("e2e", e2e))
            for q in (50, 99)
        },
        "errors": sorted({r.error for r in results if not r.ok})[:5],
    }


# --- servers -----------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A server subprocess, its output in a log file; `ready` is how to tell it is up (returns its URL)."""

    def __init__(self, name: str, cmd: list[str], log: Path, ready, env: dict, timeout: float):
        self.name, self.log = name, log
        self.proc = subprocess.Popen(
            cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env, stdin=subprocess.DEVNULL
        )
        deadline = time.monotonic() + timeout
        while (url := ready(self)) is None:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {self.proc.returncode}:\n{self.tail()}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{name} not ready after {timeout:.0f} s:\n{self.tail()}")
            time.sleep(0.2)
        self.url = url

    def tail(self, n: int = 20) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def codellm_ready(server: Server) -> str | None:
    for line in server.log.read_text(errors="replace").splitlines():
        if line.startswith("codellm serve: listening on "):
            return line.split()[-1].rstrip("/")
    return None


def http_ready(url: str):
    def ready(_server):
        try:
            with urllib.request.urlopen(url + "/v1/models", timeout=2):
                return url
        except urllib.error.HTTPError:  # it answers (401 when it has an API key): it is up
            return url
        except OSError:
            return None

    return ready


def thread_env(threads: int) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}


def start_codellm(args, tmp: Path) -> Server:
    max_conc = max(args.concurrency)
    cmd = [
        sys.executable,
        "-m",
        "codellm",
        "serve",
        "--model",
        str(args.model),
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--max-concurrent-requests",
        str(max_conc),
        *shlex.split(args.server_args),
    ]
    if args.api_key:
        cmd += ["--api-key", args.api_key]
    return Server("codellm", cmd, tmp / "codellm.log", codellm_ready, thread_env(args.threads), args.start_timeout)


def llama_cpp_skip_reason(args) -> str | None:
    """Why llama.cpp cannot run here, or None; the converter check is bench/engine.py's."""
    try:
        import llama_cpp.server.app  # noqa: F401
    except ImportError as e:
        if "llama_cpp" in str(e) and "server" not in str(e):
            return "llama_cpp not importable (see the recipe in bench/engine.py)"
        return f"llama_cpp's server does not import ({e}); pip install 'llama-cpp-python[server]'"
    if args.gguf:
        return None if Path(args.gguf).is_file() else f"--gguf {args.gguf} does not exist"
    sys.path.insert(0, str(Path(__file__).parent))
    from engine import llama_cpp_skip_reason as converter_skip_reason

    return converter_skip_reason(args.convert_script)


def make_gguf(args, tmp: Path) -> Path:
    if args.gguf:
        return Path(args.gguf)
    from engine import to_gguf

    return to_gguf(Path(args.model), "float32", args.convert_script, tmp)  # codellm serves float32 on CPU


def start_llama_cpp(args, gguf: Path, tmp: Path) -> Server:
    port = free_port()
    n_ctx = args.prompt_tokens + args.output_tokens + 64
    cmd = [
        sys.executable,
        "-m",
        "llama_cpp.server",
        "--model",
        str(gguf),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--n_ctx",
        str(n_ctx),
        "--n_threads",
        str(args.threads),
        "--n_threads_batch",
        str(args.threads),
        "--interrupt_requests",
        "False",
        "--verbose",
        "False",
    ]
    if args.api_key:
        cmd += ["--api_key", args.api_key]
    return Server(
        "llama.cpp",
        cmd,
        tmp / "llama_cpp.log",
        http_ready(f"http://127.0.0.1:{port}"),
        thread_env(args.threads),
        args.start_timeout,
    )


def llama_cpp_tokenizer(gguf: Path):
    from llama_cpp import Llama

    llm = Llama(model_path=str(gguf), vocab_only=True, verbose=False)
    return (
        lambda text: llm.tokenize(text.encode(), add_bos=False),
        lambda ids: llm.detokenize(ids).decode("utf-8", errors="ignore"),
    )


async def calibrate(url: str, api: Api, prompt: str, args) -> tuple[Api, list[str]]:
    """The warm-up request; drops fields the server rejects (retrying once per field). Returns notes."""
    notes = []
    while True:
        r = await one_request(url, api, prompt, args.output_tokens, args.api_key)
        if r.ok:
            if r.output_tokens < args.output_tokens:
                notes.append(
                    f"the warm-up request stopped after {r.output_tokens} of {args.output_tokens} tokens: output "
                    "lengths are not pinned on this server (it ignores or lacks the field), so they vary"
                )
            return api, notes
        optional = [*api.extra, *api.pin_field]
        if not optional or "HTTP 4" not in r.error:
            raise RuntimeError(f"warm-up request to {url}{api.path} failed: {r.error}")
        name = next((k for k in optional if k in r.error), optional[0])  # the one the error names, if any
        api.extra.pop(name, None)
        api.pin_field.pop(name, None)
        notes.append(f"server rejected `{name}`, running without it ({r.error[:160]})")


def bench_server(server: Server, api: Api, prompts: list[str], args) -> dict:
    print(f"{server.name}: {server.url}{api.path}", flush=True)
    api, notes = asyncio.run(calibrate(server.url, api, prompts[0], args))
    for note in notes:
        print(f"  note: {note}", flush=True)
    levels = {}
    for c in args.concurrency:
        n = args.requests or 2 * c
        duration, results = asyncio.run(
            run_level(server.url, api, prompts[1 : n + 1], c, args.output_tokens, args.api_key)
        )
        levels[c] = summarize(duration, results)
        s = levels[c]
        print(
            f"  concurrency {c}: {s['completed']}/{n} in {duration:.1f} s, {s['output_tok_per_s']:.1f} out tok/s",
            flush=True,
        )
        for err in s["errors"]:
            print(f"    error: {err}", flush=True)
    return {"endpoint": api.path, "notes": notes, "levels": levels}


# --- tables ------------------------------------------------------------------------------------------

COLUMNS = [
    ("completed", "completed", "{:.0f}"),
    ("req/s", "req_per_s", "{:.2f}"),
    ("output tok/s", "output_tok_per_s", "{:.1f}"),
    *[(f"{m.upper()} p{q}", f"{m}_p{q}_ms", "{:.0f}") for m in ("ttft", "tpot", "itl", "e2e") for q in (50, 99)],
]


def print_tables(args, results: dict, skipped: str | None):
    print(
        f"\nprompt {args.prompt_tokens} tokens, {args.output_tokens} output tokens, {args.threads} threads; times in ms"
    )
    for c in args.concurrency:
        print(f"\nconcurrency {c}, {args.requests or 2 * c} requests\n")
        print("| server | " + " | ".join(name for name, _, _ in COLUMNS) + " |")
        print("|---|" + "---|" * len(COLUMNS))
        for backend, res in results.items():
            s = res["levels"][c]
            print(f"| {backend} | " + " | ".join(fmt.format(s[key]) for _, key, fmt in COLUMNS) + " |")
        if len(results) == 2:
            a, b = (results[k]["levels"][c] for k in ("codellm", "llama.cpp"))
            ratio = [f"{a[key] / b[key]:.2f}x" if b[key] and key != "completed" else "-" for _, key, _ in COLUMNS]
            print("| codellm / llama.cpp | " + " | ".join(ratio) + " |")
    if skipped:
        print(f"\nllama.cpp skipped: {skipped}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="HF-layout model directory")
    ap.add_argument("--concurrency", default="1,8,32", help="comma-separated levels")
    ap.add_argument("--requests", type=int, default=None, help="requests per level (default 2 x concurrency)")
    ap.add_argument("--prompt-tokens", type=int, default=256)
    ap.add_argument("--output-tokens", type=int, default=64)
    ap.add_argument(
        "--endpoint",
        choices=["completions", "generate_stream"],
        default="completions",
        help="codellm's route (llama.cpp always gets /v1/completions)",
    )
    ap.add_argument("--threads", type=int, default=2, help="compute threads of each server")
    ap.add_argument("--api-key", default=None, help="started with and sent to both servers")
    ap.add_argument("--server-args", default="", help="extra arguments for `codellm serve`, one string")
    ap.add_argument("--start-timeout", type=float, default=300.0, help="seconds to wait for a server")
    ap.add_argument("--skip-llama-cpp", action="store_true")
    ap.add_argument("--gguf", default=None, help="GGUF of the same weights for llama.cpp (default: convert)")
    ap.add_argument(
        "--convert-script",
        default=os.environ.get("LLAMA_CPP_CONVERT"),
        help="llama.cpp's convert_hf_to_gguf.py (default: $LLAMA_CPP_CONVERT)",
    )
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args()
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    if not args.model.is_dir():
        raise SystemExit(f"bench/serve.py: model directory {args.model} not found (--model DIR)")
    n_prompts = 1 + max(args.requests or 2 * c for c in args.concurrency)  # +1: the warm-up

    from codellm.tokenizer import load_tokenizer

    tok = load_tokenizer(args.model)
    results = {}
    skipped = "--skip-llama-cpp" if args.skip_llama_cpp else llama_cpp_skip_reason(args)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        prompts = code_prompts(tok.encode, tok.decode, n_prompts, args.prompt_tokens)
        if args.endpoint == "completions":
            api = Api("/v1/completions", {"ignore_eos": True}, {"stream_options": {"include_usage": True}})
        else:
            api = Api("/generate_stream", {"ignore_eos": True})
        server = start_codellm(args, tmp)
        try:
            results["codellm"] = bench_server(server, api, prompts, args)
        finally:
            server.stop()
        if skipped is None:
            try:
                gguf = make_gguf(args, tmp)
                lc_prompts = code_prompts(*llama_cpp_tokenizer(gguf), n_prompts, args.prompt_tokens)
                server = start_llama_cpp(args, gguf, tmp)
            except (RuntimeError, subprocess.CalledProcessError) as e:
                skipped = f"could not start it: {str(e).splitlines()[0]}"
            else:
                try:
                    api = Api(
                        "/v1/completions", {"min_tokens": args.output_tokens}, {"repeat_penalty": 1.0, "top_k": 0}
                    )
                    results["llama.cpp"] = bench_server(server, api, lc_prompts, args)
                finally:
                    server.stop()
    print_tables(args, results, skipped)
    if args.json:
        config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "api_key"}
        args.json.write_text(
            json.dumps({"config": config, "results": results, "llama_cpp_skipped": skipped}, indent=2) + "\n"
        )
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
