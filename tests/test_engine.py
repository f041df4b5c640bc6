"""The engine against the reference generator: same tokens whatever the batch, the chunking, the
arrivals, cancellations and slot reuse; text and stops as `stream_text`; memory errors."""

from types import SimpleNamespace

import pytest
import torch

from codellm import formats, generate
from codellm.checkpoint import load_model
from codellm.engine import Engine, SlotKVCache
from codellm.engine.decode import DecodeStep
from codellm.engine.kv_cache import common_prefix
from codellm.errors import UserError
from codellm.generate import generate_tokens
from codellm.sampling import SamplingParams
from codellm.streaming import collect
from codellm.tokenizer import load_tokenizer
from tests.conftest import decode_against_forward, tiny_model

VOCAB = 512
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    return tiny_model(VOCAB)


@pytest.fixture(scope="module")
def model_and_tok(tiny_model_dir):
    return load_model(tiny_model_dir), load_tokenizer(tiny_model_dir)


def random_prompt(n: int, seed: int) -> list[int]:
    return [1] + torch.randint(3, VOCAB, (n - 1,), generator=torch.Generator().manual_seed(seed)).tolist()


def reference(model, prompt: list[int], params: SamplingParams) -> list[int]:
    return list(generate_tokens(model, prompt, params, {model.cfg.eos_id, *params.stop_ids}))


def step_checked(engine: Engine) -> list:
    """One step, then the dense-rows invariant: decoding request i sits in slot row i."""
    events = engine.step()
    assert [r.slot for r in engine.scheduler.decoding] == list(range(len(engine.scheduler.decoding)))
    return events


def test_greedy_matches_reference_with_arrivals_and_cancellations(model):
    lengths = [3, 61, 17, 120, 1, 40, 9, 75]
    prompts = [random_prompt(n, seed) for seed, n in enumerate(lengths)]
    params = [SamplingParams(max_new_tokens=5 + 4 * i) for i in range(len(prompts))]
    # 3 slots for 8 requests: queueing and slot reuse; a 24-token budget: the 120-token prompt takes 5+ chunks
    engine = Engine(model, max_batch=3, token_budget=24)
    arrivals = {0: [0, 1, 2, 3], 3: [4, 5], 6: [6, 7]}
    cancel_at = {4: 1, 7: 6}  # step -> prompt index: one running, one still waiting
    rids, tokens, reasons, step = {}, {}, {}, 0
    while step == 0 or engine.has_work:
        for i in arrivals.get(step, []):
            rids[engine.submit(prompts[i], params[i])] = i
        if step in cancel_at:
            engine.cancel(next(r for r, i in rids.items() if i == cancel_at[step]))
        for event in step_checked(engine):
            i = rids[event.request_id]
            if event.token_id is not None:
                tokens.setdefault(i, []).append(event.token_id)
            if event.finished:
                reasons[i] = event.reason
        step += 1
    for i, prompt in enumerate(prompts):
        expected = reference(model, prompt, params[i])
        if i in cancel_at.values():
            assert reasons[i] == "cancelled"
            assert tokens.get(i, []) == expected[:len(tokens.get(i, []))]
        else:
            assert tokens[i] == expected, f"prompt {i} ({len(prompt)} tokens)"
    assert engine.cache.n_free == engine.cache.n_slots and not engine.requests


@pytest.mark.parametrize("params", [
    SamplingParams(max_new_tokens=24, temperature=0.8, top_p=0.9, seed=1),
    SamplingParams(max_new_tokens=24, temperature=1.3, top_k=20, seed=2),
    SamplingParams(max_new_tokens=24, temperature=1.0, repetition_penalty=1.3, seed=3),
    SamplingParams(max_new_tokens=24, repetition_penalty=1.5),
])
def test_sampling_does_not_depend_on_the_batch(model, params):
    prompt = random_prompt(30, 100)
    expected = reference(model, prompt, params)
    alone = Engine(model, max_batch=1).generate([prompt], params)[0].token_ids
    others = [random_prompt(n, 200 + n) for n in (5, 50, 12)]
    noise = SamplingParams(max_new_tokens=30, temperature=1.0, seed=9)
    engine = Engine(model, max_batch=4, token_budget=16)
    mixed = engine.generate([others[0], prompt, *others[1:]], [noise, params, noise, noise])[1].token_ids
    later = engine.generate([*others, prompt], [noise, noise, noise, params])[3].token_ids
    assert alone == mixed == later == expected


