"""Where completions come from: a local model (batched engine, or the reference generator) or an HTTP server.

    gen = LocalGenerator(model, tok, batch_size=16)            # or OpenAIGenerator(url) / TGIGenerator(url)
    texts = gen.generate([PromptSpec("def f(x):\\n", stop=("\\ndef",))], params, n=1)   # -> [[completion]]
    for i, texts in gen.stream(specs, params, n=1): ...       # each prompt's n completions as they finish

All the prompts of a call go through at once: locally one engine with continuous batching (a finished
request's slot takes the next waiting one at the next step, no barrier between batches), remotely a pool
of `concurrency` requests in flight.

Every generator returns, per prompt, n completions truncated at the earliest stop sequence found in the
generated text only (never in the prompt). Infilling prompts (a `suffix`) come from
`codellm.formats.infill_prompt` locally, the OpenAI `suffix` field, or Code Llama's sentinel text for TGI,
and end at <EOT>.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, replace
from typing import Protocol

from codellm import formats
from codellm.errors import UserError
from codellm.prompt_rules import fit_completion, fit_infill
from codellm.sampling import SamplingParams

MAX_SERVER_STOPS = 4  # OpenAI's and TGI's default limit; the rest is applied here, after generation


@dataclass(frozen=True)
class PromptSpec:
    prompt: str
    suffix: str | None = None  # infilling: the model writes what goes between prompt and suffix
    order: str = "psm"
    stop: tuple[str, ...] = ()


class Generator(Protocol):
    def generate(self, prompts: list[PromptSpec], params: SamplingParams, n: int) -> list[list[str]]: ...

    def stream(self, prompts: list[PromptSpec], params: SamplingParams, n: int) -> Iterator[tuple[int, list[str]]]: ...

    def describe(self) -> dict: ...


def truncate(text: str, stops: tuple[str, ...]) -> str:
    cuts = [i for s in stops if (i := text.find(s)) >= 0]
    return text[: min(cuts)] if cuts else text


def sample_seed(params: SamplingParams, spec: PromptSpec, j: int) -> int | None:
    """A per-sample seed that depends on the prompt, not on batching or resumption."""
    if params.seed is None:
        return None
    return zlib.crc32(f"{params.seed}|{j}|{spec.prompt}|{spec.suffix}".encode())


class _Streaming:
    """`generate` from `stream`: every prompt's n completions, in prompt order."""

    def generate(self, prompts: list[PromptSpec], params: SamplingParams, n: int) -> list[list[str]]:
        out: list[list[str]] = [[] for _ in prompts]
        for i, texts in self.stream(prompts, params, n):
            out[i] = texts
        return out

    def stream(self, prompts: list[PromptSpec], params: SamplingParams, n: int) -> Iterator[tuple[int, list[str]]]:
        raise NotImplementedError


class _Gather:
    """Collects finished samples per prompt; `add` returns (prompt index, n texts) once a prompt has all n."""

    def __init__(self, prompts: list[PromptSpec], n: int):
        self.prompts, self.n, self.texts = prompts, n, {}

    def add(self, i: int, j: int, text: str) -> tuple[int, list[str]] | None:
        got = self.texts.setdefault(i, {})
        got[j] = truncate(text, self.prompts[i].stop)
        if len(got) < self.n:
            return None
        del self.texts[i]
        return i, [got[k] for k in range(self.n)]


