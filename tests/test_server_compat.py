"""What TGI and OpenAI clients expect beyond the basics, against a real `codellm serve` on loopback: each API's
stop-sequence rule, TGI's best_of / typical_p / frequency_penalty / decoder_input_details, OpenAI's penalties,
echo with logprobs, the developer role, model names (404 model_not_found, --served-model-name aliases,
GET /v1/models/{id}), and unknown paths or methods answered in the route family's JSON error shape.

Sampled outputs are compared with the reference generator for the same prompt ids and parameters (seeded),
prompt log-probabilities with a forward of the same weights in this process.
"""

from __future__ import annotations

import json

import httpx
import pytest
import torch

from codellm.sampling import SamplingParams
from tests.server_fixtures import shared_server, sse_data
from tests.test_server_clients import EULA, PROMPT, SERVER_ARGS, greedy, reference_tokens


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    return shared_server(tiny_model_dir, *SERVER_ARGS)


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=60) as client:
        yield client


@pytest.fixture(scope="module")
def ref(tiny_model_dir):
    from codellm.checkpoint import load_model
    from codellm.tokenizer import load_tokenizer

    return load_model(tiny_model_dir), load_tokenizer(tiny_model_dir)


@pytest.fixture(scope="module")
def stop_case(ref):
    """(greedy text of PROMPT, a stop string inside it, where it first starts)."""
    _, text = reference_tokens(ref, ref[1].encode(PROMPT, bos=True), greedy(16))
    stop = text[5:8]
    assert len(text) > 8 and text.find(stop) >= 1, text
    return text, stop, text.find(stop)


# --- item 6: stop sequences, per route --------------------------------------------------------------


def test_tgi_routes_keep_the_matched_stop_sequence(http, stop_case):
    text, stop, at = stop_case
    parameters = {"max_new_tokens": 16, "stop": [stop], "details": True}
    want = text[:at] + stop
    out = http.post("/generate", json={"inputs": PROMPT, "parameters": parameters}).json()
    assert out["generated_text"] == want and out["details"]["finish_reason"] == "stop_sequence"
    assert "".join(t["text"] for t in out["details"]["tokens"]) == want
    compat = http.post("/", json={"inputs": PROMPT, "parameters": parameters}).json()
    assert compat == [compat[0]] and compat[0]["generated_text"] == want
    sagemaker = http.post("/invocations", headers=EULA, json={"inputs": PROMPT, "parameters": parameters}).json()
    assert sagemaker[0]["generated_text"] == want
    with http.stream("POST", "/generate_stream", json={"inputs": PROMPT, "parameters": parameters}) as r:
        events = [json.loads(d) for d in sse_data(r.iter_lines())]
    assert events[-1]["generated_text"] == want == "".join(e["token"]["text"] for e in events)
    assert events[-1]["details"]["finish_reason"] == "stop_sequence"
    full = http.post("/generate", json={"inputs": PROMPT, "parameters": parameters | {"return_full_text": True}})
    assert full.json()["generated_text"] == PROMPT + want


def test_openai_routes_drop_the_matched_stop_sequence(http, stop_case):
    text, stop, at = stop_case
    body = {"prompt": PROMPT, "max_tokens": 16, "temperature": 0, "stop": stop}
    choice = http.post("/v1/completions", json=body).json()["choices"][0]
    assert choice["text"] == text[:at] and choice["finish_reason"] == "stop" and choice["stop_reason"] == stop
    with http.stream("POST", "/v1/completions", json=body | {"stream": True}) as r:
        chunks = [json.loads(d) for d in sse_data(r.iter_lines()) if d != "[DONE]"]
    assert "".join(c["choices"][0]["text"] for c in chunks) == text[:at]
    # SageMaker with an OpenAI body follows OpenAI's rule: the rule goes with the API, not the path
    sm = http.post("/invocations", headers=EULA, json=body).json()
    assert sm["choices"][0]["text"] == text[:at]


# --- item 7: TGI parameters -------------------------------------------------------------------------


