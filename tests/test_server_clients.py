"""`codellm serve` on the tiny model, driven by the clients people use: the official `openai` SDK,
huggingface_hub's InferenceClient, raw SSE over httpx, SageMaker-style calls, llama.cpp-style /infill.

Greedy outputs are compared with what `codellm complete` gives for the same prompt ids (its engine path,
`cli.engine_stream`, itself checked against the reference generator): the server must give the same tokens.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import httpx
import pytest

from codellm import formats
from codellm.checkpoint import load_model
from codellm.generate import chat, complete, infill, stream_text
from codellm.options import engine_stream
from codellm.prompt_rules import context_text
from codellm.sampling import SamplingParams
from codellm.tokenizer import load_tokenizer
from tests.server_fixtures import shared_server, sse_data

EULA = {"X-Amzn-SageMaker-Custom-Attributes": "accept_eula=true"}
PROMPT = "def add(a, b):\n"
# the shared server's arguments (test_server_validation.py and test_server_compat.py use the same process)
SERVER_ARGS = ("--require-eula", "--served-model-name", "tiny", "--served-model-name", "codellama/CodeLlama-7b-hf")


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    return shared_server(tiny_model_dir, *SERVER_ARGS)


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=60) as client:
        yield client


@pytest.fixture(scope="module")
def ref(tiny_model_dir):
    """(model, tokenizer) in this process, for reference outputs."""
    return load_model(tiny_model_dir), load_tokenizer(tiny_model_dir)


def greedy(n: int, **kw) -> SamplingParams:
    return SamplingParams(max_new_tokens=n, **kw)


def reference_tokens(ref, ids: list[int], params: SamplingParams) -> tuple[list[int], str]:
    """What `codellm complete` prints for these prompt ids (its engine path), checked against the reference
    generator too."""
    events = list(engine_stream(SimpleNamespace(kv_memory=None, compile=False), *ref, ids, params))
    tokens, text = [e.token_id for e in events if e.token_id is not None], "".join(e.text for e in events)
    reference = list(stream_text(*ref, ids, params))
    assert tokens == [e.token_id for e in reference if e.token_id is not None]
    return tokens, text


# --- TGI --------------------------------------------------------------------------------------------


def test_greedy_generate_matches_reference(http, ref):
    _, tok = ref
    for prompt, stop in ((PROMPT, []), ("class Point:\n    def norm(self):", []), ("import os\n", ["i"])):
        r = http.post(
            "/generate", json={"inputs": prompt, "parameters": {"max_new_tokens": 12, "details": True, "stop": stop}}
        )
        assert r.status_code == 200, r.text
        ids, text = reference_tokens(ref, tok.encode(prompt, bos=True), greedy(12, stop=tuple(stop)))
        out = r.json()
        assert out["generated_text"] == text
        assert [t["id"] for t in out["details"]["tokens"]] == ids
        assert "".join(t["text"] for t in out["details"]["tokens"]) == text
        assert out["details"]["generated_tokens"] == len(ids)
        assert out["details"]["finish_reason"] in ("length", "eos_token", "stop_sequence")
        assert all(t["logprob"] <= 0 for t in out["details"]["tokens"])
        assert int(r.headers["x-generated-tokens"]) == len(ids)


def test_generate_stream_is_tgi_sse(http, ref):
    body = {"inputs": PROMPT, "parameters": {"max_new_tokens": 8, "top_n_tokens": 2}}
    with http.stream("POST", "/generate_stream", json=body) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = list(r.iter_lines())
    raw = [line for line in lines if line.startswith("data")]
    assert all(line.startswith("data:{") for line in raw)  # TGI writes no space after "data:"
    events = [json.loads(d) for d in sse_data(lines)]
    assert [e["index"] for e in events] == list(range(1, len(events) + 1))
    assert all(e["generated_text"] is None and e["details"] is None for e in events[:-1])
    last = events[-1]
    ids, text = reference_tokens(ref, ref[1].encode(PROMPT, bos=True), greedy(8))
    assert last["generated_text"] == text == "".join(e["token"]["text"] for e in events)
    assert [e["token"]["id"] for e in events] == ids
    assert set(last["details"]) == {"finish_reason", "generated_tokens", "seed", "input_length"}
    assert last["details"]["input_length"] == len(ref[1].encode(PROMPT, bos=True))
    assert all(len(e["top_tokens"]) == 2 for e in events)
    # the same request without streaming gives the same text
    assert http.post("/generate", json=body).json()["generated_text"] == text


def test_inference_client_text_generation(server, ref):
    from huggingface_hub import InferenceClient

    client = InferenceClient(base_url=server.url)  # posts to `POST /`, TGI's compat route
    ids, text = reference_tokens(ref, ref[1].encode(PROMPT, bos=True), greedy(6))
    assert client.text_generation(PROMPT, max_new_tokens=6) == text
    assert "".join(client.text_generation(PROMPT, max_new_tokens=6, stream=True)) == text
    out = client.text_generation(PROMPT, max_new_tokens=6, details=True)
    assert out.generated_text == text
    assert [t.id for t in out.details.tokens] == ids
    assert out.details.generated_tokens == len(ids) and out.details.finish_reason in ("length", "eos_token")
    chunks = list(client.text_generation(PROMPT, max_new_tokens=6, details=True, stream=True))
    assert [c.token.id for c in chunks] == ids and chunks[-1].generated_text == text
    full = client.text_generation(PROMPT, max_new_tokens=6, return_full_text=True)
    assert full == PROMPT + text


# --- OpenAI -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def oai(server):
    import openai

    return openai.OpenAI(base_url=server.url + "/v1", api_key="not-needed", max_retries=0)


def test_openai_completions_with_suffix_fill_the_middle(oai, ref):
    model, tok = ref
    prefix, suffix = "def add(a, b):\n    ", "\n    return c\n"
    r = oai.completions.create(model="tiny", prompt=prefix, suffix=suffix, max_tokens=6, temperature=0)
    expected = "".join(e.text for e in infill(model, tok, prefix, suffix, greedy(6)))
    assert r.choices[0].text == expected
    assert r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens == len(formats.infill_prompt(tok, prefix, suffix))
    plain = oai.completions.create(model="tiny", prompt=prefix, max_tokens=6, temperature=0)
    assert plain.choices[0].text == "".join(e.text for e in complete(model, tok, prefix, greedy(6)))
    assert plain.usage.prompt_tokens == len(tok.encode(prefix, bos=True))

    stream = oai.completions.create(
        model="tiny",
        prompt=prefix,
        suffix=suffix,
        max_tokens=6,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == expected
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == r.usage.completion_tokens


def test_openai_completions_n_echo_logprobs(oai, ref):
    model, tok = ref
    r = oai.completions.create(model="tiny", prompt=["x = 1\n", "def f("], max_tokens=3, temperature=0, n=2)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    assert r.choices[0].text == r.choices[1].text  # greedy: both choices of a prompt agree
    echo = oai.completions.create(model="tiny", prompt="def f(", max_tokens=3, temperature=0, echo=True)
    assert echo.choices[0].text == "def f(" + r.choices[2].text
    lp = oai.completions.create(model="tiny", prompt="def f(", max_tokens=3, temperature=0, logprobs=2).choices[0]
    assert len(lp.logprobs.tokens) == len(lp.logprobs.token_logprobs) == len(lp.logprobs.top_logprobs)
    assert all(x <= 0 for x in lp.logprobs.token_logprobs)
    assert all(1 <= len(top) <= 3 for top in lp.logprobs.top_logprobs)  # equal texts share a key
    assert lp.logprobs.text_offset[0] == 0
    # a seeded sample is reproducible
    a, b = (
        oai.completions.create(model="tiny", prompt="def f(", max_tokens=5, temperature=1.0, seed=7) for _ in range(2)
    )
    assert a.choices[0].text == b.choices[0].text


def test_openai_chat(oai, ref):
    model, tok = ref
    messages = [{"role": "system", "content": "Answer with code."}, {"role": "user", "content": "Reverse a string."}]
    r = oai.chat.completions.create(model="tiny", messages=messages, max_tokens=6, temperature=0)
    expected = "".join(e.text for e in chat(model, tok, messages, greedy(6)))
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == expected
    assert r.usage.prompt_tokens == len(formats.chat_tokens(tok, messages)[0])
    chunks = list(
        oai.chat.completions.create(
            model="tiny",
            messages=messages,
            max_tokens=6,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected
    assert chunks[-2].choices[0].finish_reason in ("stop", "length")
    assert chunks[-1].usage.total_tokens == r.usage.total_tokens
    lp = oai.chat.completions.create(
        model="tiny", messages=messages, max_tokens=3, temperature=0, logprobs=True, top_logprobs=2
    )
    assert len(lp.choices[0].logprobs.content) == lp.usage.completion_tokens
    assert all(len(t.top_logprobs) == 2 for t in lp.choices[0].logprobs.content)


def test_openai_models_and_error_envelope(oai, http):
    import openai

    assert [m.id for m in oai.models.list()] == ["tiny", "codellama/CodeLlama-7b-hf"]  # --served-model-name
    with pytest.raises(openai.BadRequestError) as e:
        oai.completions.create(model="tiny", prompt="x", max_tokens=0)
    assert "max_tokens" in str(e.value)
    body = http.post("/v1/completions", json={"prompt": "x", "top_p": 0}).json()
    assert body["error"]["param"] == "top_p" and body["error"]["type"] == "invalid_request_error"
    assert body["error"]["code"] == 400


# --- llama.cpp /infill ------------------------------------------------------------------------------


def test_infill_with_repository_context(http, ref):
    model, tok = ref
    prefix, suffix = "def load(path):\n    ", "\n    return data\n"
    extra = [{"filename": "utils/io.py", "text": "def read_text(path):\n    return open(path).read()\n"}]
    body = {"input_prefix": prefix, "input_suffix": suffix, "input_extra": extra, "n_predict": 6, "temperature": 0}
    r = http.post("/infill", json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    ids = formats.infill_prompt(tok, context_text([("utils/io.py", extra[0]["text"])]) + prefix, suffix)
    assert out["tokens_evaluated"] == len(ids) and out["truncated"] is False
    _, text = reference_tokens(ref, ids, greedy(6))
    assert out["content"] == text and out["stop"] is True
    assert out["stop_type"] in ("eos", "limit") and out["timings"]["predicted_n"] == out["tokens_predicted"]

    with http.stream("POST", "/infill", json=body | {"stream": True}) as s:
        events = [json.loads(d) for d in sse_data(s.iter_lines())]
    assert all(not e["stop"] for e in events[:-1]) and events[-1]["stop"] is True and events[-1]["content"] == ""
    assert "".join(e["content"] for e in events) == text
    assert events[-1]["timings"]["predicted_n"] == out["tokens_predicted"]


def test_infill_truncates_to_the_context_keeping_the_text_at_the_gap(http, ref):
    model, tok = ref
    prefix = "".join(f"x{i} = {i}\n" for i in range(200)) + "def f():\n    "
    suffix = "\n    return 1\n" + "".join(f"y{i} = {i}\n" for i in range(200))
    extra = [{"filename": "big.py", "text": "z = 0\n" * 500}]
    r = http.post(
        "/infill",
        json={"input_prefix": prefix, "input_suffix": suffix, "input_extra": extra, "n_predict": 4, "temperature": 0},
    )
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["truncated"] is True
    assert out["tokens_evaluated"] + 4 <= 256  # the tiny model's context


# --- SageMaker --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("attributes", "accepted"),
    [
        (None, False),
        ("accept_eula=true", True),
        ("accept_eula=TRUE; other=1", True),
        ("accept_eula=true;accept_eula=false", False),  # the last value of a repeated key wins
        ("accept_eula=false, accept_eula=true", True),
        ("accept_eula=yes", False),
    ],
)
def test_sagemaker_invocations_need_the_eula(http, attributes, accepted):
    headers = {"X-Amzn-SageMaker-Custom-Attributes": attributes} if attributes else {}
    r = http.post("/invocations", json={"inputs": PROMPT, "parameters": {"max_new_tokens": 3}}, headers=headers)
    if accepted:
        assert r.status_code == 200, r.text
        assert list(r.json()[0]) == ["generated_text"]
    else:
        assert r.status_code == 424
        assert r.json()["message"] == "prediction failure" and "accept_eula=true" in r.json()["error"]


def test_sagemaker_ping_and_chat_shaped_invocation(http):
    assert http.get("/ping").status_code == 200
    r = http.post("/invocations", headers=EULA, json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
    assert r.status_code == 200 and r.json()["object"] == "chat.completion"


# --- the server as a whole --------------------------------------------------------------------------


def test_many_clients_at_once_get_their_own_answers(http, ref):
    prompts = [f"def f{i}(x):\n" for i in range(6)]
    expected = [reference_tokens(ref, ref[1].encode(p, bos=True), greedy(10))[1] for p in prompts]

    def ask(prompt):
        return http.post("/generate", json={"inputs": prompt, "parameters": {"max_new_tokens": 10}}).json()

    with ThreadPoolExecutor(len(prompts)) as pool:
        answers = list(pool.map(ask, prompts))
    assert [a["generated_text"] for a in answers] == expected


def test_health_info_and_page(http, server):
    r = http.get("/health")
    assert r.status_code == 200 and r.content == b""
    info = http.get("/info").json()
    assert info["max_total_tokens"] == 256 and info["max_input_tokens"] == 255 and info["infilling"] is True
    page = http.get("/")  # the playground ships in the package (pyproject's package data)
    assert page.status_code == 200, page.text
    assert page.headers["content-type"].startswith("text/html") and "<html" in page.text.lower()
    assert "/v1/completions" in page.text or "/generate" in page.text  # the page, not another HTML answer


def metric(text: str, name: str, **labels) -> float:
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    for line in text.splitlines():
        if line.startswith(name + ("{" + want + "}" if want else " ")):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_metrics_and_access_log(http, server, ref):
    before = http.get("/metrics").text
    http.post("/generate", json={"inputs": PROMPT, "parameters": {"max_new_tokens": 3}})
    http.post("/generate", json={"inputs": PROMPT, "parameters": {"top_p": 0}})
    after = http.get("/metrics")
    assert after.headers["content-type"].startswith("text/plain")
    moved = lambda name, **labels: metric(after.text, name, **labels) - metric(before, name, **labels)
    assert moved("codellm_requests_total", route="/generate", status="200") == 1
    assert moved("codellm_requests_total", route="/generate", status="422") == 1
    assert moved("codellm_prompt_tokens_total") == len(ref[1].encode(PROMPT, bos=True))
    assert moved("codellm_generated_tokens_total") >= 1
    assert moved("codellm_time_to_first_token_seconds_count") == 1
    assert metric(after.text, "codellm_running_requests") == 0 and metric(after.text, "codellm_queue_depth") == 0
    log = [line for line in server.access_log() if line["route"] == "/generate"]
    assert {"time", "method", "route", "status", "duration_ms", "client"} <= set(log[-1])
    assert log[-1]["status"] == 422 and "top_p" in log[-1]["error"]
    assert log[-2]["status"] == 200 and log[-2]["completion_tokens"] >= 1 and log[-2]["prompt_tokens"] > 1