class LocalGenerator(_Streaming):
    def __init__(self, model, tok, batch_size: int = 16, name: str = "local", compile: bool = False):
        self.model, self.tok, self.batch_size, self.name, self.compile = model, tok, batch_size, name, compile
        self.truncated_prompts = 0

    def describe(self) -> dict:
        return {
            "kind": "local",
            "model": self.name,
            "batch_size": self.batch_size,
            "prompts_left_truncated": self.truncated_prompts,
        }

    def stream(self, prompts: list[PromptSpec], params: SamplingParams, n: int) -> Iterator[tuple[int, list[str]]]:
        ids = [self._ids(spec, params) for spec in prompts]
        jobs = [(i, j) for i in range(len(prompts)) for j in range(n)]
        # token healing applies to left-to-right prompts; infilling prompts end in <MID> (or the prefix, in SPM)
        each = [replace(params, stop=prompts[i].stop, seed=sample_seed(params, prompts[i], j),
                        heal=params.heal and prompts[i].suffix is None) for i, j in jobs]
        gather = _Gather(prompts, n)
        for k, text in self._run([ids[i] for i, _ in jobs], each):
            if (done := gather.add(*jobs[k], text)) is not None:
                yield done

    def _ids(self, spec: PromptSpec, params: SamplingParams) -> list[int]:
        ctx = self.model.cfg.max_seq_len
        keep = ctx - min(params.max_new_tokens, ctx // 2)  # what the prompt may use, the rest is for the answer
        if spec.suffix is not None:
            ids, truncated = fit_infill(self.tok, spec.prompt, spec.suffix, spec.order, keep)
        else:
            ids, truncated = fit_completion(self.tok, spec.prompt, keep)
        self.truncated_prompts += truncated
        return ids

    def _run(self, ids: list[list[int]], params: list[SamplingParams]) -> Iterator[tuple[int, str]]:
        """(job index, text) as each job finishes: every job is submitted to one engine at once, which runs
        `batch_size` of them at a time and admits the next waiting one as soon as a slot frees up."""
        try:
            from codellm.engine import Engine
        except ImportError:  # the batched engine is optional: the reference generator is always there
            from codellm import generate
            from codellm.streaming import collect

            for k, (x, p) in enumerate(zip(ids, params, strict=True)):
                yield k, collect(generate.stream_text(self.model, self.tok, x, p))
            return
        if not ids:
            return
        ctx = self.model.cfg.max_seq_len
        max_len = min(ctx, max(len(x) + p.max_new_tokens for x, p in zip(ids, params, strict=True)))
        engine = Engine(self.model, self.tok, max_batch=min(self.batch_size, len(ids)), max_len=max_len,
                        compile=self.compile)
        job = {engine.submit(x, p): k for k, (x, p) in enumerate(zip(ids, params, strict=True))}
        texts: dict[int, list[str]] = {}
        for event in engine.run():
            texts.setdefault(event.request_id, []).append(event.text)
            if event.finished:
                yield job[event.request_id], "".join(texts.pop(event.request_id))


def extra_sampling_fields(params: SamplingParams) -> dict:
    """top_k and repetition_penalty as TGI, vLLM and codellm name them, sent whenever they are set: a run
    records them in its settings, so a server that ignored them would leave its scores mislabelled (one
    that does not know them refuses the request instead)."""
    out = {}
    if params.top_k:
        out["top_k"] = params.top_k
    if params.repetition_penalty != 1.0:
        out["repetition_penalty"] = params.repetition_penalty
    return out


class _HTTPGenerator(_Streaming):
    path = ""

    def __init__(
        self,
        url: str,
        model: str | None = None,
        api_key: str | None = None,
        concurrency: int = 4,
        timeout: float = 600.0,
    ):
        self.url, self.model, self.api_key = url.rstrip("/"), model, api_key
        self.concurrency, self.timeout = concurrency, timeout

    def describe(self) -> dict:
        return {"kind": type(self).__name__.removesuffix("Generator").lower(), "url": self.url, "model": self.model}

    def stream(self, prompts: list[PromptSpec], params: SamplingParams, n: int) -> Iterator[tuple[int, list[str]]]:
        gather = _Gather(prompts, n)
        with ThreadPoolExecutor(self.concurrency) as pool:
            futures = {
                pool.submit(self._one, prompts[i], params, j): (i, j) for i in range(len(prompts)) for j in range(n)
            }
            try:
                for future in as_completed(futures):
                    if (done := gather.add(*futures[future], future.result())) is not None:
                        yield done
            finally:  # an error (or the caller stopping early) drops the requests not sent yet
                for future in futures:
                    future.cancel()

    def _one(self, spec: PromptSpec, params: SamplingParams, j: int) -> str:
        raise NotImplementedError

    def post(self, body: dict) -> dict:
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(self.url + self.path, json.dumps(body).encode(), headers, method="POST")
        for attempt in range(4):
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    return json.loads(response.read())
            except urllib.error.HTTPError as e:
                detail = e.read().decode("utf-8", "replace")[:300]
                if e.code in (429, 503) and attempt < 3:  # overloaded: back off and retry
                    time.sleep(2**attempt)
                    continue
                raise UserError(f"{self.url + self.path} answered HTTP {e.code}: {detail}") from None
            except (urllib.error.URLError, OSError) as e:
                raise UserError(f"cannot reach {self.url + self.path}: {getattr(e, 'reason', e)}") from None
        raise AssertionError("unreachable")


class OpenAIGenerator(_HTTPGenerator):
    """OpenAI-compatible `/v1/completions`; infilling through the `suffix` field (prefix-suffix-middle)."""

    @property
    def path(self) -> str:
        return "/completions" if self.url.endswith("/v1") else "/v1/completions"

    def _one(self, spec: PromptSpec, params: SamplingParams, j: int) -> str:
        body = {
            "prompt": spec.prompt,
            "max_tokens": params.max_new_tokens,
            "temperature": params.temperature,
            "top_p": params.top_p,
            "n": 1,
        }
        if self.model:  # unset: the server's default model (a made-up name is a 404 on vLLM and codellm)
            body["model"] = self.model
        body |= extra_sampling_fields(params)  # vLLM's and codellm's extensions of the OpenAI fields
        if spec.stop:
            body["stop"] = list(spec.stop[:MAX_SERVER_STOPS])
        if (seed := sample_seed(params, spec, j)) is not None:
            body["seed"] = seed
        if spec.suffix is not None:
            if spec.order != "psm":
                raise UserError("the OpenAI completions API infills prefix-suffix-middle only (use --order psm)")
            body["suffix"] = spec.suffix
        choices = self.post(body).get("choices") or [{}]
        return choices[0].get("text") or ""


class TGIGenerator(_HTTPGenerator):
    """text-generation-inference `/generate`; infilling prompts as Code Llama sentinel text (TGI has no suffix)."""

    path = "/generate"

    def _one(self, spec: PromptSpec, params: SamplingParams, j: int) -> str:
        parameters = {"max_new_tokens": params.max_new_tokens, "return_full_text": False, "details": False}
        if not params.greedy:  # TGI rejects temperature 0 and top_p 1: leave them out for greedy / no nucleus
            parameters |= {"do_sample": True, "temperature": params.temperature}
            if params.top_p < 1:
                parameters["top_p"] = params.top_p
        parameters |= extra_sampling_fields(params)
        if spec.stop:
            parameters["stop"] = list(spec.stop[:MAX_SERVER_STOPS])
        if (seed := sample_seed(params, spec, j)) is not None:
            parameters["seed"] = seed
        inputs = spec.prompt if spec.suffix is None else formats.infill_text(spec.prompt, spec.suffix, spec.order)
        answer = self.post({"inputs": inputs, "parameters": parameters})
        if isinstance(answer, list):  # the compat route wraps the answer in an array
            answer = answer[0] if answer else {}
        return answer.get("generated_text") or ""