def test_tgi_typical_p_and_frequency_penalty_sample_as_the_reference(http, ref):
    ids = ref[1].encode(PROMPT, bos=True)
    for extra in ({"typical_p": 0.5}, {"frequency_penalty": -2.0, "do_sample": True}):
        body = {"inputs": PROMPT, "parameters": {"max_new_tokens": 16, "seed": 3, "details": True} | extra}
        out = http.post("/generate", json=body).json()
        fields = {k: v for k, v in extra.items() if k != "do_sample"}
        want, _ = reference_tokens(ref, ids, SamplingParams(max_new_tokens=16, temperature=1.0, seed=3, **fields))
        plain, _ = reference_tokens(ref, ids, SamplingParams(max_new_tokens=16, temperature=1.0, seed=3))
        assert [t["id"] for t in out["details"]["tokens"]] == want != plain, extra


def test_tgi_best_of_answers_the_likeliest_sequence(http):
    parameters = {"max_new_tokens": 8, "best_of": 2, "do_sample": True, "temperature": 1.5, "details": True}
    out = http.post("/generate", json={"inputs": PROMPT, "parameters": parameters}).json()
    details = out["details"]
    (other,) = details["best_of_sequences"]
    mean = lambda tokens: sum(t["logprob"] for t in tokens) / len(tokens)
    assert mean(details["tokens"]) >= mean(other["tokens"])
    assert details["seed"] != other["seed"]
    assert set(other) >= {"generated_text", "finish_reason", "generated_tokens", "seed", "prefill", "tokens"}
    # each sequence is what its seed draws on its own
    for seed, text in ((details["seed"], out["generated_text"]), (other["seed"], other["generated_text"])):
        alone = {k: v for k, v in parameters.items() if k != "best_of"} | {"seed": seed}
        assert http.post("/generate", json={"inputs": PROMPT, "parameters": alone}).json()["generated_text"] == text
    assert http.get("/info").json()["max_best_of"] == 2


def prompt_logprobs(ref, ids: list[int]) -> list[float]:
    with torch.inference_mode():
        logp = torch.log_softmax(ref[0](torch.tensor([ids]))[0, :-1].float(), -1)
    return logp.gather(1, torch.tensor(ids[1:])[:, None])[:, 0].tolist()


def test_tgi_decoder_input_details_scores_the_prompt(http, ref):
    ids = ref[1].encode(PROMPT, bos=True)
    parameters = {"max_new_tokens": 2, "details": True, "decoder_input_details": True}
    prefill = http.post("/generate", json={"inputs": PROMPT, "parameters": parameters}).json()["details"]["prefill"]
    assert [t["id"] for t in prefill] == ids and prefill[0]["logprob"] is None
    assert prefill[1:] and all(t["text"] for t in prefill)
    assert [t["logprob"] for t in prefill[1:]] == pytest.approx(prompt_logprobs(ref, ids), abs=1e-4)


# --- item 7: OpenAI ---------------------------------------------------------------------------------


def test_openai_presence_and_frequency_penalties_follow_the_reference(http, ref):
    ids = ref[1].encode(PROMPT, bos=True)
    body = {"prompt": PROMPT, "max_tokens": 16, "temperature": 0, "presence_penalty": -2, "frequency_penalty": -2}
    text = http.post("/v1/completions", json=body).json()["choices"][0]["text"]
    _, want = reference_tokens(ref, ids, greedy(16, presence_penalty=-2.0, frequency_penalty=-2.0))
    _, plain = reference_tokens(ref, ids, greedy(16))
    assert text == want != plain
    chat = http.post(
        "/v1/chat/completions",
        json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "presence_penalty": 1.5, "seed": 1},
    )
    assert chat.status_code == 200, chat.text


