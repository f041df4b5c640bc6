"""The CUDA paths, on a GPU: training through the real loop (bf16 autocast, fused AdamW, checkpoint and
resume), the engine and its decode step against the reference generator and the forward, `codellm serve
--device cuda` over HTTP, and DDP and FSDP over nccl. Skipped where there is no CUDA device; runs/gpu_bench.sh
runs them as `pytest -m gpu tests/test_gpu.py` (well under a minute on an H200: tiny model, few steps).

DDP and FSDP need one GPU per rank (nccl refuses two ranks on one device), so on one GPU they run at world
size 1: a real nccl process group of one rank and the real wrappers, through `train()`; only
`distributed.wrap`'s "more than one rank" guard is stepped around, and `distributed.setup` joins the
one-rank group that torchrun would have set up.
"""

import dataclasses
import json
import math

import pytest
import torch
import torch.distributed as dist

from codellm.checkpoint import load_model
from codellm.engine import Engine, SlotKVCache
from codellm.engine.decode import DecodeStep
from codellm.generate import generate_tokens
from codellm.sampling import SamplingParams
from codellm.train import distributed
from codellm.train.config import TrainConfig
from codellm.train.loop import train
from tests.conftest import tiny_model
from tests.server_fixtures import start_server
from tests.tokenizer_fixtures import make_sentencepiece_dir
from tests.train_fixtures import make_corpus

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
CUDA = torch.device("cuda", 0)
VOCAB = 512


def random_prompt(n: int, seed: int) -> list[int]:
    return [1] + torch.randint(3, VOCAB, (n - 1,), generator=torch.Generator().manual_seed(seed)).tolist()


# --- training ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpu_train_data")
    return {"tok": make_sentencepiece_dir(root / "tok"), "corpus": make_corpus(root / "corpus")}


def train_config(data, out, **overrides) -> TrainConfig:
    """The tiny model on CUDA in bf16: 2 rows of 64 tokens a micro-batch, 2 micro-batches a step."""
    settings = dict(out=str(out), tokenizer=str(data["tok"]), model_preset="tiny", corpus=str(data["corpus"]),
                    seq_len=64, micro_batch_size=2, batch_tokens=256, warmup_steps=2, log_every=1, eval_every=0,
                    save_every=2, steps=4, device="cuda", precision="bf16")
    return TrainConfig.for_stage("pretrain", **{**settings, **overrides})


def losses(run_dir) -> list[tuple[int, float]]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in records if "loss" in r]


@pytest.fixture(scope="module")
def plain_run(data, tmp_path_factory):
    """4 steps on one GPU without a process group (a checkpoint at step 2); -> (run dir, losses)."""
    out = tmp_path_factory.mktemp("gpu_runs") / "plain"
    train(train_config(data, out))
    return out, losses(out)


def assert_losses_close(got, want, rel=2e-2):
    """Same steps, losses equal up to bf16 and atomics-order noise (flash attention's backward is not bitwise
    deterministic, so a resumed or wrapped run need not be bit-equal)."""
    assert [s for s, _ in got] == [s for s, _ in want]
    for (step, a), (_, b) in zip(got, want, strict=True):
        assert a == pytest.approx(b, rel=rel), f"step {step}: {a} vs {b}"


def test_training_in_bf16_on_cuda_resumes(data, plain_run, capsys):
    out, first = plain_run
    assert [s for s, _ in first] == [1, 2, 3, 4] and all(math.isfinite(loss) for _, loss in first)
    assert first[-1][1] < first[0][1]  # it learns
    saved = TrainConfig.from_dict(json.loads((out / "config.json").read_text()))  # as `codellm train --resume`
    train(saved, resume=True)
    header = capsys.readouterr().out.splitlines()[0]
    assert "| bf16 |" in header and "resumed at step 2" in header
    assert_losses_close(losses(out), first)
    model = load_model(out / "final", device="cuda", dtype="bfloat16")
    with torch.inference_mode():
        assert torch.isfinite(model(torch.tensor([random_prompt(12, 0)], device=CUDA))).all()


@pytest.fixture
def one_rank_nccl(tmp_path, monkeypatch):
    """`distributed.setup` joins a real nccl process group of one rank (what torchrun sets up for each rank),
    and `distributed.wrap` wraps at that size (it wraps from 2 ranks up)."""
    real_wrap = distributed.wrap

    def setup(device):
        torch.cuda.set_device(CUDA)
        dist.init_process_group("nccl", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
        return distributed.Dist(0, 1, CUDA)

    monkeypatch.setattr(distributed, "setup", setup)
    monkeypatch.setattr(distributed, "wrap", lambda model, d, fsdp: real_wrap(model, dataclasses.replace(d, world=2),
                                                                              fsdp))
    yield
    if dist.is_initialized():  # train() tears the group down; this is for a test that failed before
        dist.destroy_process_group()


@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp"])
def test_ddp_and_fsdp_over_nccl_train_like_one_gpu(data, plain_run, one_rank_nccl, tmp_path, fsdp):
    """3 steps wrapped (a checkpoint at step 2: full state gathered; an evaluation at step 3): the same losses
    as the unwrapped run, so the wrappers, the gradient-sync skipping and the loss scaling change nothing."""
    out = tmp_path / "run"
    final = train(train_config(data, out, steps=3, eval_every=3, eval_batches=1, fsdp=fsdp))
    assert not dist.is_initialized()
    assert_losses_close(losses(out), plain_run[1][:3])
    assert (out / "checkpoints" / "step_000002").is_dir()
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(r.get("loss", r.get("val_loss"))) for r in records)
    assert any("val_loss" in r for r in records)
    assert load_model(final).cfg.n_layers == 2


