"""The weights seam (codellm/weights.py): formats swapped in before a checkpoint loads, the fused layout
for every format, and the native step reading each matrix through the same description."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from codellm import weights
from codellm.engine import Engine
from codellm.engine.decode import DecodeStep
from codellm.engine.native import NativeDecodeStep
from codellm.errors import UserError
from codellm.generate import generate_tokens
from codellm.model import Transformer
from codellm.sampling import SamplingParams
from tests.conftest import decode_against_forward, needs_cxx, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")
ODD = dict(dim=40, n_heads=4, n_kv_heads=2, hidden_dim=52)  # dims off the AVX2 kernels' multiples


def test_int8_linear_is_per_row_symmetric():
    linear = nn.Linear(64, 24, bias=False)
    with torch.no_grad():
        linear.weight[3] = 0  # an all-zero row stays exact
    q = weights.Int8Linear.from_linear(linear)
    assert q.weight.dtype == torch.int8 and q.weight.abs().max() == 127 and q.scales.shape == (24,)
    err = (q.dequantized() - linear.weight).abs()
    assert (err <= q.scales[:, None] / 2 + 1e-7).all()  # round to nearest: at most half a step
    assert torch.equal(q.dequantized()[3], torch.zeros(64))
    x = torch.randn(5, 64)
    torch.testing.assert_close(q(x), F.linear(x, q.dequantized()), atol=1e-5, rtol=1e-5)


def test_a_quantized_checkpoint_loads_into_swapped_modules():
    """gpt-fast's order: swap the modules of a fresh model, then load_state_dict of the quantized one."""
    quantized = weights.quantize(tiny_model(512), "int8")
    state = quantized.state_dict()
    assert state["layers.0.self_attn.q_proj.weight"].dtype == torch.int8
    assert "layers.0.self_attn.q_proj.scales" in state
    assert state["lm_head.weight"].dtype == torch.float32  # the head stays dense by default
    fresh = Transformer(quantized.cfg)
    weights.swap_linears(fresh, lambda name, lin: None if name == "lm_head"
                         else weights.Int8Linear.empty(lin.in_features, lin.out_features))
    fresh.load_state_dict(state, strict=True)
    tokens = torch.randint(0, 512, (2, 12))
    assert torch.equal(fresh.eval()(tokens), quantized(tokens))


def test_int8_stays_close_to_the_dense_model():
    """At a trained-like scale (init std 0.02) int8 logits stay within 2% of the dense ones (measured
    ~0.8%); the error is the rounding, so a wrong scale or layout would be far off."""
    cfg = tiny_model(512).cfg
    dense = Transformer(cfg).init_weights(seed=0).eval()
    quantized = weights.quantize(Transformer(cfg).init_weights(seed=0).eval(), "int8", skip=())
    assert weights.format_of(quantized.lm_head) == "int8"
    tokens = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got = dense(tokens), quantized(tokens)
    assert (got - want).norm() <= 0.02 * want.norm()


@pytest.mark.parametrize("fmt", ["dense", "int8"])
def test_fused_projections_keep_names_and_outputs(fmt):
    model = tiny_model(512) if fmt == "dense" else weights.quantize(tiny_model(512), fmt)
    tokens = torch.randint(0, 512, (2, 10))
    with torch.no_grad():
        want = model(tokens)
        keys = list(model.state_dict())
        model.fuse_projections()
        got = model(tokens)
    assert list(model.state_dict()) == keys  # the fused modules are not submodules
    attn = model.layers[0].self_attn
    assert weights.format_of(attn.qkv) == fmt and attn.q_proj.weight.data_ptr() == attn.qkv.weight.data_ptr()
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_fusing_different_formats_is_refused():
    q = weights.Int8Linear.from_linear(nn.Linear(8, 8, bias=False))
    with pytest.raises(UserError, match="different weight formats"):
        weights.fuse(q, nn.Linear(8, 8, bias=False))
    with pytest.raises(UserError, match="'int3' is not supported; choose one of: int8"):
        weights.get_format("int3")


@needs_cxx
@pytest.mark.parametrize("overrides", [{}, ODD], ids=["vector", "scalar"])
@pytest.mark.parametrize("skip", [("lm_head",), ()], ids=["dense-head", "int8-head"])
def test_native_step_reads_int8_matrices(overrides, skip):
    """The native step on int8 matrices equals the model's own (eager) forward of the same weights."""
    model = weights.quantize(tiny_model(512, **overrides), "int8", skip=skip).fuse_projections()
    prompts = [torch.randint(3, 512, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (9, 30, 17)]
    got, want, cache, after = decode_against_forward(model, NativeDecodeStep, prompts)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close((cache.k, cache.v), after, atol=1e-5, rtol=1e-5)


def test_the_pure_decode_step_runs_any_format():
    """decode.decode_step (the GPU path, here eager) goes through the same fused modules."""
    model = weights.quantize(tiny_model(512), "int8", skip=()).fuse_projections()
    prompts = [[5, 6, 7, 8], list(range(20, 40))]
    got, want, _, _ = decode_against_forward(model, DecodeStep, prompts)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


@needs_cxx
def test_engine_on_an_int8_model_matches_the_reference_generator():
    """End to end: the engine's native path (prefill included) gives the oracle's greedy tokens."""
    model = weights.quantize(tiny_model(512), "int8")
    prompt, params = list(range(3, 40)), SamplingParams(max_new_tokens=12, temperature=0.0)
    want = list(generate_tokens(model, prompt, params, stop_ids={model.cfg.eos_id}))
    engine = Engine(model, max_batch=2, compile=True)
    assert engine.model_runner.path == "native" and engine.model_runner.decode_step.prefills
    assert engine.generate([prompt], params)[0].token_ids == want
