"""The native decode step (engine/native.py, built with the machine's g++) against the model's forward:
logits and stored keys/values, fp32 and bf16, vector and scalar code paths, 1 and 2 threads; the
library's cache and build errors."""

import os

import pytest
import torch

from codellm.engine import Engine, SlotKVCache, native
from codellm.engine.native import NativeDecodeStep
from codellm.errors import UserError
from codellm.sampling import SamplingParams
from tests.conftest import decode_against_forward, needs_cxx, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")
# dims that are multiples of 8 and 32 take the AVX2 kernels; these odd ones the scalar loops
ODD = dict(dim=40, n_heads=4, n_kv_heads=2, hidden_dim=52)


def filled_cache(model, prompts, dtype=torch.float32):
    cache = SlotKVCache(model.cfg, n_slots=4, max_len=64, dtype=dtype)
    with torch.inference_mode():
        for row, p in enumerate(prompts):
            model(torch.tensor([p]), torch.arange(len(p))[None], cache.view(row, row + 1))
    return cache


def prompts_for(vocab: int):
    return [torch.randint(3, vocab, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (9, 30, 17)]


@needs_cxx
@pytest.mark.parametrize("overrides", [{}, ODD], ids=["vector", "scalar"])
def test_native_step_equals_the_model_forward(overrides):
    """Rows at different positions: the model's logits, and the same keys/values stored."""
    model = tiny_model(512, **overrides).fuse_projections()
    got, want, cache, after = decode_against_forward(model, NativeDecodeStep, prompts_for(512))
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close((cache.k, cache.v), after, atol=1e-5, rtol=1e-5)


@needs_cxx
def test_native_step_bf16_weights():
    """bf16 weights and cache, fp32 activations: close to the fp32 forward of the same (rounded) weights."""
    model = tiny_model(512).to(torch.bfloat16).fuse_projections()
    reference = tiny_model(512).to(torch.bfloat16).float().fuse_projections()
    prompts = prompts_for(512)
    ref_cache = filled_cache(reference, prompts)
    cache = SlotKVCache(model.cfg, n_slots=4, max_len=64, dtype=torch.bfloat16)
    cache.store_k.copy_(ref_cache.store_k)
    cache.store_v.copy_(ref_cache.store_v)
    ref_cache.store_k.copy_(cache.store_k)  # the same (rounded) past keys/values on both sides
    ref_cache.store_v.copy_(cache.store_v)
    tokens, positions = [5, 6, 7], [len(p) for p in prompts]
    with torch.inference_mode():
        want = reference(torch.tensor(tokens)[:, None], torch.tensor(positions)[:, None], ref_cache.view(0, 3))[:, 0]
        got = NativeDecodeStep(model, cache)(tokens, positions)
    assert got.dtype == torch.float32
    # what is left is the bf16 rounding of the new keys/values: within 1% of the logits' range
    assert (got - want).abs().max() <= 0.01 * want.abs().max()
    assert (got.argmax(-1) == want.argmax(-1)).all()


@needs_cxx
def test_threads_do_not_change_the_result():
    """Each output is one thread's sum in a fixed order: 1 and 2 threads give the same bits."""
    model = tiny_model(512).fuse_projections()
    prompts = prompts_for(512)
    filled, results = filled_cache(model, prompts), []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        cache = SlotKVCache(model.cfg, n_slots=4, max_len=64)
        cache.store_k.copy_(filled.store_k)
        cache.store_v.copy_(filled.store_v)
        with torch.inference_mode():
            results.append(NativeDecodeStep(model, cache)([5, 6, 7], [len(p) for p in prompts]))
    assert torch.equal(*results)


@needs_cxx
def test_compiled_engine_equals_eager_greedy():
    """Engine(compile=True) decodes natively on a CPU: the eager engine's and the reference's tokens,
    requests at mixed lengths, slots all free afterwards."""
    model = tiny_model(512)
    prompts = [[1] + torch.randint(3, 512, (n,), generator=torch.Generator().manual_seed(400 + n)).tolist()
               for n in (4, 29, 11, 60)]
    params = SamplingParams(max_new_tokens=20)
    eager = [c.token_ids for c in Engine(model, max_batch=4, token_budget=256).generate(prompts, params)]
    compiled = Engine(model, max_batch=4, token_budget=256, compile=True)
    assert isinstance(compiled.model_runner.decode_step, NativeDecodeStep)
    assert [c.token_ids for c in compiled.generate(prompts, params)] == eager
    assert compiled.cache.n_free == 4


@needs_cxx
def test_library_is_built_once_into_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    first = native.build_library()
    assert first.parent == tmp_path / "codellm" and first.suffix == ".so"
    stamp = first.stat().st_mtime_ns
    assert native.build_library() == first and first.stat().st_mtime_ns == stamp  # found, not rebuilt
    assert os.listdir(first.parent) == [first.name]  # no temporary file left behind


def test_a_failing_build_is_a_clear_error_and_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setenv("CXX", "false")  # on PATH, exits 1
    with pytest.raises(UserError, match="building the native decode step with false failed"):
        native.build_library()
    assert os.listdir(tmp_path / "codellm") == []


@needs_cxx
def test_out_of_range_rows_never_reach_native_code():
    model = tiny_model(512)
    step = NativeDecodeStep(model, SlotKVCache(model.cfg, n_slots=2, max_len=16))
    for tokens, positions in [([1], [16]), ([1], [-1]), ([512], [0]), ([1, 2, 3], [0, 0, 0]), ([1], [0, 1])]:
        with pytest.raises(ValueError):
            step(tokens, positions)


@needs_cxx
def test_an_unwritable_or_shared_cache_falls_back_to_a_private_temp_dir(tmp_path, monkeypatch):
    shared = tmp_path / "cache" / "codellm"
    shared.mkdir(parents=True)
    shared.chmod(0o777)  # others could plant a library here: never load from it
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(native.tempfile, "tempdir", None)  # re-read TMPDIR
    built = native.build_library()
    assert built.parent == tmp_path / "tmp" / f"codellm-{os.getuid()}" and os.listdir(shared) == []
    assert built.parent.stat().st_mode & 0o777 == 0o700


@needs_cxx
def test_native_prefill_chunks_equal_the_model_forward():
    """Rows of one slot at consecutive positions are a causal chunk: two chunks give the whole prompt's
    last logits and the keys/values the model's own prefill stores."""
    model = tiny_model(512).fuse_projections()
    prompt = prompts_for(512)[1]  # 30 tokens
    want_cache = filled_cache(model, [[1], prompt])  # the prompt in slot 1
    with torch.inference_mode():
        want = model(torch.tensor([prompt]), torch.arange(30)[None])[:, -1]
        cache = SlotKVCache(model.cfg, n_slots=4, max_len=64)
        step = NativeDecodeStep(model, cache)
        first = step(prompt[:12], range(12), [1] * 12, logits_for=[11])
        got = step(prompt[12:], range(12, 30), [1] * 18, logits_for=[17])
    assert first.shape == got.shape == (1, 512)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close((cache.k[:, 1, :, :, :30], cache.v[:, 1, :, :, :30]),
                               (want_cache.k[:, 1, :, :, :30], want_cache.v[:, 1, :, :, :30]), atol=1e-4, rtol=1e-4)


@needs_cxx
def test_bf16_engine_prefills_natively_and_chunking_does_not_matter():
    model = tiny_model(512).to(torch.bfloat16)
    prompts = [[1] + torch.randint(3, 512, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (40, 7)]
    params = SamplingParams(max_new_tokens=10)
    runs = []
    for budget in (8, 256):  # 8: prompts prefilled in chunks of at most 8 tokens, next to decoding rows
        engine = Engine(model, max_batch=2, token_budget=budget, compile=True)
        if not native._has_bf16_units():
            assert engine.model_runner.decode_step.prefills
        runs.append([c.token_ids for c in engine.generate(prompts, params)])
    assert runs[0] == runs[1]