def test_chunked_prefill_equals_whole_prefill(model):
    prompt = torch.tensor([random_prompt(50, 5)])
    with torch.inference_mode():
        whole = model(prompt)  # (1, 50, vocab), no cache
        cache = SlotKVCache(model.cfg, n_slots=3, max_len=64)
        start, parts = 0, []
        for n in (7, 1, 19, 23):
            positions = torch.arange(start, start + n)[None]
            parts.append(model(prompt[:, start:start + n], positions, cache.view(2, 3)))
            start += n
    # other chunk sizes mean other matmul blockings: fp32 rounding differs (~1e-5 on logits of size ~10)
    torch.testing.assert_close(torch.cat(parts, dim=1), whole, atol=1e-4, rtol=1e-4)
    assert not cache.k[:, :2].any()  # the other slots are untouched
    # and in the engine: a 3-token budget (chunks of 2 or 3) gives the tokens of one whole prefill
    params = SamplingParams(max_new_tokens=12)
    chunked = Engine(model, max_batch=1, token_budget=3).generate([prompt[0].tolist()], params)[0].token_ids
    assert chunked == reference(model, prompt[0].tolist(), params)


def test_a_long_prompt_is_chunked_and_never_stalls_running_decodes(model):
    engine = Engine(model, max_batch=2, token_budget=16)
    short = engine.submit(random_prompt(4, 1), SamplingParams(max_new_tokens=40))
    engine.step()
    engine.submit(random_prompt(150, 2), SamplingParams(max_new_tokens=3))
    shapes = []
    hook = model.register_forward_pre_hook(lambda _, args: shapes.append(tuple(args[0].shape)))
    for _ in range(9):  # 149 prompt tokens to compute (BOS is reused from the short request's slot)
        shapes.clear()
        assert any(e.request_id == short and e.token_id is not None for e in engine.step())
        assert shapes == [(1, 1), (1, 15)]  # the decode, then a chunk of what the budget leaves
    hook.remove()


def test_slots_are_reused_without_leaking_state(model):
    engine = Engine(model, max_batch=2)
    params = SamplingParams(max_new_tokens=10)
    prompts = [random_prompt(n, 300 + n) for n in (40, 7, 25, 33, 2, 18)]
    for round_ in range(3):
        for i in range(0, len(prompts), 2):
            pair = prompts[i:i + 2] if round_ != 1 else prompts[i:i + 2][::-1]
            got = [c.token_ids for c in engine.generate(pair, params)]
            assert got == [reference(model, p, params) for p in pair]
            # poison everything past each row's recorded sequence: the next owner must never read it
            for row, seq in enumerate(engine.cache.seqs):
                for t in (engine.cache.k, engine.cache.v) if seq is not None else ():
                    t[:, row, :, seq.n_computed:] = 1e4
    assert engine.cache.n_free == 2


def test_cancel_frees_the_slot_at_once(model):
    engine = Engine(model, max_batch=1)
    long_run = engine.submit(random_prompt(20, 1), SamplingParams(max_new_tokens=200))
    for _ in range(3):
        engine.step()
    waiting = engine.submit(random_prompt(9, 2), SamplingParams(max_new_tokens=6))
    engine.step()
    assert waiting in engine.requests and engine.requests[waiting].slot == -1  # no slot for it yet
    engine.cancel(long_run)
    events = engine.step()
    assert events[0].request_id == long_run and events[0].finished and events[0].reason == "cancelled"
    assert engine.requests[waiting].slot == 0  # admitted in the same step
    rest = events[1:] + [e for e in engine.run()]
    assert [e.token_id for e in rest if e.token_id is not None] == reference(
        model, random_prompt(9, 2), SamplingParams(max_new_tokens=6))