def test_openai_echo_with_logprobs_scores_the_prompt(http, ref):
    ids = ref[1].encode(PROMPT, bos=True)
    want = prompt_logprobs(ref, ids)  # of ids[1:]: the BOS is not in the echoed text
    only = http.post("/v1/completions", json={"prompt": PROMPT, "echo": True, "max_tokens": 0, "logprobs": 1}).json()
    choice = only["choices"][0]
    assert choice["text"] == PROMPT and only["usage"]["completion_tokens"] == 0
    assert choice["logprobs"]["token_logprobs"] == pytest.approx(want, abs=1e-4)
    assert len(choice["logprobs"]["tokens"]) == len(ids) - 1 and choice["logprobs"]["text_offset"][0] == 0
    assert all(len(top) >= 1 for top in choice["logprobs"]["top_logprobs"])

    body = {"prompt": PROMPT, "echo": True, "max_tokens": 3, "logprobs": 0, "temperature": 0}
    both = http.post("/v1/completions", json=body).json()["choices"][0]
    _, completion = reference_tokens(ref, ids, greedy(3))
    assert both["text"] == PROMPT + completion
    assert len(both["logprobs"]["tokens"]) == len(ids) - 1 + 3
    assert both["logprobs"]["token_logprobs"][: len(ids) - 1] == pytest.approx(want, abs=1e-4)
    with http.stream("POST", "/v1/completions", json=body | {"stream": True}) as r:
        chunks = [json.loads(d) for d in sse_data(r.iter_lines()) if d != "[DONE]"]
    assert chunks[0]["choices"][0]["text"] == PROMPT
    assert chunks[0]["choices"][0]["logprobs"]["token_logprobs"] == pytest.approx(want, abs=1e-4)


def test_openai_developer_role_is_system(http):
    def ask(role):
        messages = [{"role": role, "content": "Answer with code."}, {"role": "user", "content": "Sort a list."}]
        r = http.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 6, "temperature": 0})
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["message"]["content"], r.json()["usage"]["prompt_tokens"]

    assert ask("developer") == ask("system")


def test_openai_model_names(http, server):
    import openai

    oai = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
    for name in ("tiny", "codellama/CodeLlama-7b-hf"):  # both --served-model-name values
        assert oai.models.retrieve(name).id == name
        r = oai.completions.create(model=name, prompt="x", max_tokens=1)
        assert r.model == name
    assert http.post("/v1/completions", json={"prompt": "x", "max_tokens": 1}).json()["model"] == "tiny"
    with pytest.raises(openai.NotFoundError) as e:
        oai.completions.create(model="gpt-4", prompt="x", max_tokens=1)
    assert e.value.body["code"] == "model_not_found" and "gpt-4" in e.value.body["message"]
    for method, path, body in (
        ("POST", "/v1/chat/completions", {"model": "model", "messages": [{"role": "user", "content": "x"}]}),
        ("GET", "/v1/models/gpt-4", None),
    ):
        r = http.request(method, path, json=body)
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found", r.text
        assert r.json()["error"]["param"] == "model" and "tiny" in r.json()["error"]["message"]
    # SageMaker's endpoint is the model: the name in an OpenAI-shaped body is not checked there
    sm = {"model": "anything", "messages": [{"role": "user", "content": "x"}], "max_tokens": 1}
    assert http.post("/invocations", headers=EULA, json=sm).status_code == 200


@pytest.mark.parametrize(
    ("method", "path", "status", "family"),
    [
        ("GET", "/nope", 404, "tgi"),
        ("POST", "/generate/extra", 404, "tgi"),
        ("GET", "/generate", 405, "tgi"),
        ("DELETE", "/health", 405, "tgi"),
        ("POST", "/v1/embeddings", 404, "openai"),
        ("GET", "/v1/completions", 405, "openai"),
        ("POST", "/v1/models", 405, "openai"),
        ("GET", "/infill", 405, "llama.cpp"),
    ],
)
def test_unknown_paths_and_methods_answer_json_in_the_family_shape(http, method, path, status, family):
    r = http.request(method, path)
    assert r.status_code == status and r.headers["content-type"] == "application/json", r.text
    body = r.json()
    if family == "tgi":
        assert set(body) == {"error", "error_type"} and path in body["error"]
        assert body["error_type"] == ("not_found" if status == 404 else "method_not_allowed")
    else:
        err = body["error"]
        assert path in err["message"]
        if family == "openai":
            assert err["type"] == "invalid_request_error" and err["code"] == status
        else:
            assert err["code"] == status and "type" in err
    if status == 405:
        assert method not in r.headers["allow"] and r.headers["allow"]
