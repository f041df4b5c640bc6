"""Where completions come from: a local model (batched engine, or the reference generator) or an HTTP server.

    gen = LocalGenerator(model, tok, batch_size=16)            # or OpenAIGenerator(url) / TGIGenerator(url)
    texts = gen.generate([PromptSpec("def f(x):\\n", stop=("\\ndef",))], params, n=1)   # -> [[completion]]

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
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Protocol

from codellm.errors import UserError
from codellm.generate import SamplingParams

MAX_SERVER_STOPS = 4  # OpenAI's and TGI's default limit; the rest is applied here, after generation


@dataclass(frozen=True)
class PromptSpec:
    prompt: str
    suffix: str | None = None  # infilling: the model writes what goes between prompt and suffix
    order: str = "psm"
    stop: tuple[str, ...] = ()


class Generator(Protocol):
    def generate(self, prompts: list[PromptSpec], params: SamplingParams, n: int) -> list[list[str]]: ...

    def describe(self) -> dict: ...


def truncate(text: str, stops: tuple[str, ...]) -> str:
    cuts = [i for s in stops if (i := text.find(s)) >= 0]
    return text[:min(cuts)] if cuts else text


def sample_seed(params: SamplingParams, spec: PromptSpec, j: int) -> int | None:
    """A per-sample seed that depends on the prompt, not on batching or resumption."""
    if params.seed is None:
        return None
    return zlib.crc32(f"{params.seed}|{j}|{spec.prompt}|{spec.suffix}".encode())


class LocalGenerator:
    def __init__(self, model, tok, batch_size: int = 16, name: str = "local"):
        self.model, self.tok, self.batch_size, self.name = model, tok, batch_size, name
        self.truncated_prompts = 0

    def describe(self) -> dict:
        return {"kind": "local", "model": self.name, "batch_size": self.batch_size,
                "prompts_left_truncated": self.truncated_prompts}

    def generate(self, prompts: list[PromptSpec], params: SamplingParams, n: int) -> list[list[str]]:
        ids = [self._ids(spec, params) for spec in prompts]
        jobs = [(i, j) for i in range(len(prompts)) for j in range(n)]
        each = [replace(params, stop=prompts[i].stop, seed=sample_seed(params, prompts[i], j)) for i, j in jobs]
        texts = self._run([ids[i] for i, _ in jobs], each)
        out: list[list[str]] = [[] for _ in prompts]
        for (i, _), text in zip(jobs, texts, strict=True):
            out[i].append(truncate(text, prompts[i].stop))
        return out

    def _ids(self, spec: PromptSpec, params: SamplingParams) -> list[int]:
        from codellm import formats

        ctx = self.model.cfg.max_seq_len
        keep = ctx - min(params.max_new_tokens, ctx // 2)
        if spec.suffix is not None:
            prefix, suffix = spec.prompt, spec.suffix
            while len(ids := formats.infill_prompt(self.tok, prefix, suffix, spec.order)) > keep:
                # too long for the context: drop the start of the prefix and the end of the suffix
                self.truncated_prompts += prefix == spec.prompt and suffix == spec.suffix
                prefix, suffix = prefix[len(prefix) // 4 + 1:], suffix[:len(suffix) * 3 // 4]
            return ids
        ids = self.tok.encode(spec.prompt, bos=True)
        if len(ids) > keep:  # a prompt longer than the context keeps its end (the problem), after BOS
            self.truncated_prompts += 1
            ids = ids[:1] + ids[len(ids) - keep + 1:]
        return ids

    def _run(self, ids: list[list[int]], params: list[SamplingParams]) -> list[str]:
        try:
            from codellm.engine import Engine
        except ImportError:  # the batched engine is optional: the reference generator is always there
            from codellm import generate

            return [generate.collect(generate.stream_text(self.model, self.tok, x, p))
                    for x, p in zip(ids, params, strict=True)]
        ctx = self.model.cfg.max_seq_len
        out = []
        for start in range(0, len(ids), self.batch_size):
            chunk, chunk_params = ids[start:start + self.batch_size], params[start:start + self.batch_size]
            max_len = min(ctx, max(len(x) + p.max_new_tokens for x, p in zip(chunk, chunk_params, strict=True)))
            engine = Engine(self.model, self.tok, max_batch=len(chunk), max_len=max_len)
            out += [c.text for c in engine.generate(chunk, chunk_params)]
        return out


class _HTTPGenerator:
    path = ""

    def __init__(self, url: str, model: str | None = None, api_key: str | None = None, concurrency: int = 4,
                 timeout: float = 600.0):
        self.url, self.model, self.api_key = url.rstrip("/"), model, api_key
        self.concurrency, self.timeout = concurrency, timeout

    def describe(self) -> dict:
        return {"kind": type(self).__name__.removesuffix("Generator").lower(), "url": self.url, "model": self.model}

    def generate(self, prompts: list[PromptSpec], params: SamplingParams, n: int) -> list[list[str]]:
        jobs = [(spec, j) for spec in prompts for j in range(n)]
        with ThreadPoolExecutor(self.concurrency) as pool:
            texts = list(pool.map(lambda job: truncate(self._one(job[0], params, job[1]), job[0].stop), jobs))
        return [texts[i * n:(i + 1) * n] for i in range(len(prompts))]

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
                    time.sleep(2 ** attempt)
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
        body = {"model": self.model or "default", "prompt": spec.prompt, "max_tokens": params.max_new_tokens,
                "temperature": params.temperature, "top_p": params.top_p, "n": 1}
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
        if spec.stop:
            parameters["stop"] = list(spec.stop[:MAX_SERVER_STOPS])
        if (seed := sample_seed(params, spec, j)) is not None:
            parameters["seed"] = seed
        inputs = spec.prompt
        if spec.suffix is not None:
            inputs = (f"<PRE> {spec.prompt} <SUF>{spec.suffix} <MID>" if spec.order == "psm"
                      else f"<PRE> <SUF>{spec.suffix} <MID> {spec.prompt}")
        answer = self.post({"inputs": inputs, "parameters": parameters})
        if isinstance(answer, list):  # the compat route wraps the answer in an array
            answer = answer[0] if answer else {}
        return answer.get("generated_text") or ""
