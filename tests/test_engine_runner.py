"""The engine loop in a thread: streams from threads and from asyncio, cancellation on early exit, errors."""

import asyncio
import threading
import time
from contextlib import aclosing

import pytest
import torch

from codellm.engine import Engine, EngineRunner
from codellm.sampling import SamplingParams
from tests.conftest import needs_cxx
from tests.test_engine import VOCAB, random_prompt, reference, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def lm():
    return tiny_model(VOCAB)


@pytest.fixture
def runner(lm):
    runner = EngineRunner(Engine(lm, max_batch=3, token_budget=16))
    yield runner
    runner.close(timeout=10)


def tokens_of(events) -> list[int]:
    return [e.token_id for e in events if e.token_id is not None]


def wait_idle(engine: Engine, timeout: float = 10.0):
    deadline = time.monotonic() + timeout
    while engine.has_work and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not engine.has_work


def test_streams_from_several_threads(lm, runner):
    prompts = [random_prompt(n, n) for n in (4, 30, 11, 52, 7)]
    params = SamplingParams(max_new_tokens=12)
    results = {}

    def consume(i):
        results[i] = list(runner.stream(prompts[i], params))

    threads = [threading.Thread(target=consume, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    for i, prompt in enumerate(prompts):
        assert tokens_of(results[i]) == reference(lm, prompt, params)
        assert results[i][-1].finished and sum(e.finished for e in results[i]) == 1


def test_async_streams_and_disconnect_cancels(lm, runner):
    prompts = [random_prompt(n, 50 + n) for n in (9, 23, 40)]
    params = SamplingParams(max_new_tokens=10, temperature=0.7, seed=5)
    long_run = SamplingParams(max_new_tokens=200)

    async def collect(prompt):
        return [e async for e in runner.astream(prompt, params)]

    async def leave_early():
        async with aclosing(runner.astream(random_prompt(15, 1), long_run)) as events:
            async for event in events:
                if event.token_id is not None:
                    return event.request_id  # the client goes away: aclosing cancels it now

    async def main():
        return await asyncio.gather(leave_early(), *(collect(p) for p in prompts))

    gone, *results = asyncio.run(main())
    for prompt, events in zip(prompts, results, strict=True):
        assert tokens_of(events) == reference(lm, prompt, params)
    wait_idle(runner.engine)
    assert gone not in runner.engine.requests
    assert runner.engine.cache.n_free == runner.engine.cache.n_slots


class Broken(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.inner, self.cfg = model, model.cfg

    def forward(self, *args, **kwargs):
        raise RuntimeError("out of memory (simulated)")


def test_a_failing_step_ends_every_stream_with_an_error(lm):
    runner = EngineRunner(Engine(Broken(lm), max_batch=2))
    events = list(runner.stream(random_prompt(5, 0), SamplingParams(max_new_tokens=4)))
    assert [(e.finished, e.reason) for e in events] == [(True, "error")]
    runner.close(timeout=10)
    assert "simulated" in str(runner.error)
    with pytest.raises(RuntimeError, match="stopped"):
        runner.submit([1, 2], SamplingParams(), print)


@needs_cxx
def test_model_runner_picks_the_decode_path_per_device_and_flag():
    """The model runner, not the engine, owns the decode path and the KV layout."""
    from codellm.engine.model_runner import ModelRunner

    model = tiny_model(VOCAB)
    eager = ModelRunner(model, max_batch=2, max_len=32)
    assert eager.path == "eager" and eager.cache.n_slots == 2 and eager.cache.max_len == 32
    assert ModelRunner(model, max_batch=2, max_len=32, compile=True).path == "native"  # a CPU: the C++ step
    engine = Engine(model, max_batch=2, max_len=32)
    assert engine.cache is engine.model_runner.cache and engine.model_runner.path == "eager"

    class Wrapped(torch.nn.Module):  # e.g. an adapter around a model: runs eagerly, cannot be compiled
        def __init__(self, inner):
            super().__init__()
            self.inner, self.cfg = inner, inner.cfg

    with pytest.raises(TypeError, match="compile=True needs a codellm Transformer"):
        ModelRunner(Wrapped(model), max_batch=1, compile=True)
