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
PROMPTS = [torch.randint(3, 512, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (9, 30, 17)]
ODD = dict(dim=40, n_heads=4, n_kv_heads=2, hidden_dim=52)  # dims off the AVX2 kernels' multiples
WIDE = dict(hidden_dim=192)  # every input width a multiple of 64, as 4-bit groups need
# (format, its options): every format and variant the native step has a kernel for
FORMATS = [("int8", {}), ("int8", {"group": 32}), ("int4", {"group": 32}), ("int4", {"group": 64, "symmetric": False}),
           ("nf4", {}), ("nf4", {"group": 32, "double_quant": True})]
FORMAT_IDS = ["int8-row", "int8-g32", "int4-g32", "int4-g64-min", "nf4-g64", "nf4-g32-dq"]


def test_int8_linear_is_symmetric_per_row_or_group():
    linear = nn.Linear(64, 24, bias=False)
    with torch.no_grad():
        linear.weight[3] = 0  # an all-zero row stays exact
    for group, n_groups in ((None, 1), (32, 2)):
        q = weights.Int8Linear.from_linear(linear, group=group)
        assert q.weight.dtype == torch.int8 and q.weight.abs().max() == 127 and q.scales.shape == (24, n_groups)
        err = (q.dequantized() - linear.weight).abs().reshape(24, n_groups, -1)
        assert (err <= q.scales[..., None] / 2 + 1e-7).all()  # round to nearest: at most half a step
        assert torch.equal(q.dequantized()[3], torch.zeros(64))
        x = torch.randn(5, 64)
        torch.testing.assert_close(q(x), F.linear(x, q.dequantized()), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("fmt", "options"), FORMATS, ids=FORMAT_IDS)
def test_a_quantized_checkpoint_loads_into_swapped_modules(fmt, options):
    """gpt-fast's order: swap the modules of a fresh model, then load_state_dict of the quantized one."""
    quantized = weights.quantize(tiny_model(512, **WIDE), fmt, **options)
    state = quantized.state_dict()
    assert state["layers.0.self_attn.q_proj.weight"].dtype in (torch.int8, torch.uint8)
    assert state["lm_head.weight"].dtype == torch.float32  # the head stays dense by default
    fresh = Transformer(quantized.cfg)
    cls = weights.get_format(fmt)
    weights.swap_linears(fresh, lambda name, lin: None if name == "lm_head"
                         else cls.empty(lin.in_features, lin.out_features, **options))
    fresh.load_state_dict(state, strict=True)
    tokens = torch.randint(0, 512, (2, 12))
    assert torch.equal(fresh.eval()(tokens), quantized(tokens))


# relative error of the logits (norm) at a trained-like scale; measured: int8 ~0.8%, int4 ~10%, nf4 ~8%
@pytest.mark.parametrize(("fmt", "options", "limit"), [("int8", {}, 0.02), ("int8", {"group": 32}, 0.02),
                                                       ("int4", {"group": 32}, 0.2), ("nf4", {}, 0.2)])
def test_quantized_logits_stay_close_to_the_dense_model(fmt, options, limit):
    """With init std 0.02 the error is the rounding alone; a wrong scale or layout would be far off."""
    cfg = tiny_model(512, **WIDE).cfg
    dense = Transformer(cfg).init_weights(seed=0).eval()
    quantized = weights.quantize(Transformer(cfg).init_weights(seed=0).eval(), fmt, skip=(), **options)
    assert weights.format_of(quantized.lm_head) == fmt
    tokens = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got = dense(tokens), quantized(tokens)
    assert (got - want).norm() <= limit * want.norm()


def test_int4_rules_match_ggufs():
    """Symmetric: the group's signed peak maps to code 0 (-8 steps) exactly (Q4_0); min form: the group's
    minimum and maximum are codes 0 and 15 (Q4_1). Every value within half a step, except that the
    symmetric rule clamps values of the other sign beyond 7 steps to 7 (within one step)."""
    linear = nn.Linear(64, 4, bias=False)
    sym = weights.Int4Linear.from_linear(linear, group=32)
    groups = linear.weight.detach().reshape(4, 2, 32)
    peak = groups.gather(-1, groups.abs().argmax(-1, keepdim=True))[..., 0]
    torch.testing.assert_close(sym.scales, -peak / 8)
    err, step = (sym.dequantized().reshape(4, 2, 32) - groups).abs(), sym.scales.abs()[..., None]
    clamped = groups * torch.sign(peak)[..., None] < -7 * step  # the other sign, beyond code 15
    assert (err[~clamped] <= step.expand_as(err)[~clamped] / 2 + 1e-6).all() and (err <= step + 1e-6).all()
    codes = weights.unpack4(sym.weight)
    assert torch.equal(weights.pack4(codes), sym.weight) and codes.max() <= 15
    asym = weights.Int4Linear.from_linear(linear, group=32, symmetric=False)
    torch.testing.assert_close(asym.mins, groups.amin(-1))
    assert ((asym.dequantized().reshape(4, 2, 32) - groups).abs() <= asym.scales[..., None] / 2 + 1e-6).all()


def test_nf4_picks_the_nearest_code():
    linear = nn.Linear(64, 4, bias=False)
    q = weights.NF4Linear.from_linear(linear, group=64)
    normalised = linear.weight.detach() / linear.weight.detach().abs().amax(-1, keepdim=True)
    table = torch.tensor(weights.NF4_VALUES)
    want = (normalised[..., None] - table).abs().argmin(-1)
    assert torch.equal(weights.unpack4(q.weight).long(), want)
    dq = weights.NF4Linear.from_linear(linear, group=32, double_quant=True)
    assert dq.absmax_codes.dtype == torch.uint8 and "scales" not in dict(dq.named_buffers())
    torch.testing.assert_close(dq.absmax(), linear.weight.detach().reshape(4, 2, 32).abs().amax(-1), atol=2e-3, rtol=0)


@pytest.mark.parametrize(("fmt", "options"), [("dense", {})] + FORMATS, ids=["dense"] + FORMAT_IDS)
def test_fused_projections_keep_names_and_outputs(fmt, options):
    model = tiny_model(512, **WIDE)
    if fmt != "dense":
        weights.quantize(model, fmt, **options)
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
    with pytest.raises(UserError, match="'int3' is not supported; choose one of: int8, int4, nf4"):
        weights.get_format("int3")
    with pytest.raises(UserError, match="in_features 40 is not a multiple of the group size 32"):
        weights.Int4Linear.from_linear(nn.Linear(40, 8), group=32)


@needs_cxx
@pytest.mark.parametrize(("fmt", "options"), FORMATS, ids=FORMAT_IDS)
@pytest.mark.parametrize("skip", [("lm_head",), ()], ids=["dense-head", "quantized-head"])
def test_native_step_reads_quantized_matrices(fmt, options, skip):
    """The native step on quantized matrices equals the model's own (eager) forward of the same weights."""
    model = weights.quantize(tiny_model(512, **WIDE), fmt, skip=skip, **options).fuse_projections()
    got, want, cache, after = decode_against_forward(model, NativeDecodeStep, PROMPTS)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close((cache.k, cache.v), after, atol=1e-5, rtol=1e-5)


@needs_cxx
def test_native_step_scalar_int8():
    """Widths off the vector kernels' multiples take the scalar loops."""
    model = weights.quantize(tiny_model(512, **ODD), "int8", skip=()).fuse_projections()
    got, want, _, _ = decode_against_forward(model, NativeDecodeStep, PROMPTS)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


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
