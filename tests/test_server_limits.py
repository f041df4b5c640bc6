"""Admission, auth, disconnects and shutdown of a real `codellm serve`, with `--max-concurrent-requests 1`.

The model is the tiny one with a 2,048-token context, and the slow requests use a repetition penalty below
1 (tests.server_fixtures.SLOW) so they run for seconds instead of stopping at EOS. The last test sends
SIGTERM to this module's server: keep it last.
"""

from __future__ import annotations

import json
import socket
import time

import httpx
import pytest

from tests.server_fixtures import SLOW, SLOW_PROMPT, long_context_copy, sse_data, start_server
from tests.test_server_clients import metric

KEY, FILE_KEY = "k1-secret", "k2-secret"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("serve_limits")
    keys = root / "keys.txt"
    keys.write_text(f"# one key per line\n\n{FILE_KEY}\n")
    srv = start_server(
        long_context_copy(tiny_model_dir, root / "model"),
        "--max-concurrent-requests",
        "1",
        "--api-key",
        KEY,
        "--api-key-file",
        str(keys),
        "--shutdown-grace",
        "1",
    )
    yield srv
    srv.stop()


@pytest.fixture
def http(server):
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=60) as client:
        yield client


def slow_stream(http):
    """An open /generate_stream whose first event has arrived: (context manager, line iterator)."""
    cm = http.stream("POST", "/generate_stream", json={"inputs": SLOW_PROMPT, "parameters": SLOW})
    r = cm.__enter__()
    assert r.status_code == 200, r.read()
    lines = r.iter_lines()
    next(line for line in lines if line.startswith("data:"))
    return cm, lines


def wait_admitted(http, deadline_s: float = 10.0) -> httpx.Response:
    """POST a short /generate until it is not refused as overloaded (the slot frees asynchronously)."""
    deadline = time.monotonic() + deadline_s
    while True:
        r = http.post("/generate", json={"inputs": "x", "parameters": {"max_new_tokens": 2}})
        if r.status_code != 429 or time.monotonic() > deadline:
            return r
        time.sleep(0.05)


GENERATION_ROUTES = [
    ("POST", "/generate", {"inputs": "x", "parameters": {"max_new_tokens": 1}}, "tgi"),
    ("POST", "/generate_stream", {"inputs": "x", "parameters": {"max_new_tokens": 1}}, "tgi"),
    ("POST", "/", {"inputs": "x", "parameters": {"max_new_tokens": 1}}, "tgi"),
    ("POST", "/invocations", {"inputs": "x", "parameters": {"max_new_tokens": 1}}, "tgi"),
    ("POST", "/v1/completions", {"prompt": "x", "max_tokens": 1}, "openai"),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "max_tokens": 1}, "openai"),
    ("GET", "/v1/models", None, "openai"),
    ("POST", "/infill", {"input_prefix": "x", "n_predict": 1}, "llama.cpp"),
    ("GET", "/info", None, "tgi"),
    ("GET", "/metrics", None, "tgi"),
]


@pytest.mark.parametrize(("method", "path", "body", "family"), GENERATION_ROUTES)
def test_routes_need_an_api_key(server, method, path, body, family):
    with httpx.Client(base_url=server.url, timeout=60) as client:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}, {"Authorization": "Basic x"}):
            r = client.request(method, path, json=body, headers=headers)
            assert r.status_code == 401, (headers, r.text)
            assert r.headers["www-authenticate"] == "Bearer"
            err = r.json()["error"]
            if family == "tgi":
                assert r.json()["error_type"] == "authentication" and "key" in err.lower()
            else:
                assert err["type"] == "authentication_error" and "key" in err["message"].lower()
        for key in (KEY, FILE_KEY):  # --api-key and --api-key-file both count
            r = client.request(method, path, json=body, headers={"Authorization": f"Bearer {key}"})
            assert r.status_code == 200, r.text


def test_health_ping_and_page_need_no_key(server):
    with httpx.Client(base_url=server.url, timeout=60) as client:
        assert client.get("/health").status_code == 200
        assert client.get("/ping").status_code == 200
        page = client.get("/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html"), page.text


