"""A real `codellm serve` in a subprocess, for tests that talk to it over loopback with real clients.

    with start_server(model_dir, "--api-key", "k") as srv:   # waits for the "listening on" line
        httpx.get(srv.url + "/health")
    srv = start_server(model_dir); ...; srv.stop()            # SIGTERM, then kill; returns the exit code

`shared_server` starts one server per distinct set of arguments for the whole test session (stopped at
exit), so several test modules share a process: starting one costs seconds (importing torch), more on a
loaded machine. `long_context_copy` gives a model directory whose context is longer than the tiny model's
256 tokens, for streams that must stay open a while; `SLOW` parameters keep greedy generation away from
EOS (a repetition penalty below 1 favours tokens already seen, and EOS is not in the prompt).
"""

from __future__ import annotations

import atexit
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
LISTENING = re.compile(r"^codellm serve: listening on (http://\S+)$")
START_TIMEOUT_S = 180.0  # importing torch alone can take 10 s on a loaded 2-core machine
SLOW = {"max_new_tokens": 1900, "repetition_penalty": 0.01}  # TGI parameters of a stream that runs for seconds
SLOW_PROMPT = "import os\n"


class Server:
    def __init__(self, proc: subprocess.Popen, url: str, stderr_path: Path, stdout_lines: list[str]):
        self.proc, self.url, self.stderr_path, self.stdout_lines = proc, url, stderr_path, stdout_lines

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM and wait (kill after `timeout`); the exit code. Idempotent."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def access_log(self) -> list[dict]:
        """The JSON access-log lines written so far."""
        out = []
        for line in self.stderr().splitlines():
            if line.startswith("{"):
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:
                    pass
        return out

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def start_server(model_dir, *extra_args: str, timeout: float = START_TIMEOUT_S, env: dict | None = None) -> Server:
    """Start `python -m codellm serve --model model_dir --port 0 *extra_args`; return once it listens."""
    log_dir = Path(tempfile.mkdtemp(prefix="codellm-serve-"))
    stderr_path = log_dir / "stderr.txt"
    cmd = [sys.executable, "-m", "codellm", "serve", "--model", str(model_dir), "--port", "0", *extra_args]
    # one torch thread: fastest for tiny models, and kind to a machine running other work
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    with open(stderr_path, "wb") as err:
        proc = subprocess.Popen(
            cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=err, stdin=subprocess.DEVNULL, env=env, text=True
        )
    lines: list[str] = []
    ready = threading.Event()
    url: list[str] = []

    def read_stdout():
        for line in proc.stdout:
            lines.append(line.rstrip("\n"))
            if not url and (m := LISTENING.match(lines[-1])):
                url.append(m.group(1))
                ready.set()
        ready.set()  # the process closed stdout: it exited

    threading.Thread(target=read_stdout, daemon=True).start()
    deadline = time.monotonic() + timeout
    while not ready.wait(0.1):
        if time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"codellm serve did not listen within {timeout:.0f} s:\n{stderr_path.read_text()}")
    if not url:
        proc.wait(10)
        raise RuntimeError(f"codellm serve exited with {proc.returncode} before listening:\n{stderr_path.read_text()}")
    return Server(proc, url[0], stderr_path, lines)


_shared: dict[tuple, Server] = {}


def shared_server(model_dir, *extra_args: str) -> Server:
    """One server per argument list for the whole session (stopped when the test process exits)."""
    key = (str(model_dir), *extra_args)
    srv = _shared.get(key)
    if srv is None or srv.proc.poll() is not None:
        srv = _shared[key] = start_server(model_dir, *extra_args)
        atexit.register(srv.stop)
    return srv


def long_context_copy(model_dir, out_dir, context: int = 2048) -> Path:
    """A copy of a model directory whose config allows `context` positions (RoPE needs no new weights)."""
    out = Path(out_dir)
    if not out.exists():
        shutil.copytree(model_dir, out)
        config = json.loads((out / "config.json").read_text())
        config["max_position_embeddings"] = context
        (out / "config.json").write_text(json.dumps(config, indent=2))
    return out


def sse_data(lines) -> list[str]:
    """The `data:` payloads of an SSE stream's lines (with or without the space after the colon)."""
    out = []
    for line in lines:
        if line.startswith("data:"):
            out.append(line[5:].removeprefix(" "))
    return out