def test_prefix_reuse_from_finished_and_running_requests(model):
    shared = random_prompt(60, 7)
    a, b = shared + [11, 12, 13, 14, 15], shared + [21, 22, 23, 24, 25, 26, 27]
    c = b[:63] + [31, 32]  # shares 63 tokens with b, 60 with a
    params = SamplingParams(max_new_tokens=8)
    shapes = []
    hook = model.register_forward_pre_hook(lambda _, args: shapes.append(tuple(args[0].shape)))
    engine = Engine(model, max_batch=2, token_budget=256)
    assert engine.generate([a], params)[0].token_ids == reference(model, a, params)
    shapes.clear()
    assert engine.generate([b], params)[0].token_ids == reference(model, b, params)
    assert shapes[0] == (1, 7)  # from the finished request's row: only b's own tokens are computed
    rid = engine.submit(b, params)
    engine.step()
    engine.step()  # b is decoding now
    shapes.clear()
    rid_c = engine.submit(c, params)
    out = {rid: [], rid_c: []}
    for event in engine.run():
        if event.token_id is not None:
            out[event.request_id].append(event.token_id)
    assert (1, 2) in shapes and (1, len(c)) not in shapes  # copied from the running request's row
    assert out[rid_c] == reference(model, c, params)
    hook.remove()


def test_slot_allocation_prefers_cached_prefix_then_least_recently_used(model):
    cache = SlotKVCache(model.cfg, n_slots=3, max_len=32)
    seq = lambda tokens: SimpleNamespace(tokens=tokens, n_computed=0, slot=-1)
    first, second = seq([1, 2, 3, 4, 5]), seq([1, 9, 9])
    cache.allocate(first)
    cache.allocate(second)
    first.n_computed, second.n_computed = 5, 3
    cache.k[:, first.slot, :, :5] = 7.0
    copy = seq([1, 2, 3, 8])  # first is busy: its 3-token prefix is copied into a free row
    cache.allocate(copy)
    assert copy.n_computed == 3 and copy.slot not in (first.slot, second.slot)
    assert (cache.k[:, copy.slot, :, :3] == 7.0).all()
    cache.release(second.slot)
    cache.release(first.slot)
    again = seq([1, 2, 3, 4, 5, 6])  # first's row is free now: taken over, nothing copied
    cache.allocate(again)
    assert (again.slot, again.n_computed) == (first.slot, 5)
    cache.release(again.slot)
    fresh = seq([4, 4])  # no shared prefix: the least recently released row
    cache.allocate(fresh)
    assert (fresh.slot, fresh.n_computed) == (second.slot, 0)
    assert cache.n_free == 1


def test_common_prefix():
    assert common_prefix([1, 2, 3, 4], [1, 2, 5], 10) == 2
    assert common_prefix([1, 2, 3], [1, 2, 3, 4], 10) == 3
    assert common_prefix([1, 2, 3], [1, 2, 3], 2) == 2
    assert common_prefix(list(range(1000)), list(range(777)) + [-1], 5000) == 777


def test_memory_budget_and_request_size_errors(model):
    cfg = model.cfg
    per_slot = cfg.kv_bytes_per_token(4) * cfg.max_seq_len
    assert Engine(model, kv_memory=3 * per_slot + 5).cache.n_slots == 3
    with pytest.raises(UserError, match=r"cannot hold one slot of 256 tokens"):
        Engine(model, kv_memory=per_slot - 1)
    engine = Engine(model, max_len=64)
    with pytest.raises(UserError, match=r"needs 80 tokens \(prompt 50 \+ max_new_tokens 30\).*holds 64"):
        engine.submit(random_prompt(50, 0), SamplingParams(max_new_tokens=30))
    with pytest.raises(UserError, match="context is 256"):
        Engine(model).submit([1] * 256, SamplingParams(max_new_tokens=1))
    with pytest.raises(UserError, match=r"\[0, 512\)"):
        engine.submit([1, 600], SamplingParams())
    with pytest.raises(UserError, match="tokenizer"):
        engine.submit([1, 5], SamplingParams(stop=("x",)))