def test_overloaded_past_max_concurrent_requests(http):
    cm, _ = slow_stream(http)
    try:
        r = http.post("/generate", json={"inputs": "x", "parameters": {"max_new_tokens": 1}})
        assert r.status_code == 429
        assert r.json()["error_type"] == "overloaded"
        r = http.post("/v1/completions", json={"prompt": "x", "max_tokens": 1})
        assert r.status_code == 429 and r.json()["error"]["code"] == 429
        r = http.post("/infill", json={"input_prefix": "x", "n_predict": 1})
        assert r.status_code == 429
    finally:
        cm.__exit__(None, None, None)
    assert wait_admitted(http).status_code == 200


def test_disconnect_mid_stream_frees_the_slot(http):
    cancelled = metric(http.get("/metrics").text, "codellm_requests_cancelled_total")
    cm, _ = slow_stream(http)
    cm.__exit__(None, None, None)  # the client goes away with ~1,900 tokens still to come
    r = wait_admitted(http)
    assert r.status_code == 200, r.text
    after = http.get("/metrics").text
    assert metric(after, "codellm_requests_cancelled_total") == cancelled + 1
    assert metric(after, "codellm_running_requests") == 0


def test_a_socket_closed_mid_stream_frees_the_slot_at_once(http, server):
    """A raw TCP client (no HTTP library's pooling or close handshake) reads the first event of a stream that
    has ~1,900 tokens to go and closes its socket: the engine request is cancelled and its KV slot is free
    well before the stream could have ended, and no token is generated for it afterwards."""
    before = http.get("/metrics").text
    free_idle = metric(before, "codellm_kv_slots_free")
    body = json.dumps({"inputs": SLOW_PROMPT, "parameters": SLOW}).encode()
    host, port = server.url.removeprefix("http://").rsplit(":", 1)
    sock = socket.create_connection((host, int(port)), timeout=60)
    sock.sendall(
        b"POST /generate_stream HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + f"Authorization: Bearer {KEY}\r\nContent-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    seen = b""
    while b"data:" not in seen:
        chunk = sock.recv(4096)
        assert chunk, seen
        seen += chunk
    assert seen.startswith(b"HTTP/1.1 200")
    assert metric(http.get("/metrics").text, "codellm_kv_slots_free") == free_idle - 1  # the stream holds one
    sock.close()
    t0 = time.monotonic()
    while True:
        now = http.get("/metrics").text
        if metric(now, "codellm_kv_slots_free") == free_idle and metric(now, "codellm_http_requests_in_flight") == 0:
            break
        assert time.monotonic() - t0 < 2.0, "the slot was not freed within 2 s of the socket closing"
        time.sleep(0.01)
    assert metric(now, "codellm_running_requests") == 0
    assert metric(now, "codellm_requests_cancelled_total") == metric(before, "codellm_requests_cancelled_total") + 1
    generated = metric(now, "codellm_generated_tokens_total")
    time.sleep(0.3)
    assert metric(http.get("/metrics").text, "codellm_generated_tokens_total") == generated  # nothing runs for it
    assert wait_admitted(http).status_code == 200


def test_disconnect_while_waiting_for_a_whole_response_frees_the_slot(http, server):
    cancelled = metric(http.get("/metrics").text, "codellm_requests_cancelled_total")
    with pytest.raises(httpx.ReadTimeout):  # the client gives up and closes the connection
        http.post("/generate", json={"inputs": SLOW_PROMPT, "parameters": SLOW}, timeout=0.5)
    r = wait_admitted(http)
    assert r.status_code == 200, r.text
    assert metric(http.get("/metrics").text, "codellm_requests_cancelled_total") == cancelled + 1
    assert any(line.get("disconnected") and line["status"] == 499 for line in server.access_log())


def test_sigterm_during_a_stream_ends_it_cleanly_and_exits_0(http, server):
    """Runs last: it stops this module's server."""
    with http.stream("POST", "/generate_stream", json={"inputs": SLOW_PROMPT, "parameters": SLOW}) as r:
        lines = r.iter_lines()
        first = next(line for line in lines if line.startswith("data:"))
        server.proc.terminate()  # SIGTERM
        events = [json.loads(first[5:])] + [json.loads(d) for d in sse_data(lines)]
    last = events[-1]
    # finished within the grace period, or cancelled after it: either way a well-formed last event
    assert last.get("generated_text") is not None or last.get("error_type") == "unavailable", last
    assert all("token" in e for e in events[:-1])
    assert server.proc.wait(60) == 0
    assert "SIGTERM" in server.stderr()
    with pytest.raises(httpx.TransportError):
        httpx.get(server.url + "/health", timeout=5)