# --- inference -----------------------------------------------------------------------------------------

@pytest.fixture
def full_fp32_matmuls():
    """fp32 means fp32 here, whatever ran before set (TF32 matmuls would be ~1e-3 off)."""
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = before


def assert_greedy_equal(model, prompt: list[int], got: list[int], want: list[int], tie: float) -> None:
    """Equal tokens, or a first difference where the two tokens' logits (reference path) lie within `tie` of
    the row's largest |logit|: a near-tie that the rounding of a differently batched matmul may flip."""
    if got == want:
        return
    i = next((i for i, (a, b) in enumerate(zip(got, want, strict=False)) if a != b), min(len(got), len(want)))
    assert i < min(len(got), len(want)), f"lengths differ with equal tokens: {got} vs {want}"
    with torch.inference_mode():
        logits = model(torch.tensor([prompt + want[:i]], device=CUDA))[0, -1].float()
    gap = float(logits[want[i]] - logits[got[i]])
    assert gap <= tie * float(logits.abs().max()), f"token {i}: {got[i]} vs {want[i]}, logit gap {gap:.4f}"


@pytest.mark.usefixtures("full_fp32_matmuls")
@pytest.mark.parametrize("dtype, tie", [(torch.float32, 1e-4), (torch.bfloat16, 5e-2)], ids=["fp32", "bf16"])
def test_engine_on_cuda_matches_the_reference_generator(dtype, tie):
    """Greedy tokens of 3 requests batched with chunked prefill (a 16-token budget) equal each prompt run
    alone through codellm.generate on the same device."""
    model = tiny_model(VOCAB).to(CUDA, dtype)
    prompts = [random_prompt(n, 300 + n) for n in (5, 40, 17)]
    params = SamplingParams(max_new_tokens=24)
    engine = Engine(model, max_batch=4, token_budget=16)
    got = [c.token_ids for c in engine.generate(prompts, params)]
    assert engine.cache.store_k.device.type == "cuda" and engine.cache.store_k.dtype == dtype
    for prompt, tokens in zip(prompts, got, strict=True):
        want = list(generate_tokens(model, prompt, params, {model.cfg.eos_id}))
        assert_greedy_equal(model, prompt, tokens, want, tie)


@pytest.mark.usefixtures("full_fp32_matmuls")
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-4), (torch.bfloat16, 5e-2)], ids=["fp32", "bf16"])
def test_decode_step_on_cuda_equals_the_model_forward(dtype, tol):
    """decode.decode_step (what Engine(compile=True) compiles on a GPU), eager: rows at different positions
    over the slot storage give the forward's logits and store its keys/values, within `tol` of the largest
    magnitude (bf16: up to 3% seen on a CPU, a wrong position or mask is off by the whole scale)."""
    model = tiny_model(VOCAB).to(CUDA, dtype).fuse_projections()
    cache = SlotKVCache(model.cfg, n_slots=4, max_len=64, dtype=dtype, device=CUDA)
    prompts = [random_prompt(n, 500 + n) for n in (9, 30, 17)]
    tokens, positions = [5, 6, 7], [len(p) for p in prompts]
    with torch.inference_mode():
        for row, p in enumerate(prompts):
            model(torch.tensor([p], device=CUDA), torch.arange(len(p), device=CUDA)[None], cache.view(row, row + 1))
        before = cache.k.clone(), cache.v.clone()
        want = model(torch.tensor(tokens, device=CUDA)[:, None], torch.tensor(positions, device=CUDA)[:, None],
                     cache.view(0, 3))[:, 0].float()
        after = cache.k.clone(), cache.v.clone()
        cache.k[:], cache.v[:] = before
        got = DecodeStep(model, cache)(tokens, positions).float()
    torch.testing.assert_close(got, want, atol=tol * float(want.abs().max()), rtol=0)
    for stored, expected in zip((cache.k, cache.v), after, strict=True):
        expected = expected.float()
        torch.testing.assert_close(stored.float(), expected, atol=tol * float(expected.abs().max()), rtol=0)


def test_serve_on_cuda_completes_over_http(tiny_model_dir):
    """`codellm serve --device cuda` (bf16, the default there) answers an OpenAI completion and reports its device."""
    for name in ("starlette", "uvicorn", "pydantic"):
        pytest.importorskip(name)
    import httpx

    with start_server(tiny_model_dir, "--device", "cuda", timeout=90) as srv:
        r = httpx.post(srv.url + "/v1/completions", timeout=60,
                       json={"prompt": "def add(a, b):", "max_tokens": 8, "temperature": 0})
        assert r.status_code == 200, r.text
        body = r.json()
        assert 1 <= body["usage"]["completion_tokens"] <= 8 and isinstance(body["choices"][0]["text"], str)
        info = httpx.get(srv.url + "/info", timeout=10).json()
        assert info["model_device_type"] == "cuda" and info["model_dtype"] == "bfloat16"
        assert srv.stop() == 0, srv.stderr()