def test_text_stream_matches_stream_text(model_and_tok):
    model, tok = model_and_tok
    ids = tok.encode("def add(a, b):", bos=True)
    full = collect(generate.stream_text(model, tok, ids, SamplingParams(max_new_tokens=30)))
    assert len(full) > 8
    engine = Engine(model, tok, max_batch=4)
    for params in [SamplingParams(max_new_tokens=30), SamplingParams(max_new_tokens=30, stop=(full[5:8],)),
                   SamplingParams(max_new_tokens=30, temperature=0.9, seed=4)]:
        expected = [vars(e) for e in generate.stream_text(model, tok, ids, params)]
        got = [vars(e) for e in engine.stream(ids, params)]
        assert [{k: v for k, v in e.items() if k != "request_id"} for e in got] == expected
        assert {e["request_id"] for e in got} == {got[0]["request_id"]}
    prompts = ["import os", "class A:", "def add(a, b):"]
    texts = [c.text for c in engine.generate(prompts, SamplingParams(max_new_tokens=20))]
    assert texts == [collect(generate.complete(model, tok, p, SamplingParams(max_new_tokens=20)))
                     for p in prompts]


class EotAfter(torch.nn.Module):
    """The real model, except that EOS never wins and from position `at` on the infilling end <EOT> does."""

    def __init__(self, model, tok, at: int):
        super().__init__()
        self.inner, self.cfg, self.tok, self.at = model, model.cfg, tok, at

    def forward(self, tokens, positions=None, cache=None, last_only=False):
        logits = self.inner(tokens, positions, cache, last_only)
        logits[..., self.tok.eos_id] = -1e4
        logits[..., self.tok.eot_id] += 1e4 * (positions[:, -logits.shape[1]:] >= self.at)
        return logits


def test_infill_ends_at_eot_with_the_middle_only(model_and_tok):
    model, tok = model_and_tok
    ids = formats.infill_prompt(tok, "def f(x):\n    ", "\n    return y\n")
    scripted = EotAfter(model, tok, at=len(ids) + 5)
    params = SamplingParams(max_new_tokens=40)
    events = list(Engine(scripted, tok, max_batch=2).stream(ids, params))
    assert events[-1].reason == "eot" and events[-1].token_id == tok.eot_id and len(events) == 7
    assert "".join(e.text for e in events) == collect(generate.stream_text(scripted, tok, ids, params))


def test_closing_a_stream_cancels_and_the_engine_is_reusable(model):
    engine = Engine(model, max_batch=1)
    stream = engine.stream(random_prompt(10, 3), SamplingParams(max_new_tokens=50))
    next(stream)
    stream.close()
    assert not engine.has_work and engine.cache.n_free == 1
    with pytest.raises(RuntimeError, match="idle"):
        engine.submit([1, 2], SamplingParams(max_new_tokens=2))
        engine.generate([[1, 2]], SamplingParams(max_new_tokens=2))


def test_cli_kv_memory_too_small_is_a_user_error(tiny_model_dir, capsys):
    from codellm.cli import main

    assert main(["complete", "def f(", "--model", str(tiny_model_dir), "--kv-memory", "64K"]) == 2
    assert "cannot hold one slot of" in capsys.readouterr().err
    assert main(["complete", "def f(", "--model", str(tiny_model_dir), "--kv-memory", "1M",
                 "--max-new-tokens", "5"]) == 0


def test_decode_step_equals_the_model_forward(model):
    """The pure decode function (what Engine(compile=True) compiles off the CPU), run eagerly: rows at different
    positions, over the slot storage, give the model's logits and store the same keys/values."""
    prompts = [random_prompt(n, 500 + n) for n in (9, 30, 17)]
    got, want, cache, after = decode_against_forward(model, DecodeStep, prompts)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close((cache.k, cache.v), after)


@pytest.mark.slow
def test_torch_compiled_decode_equals_eager_greedy(model):
    """The torch.compile'd decode step (what Engine(compile=True) runs off the CPU; on a CPU it runs the
    native step, tests/test_engine_native.py) gives the eager path's tokens; one compile (~20 s): every
    request decodes in the same steps, so only the several-rows graph is built."""
    prompts = [random_prompt(n, 400 + n) for n in (5, 30, 12, 61)]
    params = SamplingParams(max_new_tokens=20)
    eager = [c.token_ids for c in Engine(model, max_batch=4, token_budget=256).generate(prompts, params)]
    compiled = Engine(model, max_batch=4, token_budget=256)
    compiled.model_runner.decode_step = DecodeStep(model, compiled.cache, compile=True)
    assert [c.token_ids for c in compiled.generate(prompts, params)] == eager
    assert eager == [reference(model, p, params) for p in prompts]
    assert compiled.model_runner.decode_step.compile_seconds > 0 and compiled.cache.n_free == 4
