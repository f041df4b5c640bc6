"""Engine speed on CPU: batch-1 decode against transformers and llama.cpp, aggregate decode at many
concurrent streams, and prefill as a fraction of the measured matmul peak. Same weights, same threads.

    .venv/bin/python bench/engine.py [--threads 2] [--models bench50m,default] [--dtypes float32,bfloat16]
        [--prompt-tokens 64] [--new-tokens 128] [--streams 1,4,16,64] [--prefill-tokens 2048]

Prints markdown tables; the numbers go into the README. Models: `bench50m` is bench/decode.py's ~50M
Llama (Code Llama vocabulary, random weights); `default` is models/default when it exists, else the
`default` preset with random weights (the table says which). EOS is ignored: every request runs to its
token count. codellm decode runs eager and, unless --no-compile, with `Engine(compile=True)`: on a CPU
the native decode step (engine/native.py; the table gives the seconds its first calls took, a build
included when the library was not cached, and the ratios and the streams table use it). Decode tok/s
excludes the prompt: codellm and llama.cpp time the decode steps, transformers (t(N new tokens) - t(1)) /
(N - 1). The bandwidth floor is copy bandwidth /
bytes read per token.

llama.cpp is measured when `llama_cpp` (llama-cpp-python) imports and its converter script is found
(--convert-script or $LLAMA_CPP_CONVERT); otherwise the table says it was skipped and why. The GGUF
file is converted from our HF checkpoint by llama.cpp's own `convert_hf_to_gguf.py`, with a small
SentencePiece tokenizer put beside the weights (the converter pads the vocabulary to the config's size;
decode speed does not depend on the vocabulary's pieces). Recipe, on a machine where a compile is fine:

    CMAKE_ARGS="-DGGML_NATIVE=ON" .venv/bin/pip install --no-binary llama-cpp-python llama-cpp-python
    .venv/bin/pip download --no-binary :all: --no-deps llama-cpp-python -d /tmp/lcp
    tar xf /tmp/lcp/llama_cpp_python-*.tar.gz -C /tmp/lcp   # the sdist vendors llama.cpp and gguf-py
    export LLAMA_CPP_CONVERT=$(ls /tmp/lcp/llama_cpp_python-*/vendor/llama.cpp/convert_hf_to_gguf.py)
    .venv/bin/python bench/engine.py
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from decode import BENCH_CONFIG, copy_bandwidth, decode_bytes

from codellm.checkpoint import load_model, save_model
from codellm.config import ModelConfig
from codellm.engine import Engine
from codellm.model import Transformer
from codellm.sampling import SamplingParams

REPO = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = REPO / "models" / "default"


def random_prompt(n: int, vocab: int, seed: int) -> list[int]:
    return torch.randint(3, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def prepare_models(names: list[str], tmp: Path, context: int) -> dict[str, tuple[Path, str]]:
    """name -> (HF checkpoint directory, description)."""
    out = {}
    for name in names:
        if name == "default" and DEFAULT_MODEL.is_dir():
            out[name] = (DEFAULT_MODEL, "models/default (shipped weights)")
            continue
        if name == "bench50m":
            cfg = ModelConfig(**{**BENCH_CONFIG, "max_seq_len": context})
        else:
            cfg = ModelConfig.from_preset(name)
        what = "random weights" + (", models/default not found" if name == "default" else "")
        out[name] = (save_model(Transformer(cfg).init_weights(), tmp / name, dtype="float32"), f"{name} ({what})")
    return out


def load_ignoring_eos(path: Path, dtype: str) -> Transformer:
    model = load_model(path, dtype=dtype)
    model.cfg = model.cfg.replace(eos_id=-1)  # no id is -1: requests run to max_new_tokens
    return model


# --- codellm -----------------------------------------------------------------------------------------

def engine_decode(model: Transformer, streams: int, prompt_tokens: int, new_tokens: int,
                  compile: bool = False) -> tuple[float, float]:
    """Aggregate decode tok/s of `streams` concurrent requests, timed over steps with no prompt work;
    and the seconds the warm-up's first decode calls took (compiling, with `compile`)."""
    engine = Engine(model, max_batch=streams, max_len=prompt_tokens + new_tokens,
                    token_budget=max(512, streams), compile=compile)
    params = SamplingParams(max_new_tokens=new_tokens)
    warm = [random_prompt(8, model.cfg.vocab_size, i) for i in range(min(streams, 2))]
    engine.generate(warm, SamplingParams(max_new_tokens=4))  # warm-up: one row and (streams > 1) several
    engine.generate(warm[:1], SamplingParams(max_new_tokens=4))
    compile_s = engine.model_runner.decode_step.compile_seconds if compile else 0.0
    for i in range(streams):
        engine.submit(random_prompt(prompt_tokens, model.cfg.vocab_size, i), params)
    tokens, seconds = 0, 0.0
    while engine.has_work:
        decode_only = not (engine.scheduler.waiting or engine.scheduler.prefilling)
        t0 = time.perf_counter()
        events = engine.step()
        if decode_only:
            seconds += time.perf_counter() - t0
            tokens += sum(e.token_id is not None for e in events)
    return tokens / seconds, compile_s


def engine_prefill(model: Transformer, n_tokens: int, chunk: int, compile: bool = False) -> float:
    """Prompt tok/s of one request (with `compile`, bf16 prompts on CPUs without bf16 units go native)."""
    engine = Engine(model, max_batch=1, max_len=n_tokens + 1, token_budget=chunk, compile=compile)
    engine.generate([random_prompt(64, model.cfg.vocab_size, 1)], SamplingParams(max_new_tokens=1))  # warm-up
    prompt = random_prompt(n_tokens, model.cfg.vocab_size, 2)
    t0 = time.perf_counter()
    engine.generate([prompt], SamplingParams(max_new_tokens=1))
    return n_tokens / (time.perf_counter() - t0)


def prefill_flops(model: Transformer, n_tokens: int) -> float:
    """Useful FLOPs of one prompt: the layers' matmuls, causal attention, the head for the last token."""
    cfg = model.cfg
    layer_weights = sum(p.numel() for n, p in model.layers.named_parameters() if p.dim() == 2)
    attention = 2 * 2 * cfg.n_layers * cfg.dim * n_tokens * (n_tokens + 1) / 2  # QK^T and PV
    return 2 * layer_weights * n_tokens + attention + 2 * cfg.dim * cfg.vocab_size


def matmul_peak(dtype: torch.dtype, n: int = 2048, repeats: int = 3) -> float:
    """FLOP/s of the op the model's layers run, F.linear (x @ W^T), at n x n x n. (torch.mm in bf16 takes a
    naive path on CPUs without BF16 units, ~0.3 GFLOP/s here; F.linear goes through oneDNN.)"""
    x, w = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        F.linear(x, w)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


# --- peers -------------------------------------------------------------------------------------------

def hf_decode(path: Path, dtype: str, prompt_tokens: int, new_tokens: int) -> float:
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).eval()
    ids = torch.tensor([random_prompt(prompt_tokens, model.config.vocab_size, 0)])

    def timed(n):
        t0 = time.perf_counter()
        model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0, eos_token_id=None)
        return time.perf_counter() - t0

    with torch.inference_mode():
        timed(4)  # warm-up
        return (new_tokens - 1) / (timed(new_tokens) - timed(1))


def llama_cpp_skip_reason(convert_script: str | None) -> str | None:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return "llama_cpp not importable (see the recipe in bench/engine.py)"
    if not convert_script or not Path(convert_script).is_file():
        return "convert_hf_to_gguf.py not found (--convert-script or $LLAMA_CPP_CONVERT)"
    return None


def to_gguf(path: Path, dtype: str, convert_script: str, tmp: Path) -> Path:
    """Our checkpoint -> GGUF through llama.cpp's converter, with a SentencePiece tokenizer beside it."""
    sys.path.insert(0, str(REPO))
    from tests.tokenizer_fixtures import make_sentencepiece_dir

    work = tmp / f"gguf-src-{path.name}"
    if not work.exists():
        shutil.copytree(path, work, ignore=shutil.ignore_patterns("tokenizer*", "special_tokens_map.json"))
        make_sentencepiece_dir(work)
    out = tmp / f"{path.name}-{dtype}.gguf"
    outtype = {"float32": "f32", "bfloat16": "bf16", "float16": "f16"}[dtype]
    subprocess.run([sys.executable, convert_script, str(work), "--outfile", str(out), "--outtype", outtype],
                   check=True, capture_output=True)
    return out


def llama_cpp_decode(gguf: Path, threads: int, prompt_tokens: int, new_tokens: int) -> float:
    import numpy as np
    from llama_cpp import Llama

    llm = Llama(model_path=str(gguf), n_ctx=prompt_tokens + new_tokens + 8, n_threads=threads,
                n_threads_batch=threads, verbose=False)
    llm.eval(random_prompt(prompt_tokens, llm.n_vocab(), 0))
    token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
    t0 = time.perf_counter()
    for _ in range(new_tokens - 1):
        llm.eval([token])
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))  # greedy, as the others
    return (new_tokens - 1) / (time.perf_counter() - t0)


# --- tables ------------------------------------------------------------------------------------------

def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--models", default="bench50m,default")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--streams", default="1,4,16,64")
    ap.add_argument("--prefill-tokens", type=int, default=2048)
    ap.add_argument("--prefill-chunk", type=int, default=512, help="the engine's token budget per step")
    ap.add_argument("--convert-script", default=os.environ.get("LLAMA_CPP_CONVERT"))
    ap.add_argument("--no-compile", dest="compile", action="store_false",
                    help="measure the eager engine only (no torch.compile)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dtypes, streams = args.dtypes.split(","), [int(s) for s in args.streams.split(",")]
    skip = llama_cpp_skip_reason(args.convert_script)
    bandwidth = copy_bandwidth()
    peaks = {d: matmul_peak(getattr(torch, d)) for d in dict.fromkeys([*dtypes, "float32"])}
    print(f"\n{args.threads} threads, copy bandwidth {bandwidth / 1e9:.1f} GB/s, matmul peak "
          + ", ".join(f"{d} {p / 1e9:.0f} GFLOP/s" for d, p in peaks.items()))
    if skip:
        print(f"llama.cpp: skipped ({skip})")
    with tempfile.TemporaryDirectory() as tmp:
        models = prepare_models(args.models.split(","), Path(tmp), context=max(4096, args.prefill_tokens + 1))
        decode_rows, stream_rows, prefill_rows = [], [], []
        for path, what in models.values():
            for dtype in dtypes:
                model = load_ignoring_eos(path, dtype)
                eager, _ = engine_decode(model, 1, args.prompt_tokens, args.new_tokens)
                compiled, compile_s = (engine_decode(model, 1, args.prompt_tokens, args.new_tokens, True)
                                       if args.compile else (None, 0.0))
                hf = hf_decode(path, dtype, args.prompt_tokens, args.new_tokens)
                lcpp = None if skip else llama_cpp_decode(to_gguf(path, dtype, args.convert_script, Path(tmp)),
                                                          args.threads, args.prompt_tokens, args.new_tokens)
                decode_rows.append((what, dtype, eager, compiled, compile_s, hf, lcpp,
                                    bandwidth / decode_bytes(model)))
                if dtype == dtypes[0]:
                    speeds = [engine_decode(model, n, args.prompt_tokens, args.new_tokens, args.compile)[0]
                              for n in streams]
                    stream_rows.append((what, dtype, speeds))
                n = min(args.prefill_tokens, model.cfg.max_seq_len - 1)
                speed = engine_prefill(model, n, args.prefill_chunk, args.compile)
                flops = speed * prefill_flops(model, n) / n
                prefill_rows.append((what, dtype, n, speed, flops / peaks[dtype], flops / peaks["float32"]))
                del model
    print_tables(args, decode_rows, stream_rows, prefill_rows, streams, skip)


def print_tables(args, decode_rows, stream_rows, prefill_rows, streams, skip):
    print(f"\nbatch-1 decode tok/s (prompt {args.prompt_tokens}, {args.new_tokens} new tokens)\n")
    print("codellm: the engine eager, and with --compile (on a CPU the native decode step; its first calls' "
          "seconds, a build included if not cached); the ratios use --compile"
          + (" (--no-compile: the eager engine)\n" if not args.compile else "\n"))
    print("| model | dtype | codellm eager | codellm --compile | transformers | llama.cpp | codellm / transformers "
          "| codellm / llama.cpp | bandwidth floor | codellm / floor |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for what, dtype, eager, compiled, compile_s, hf, lcpp, floor in decode_rows:
        ours = eager if compiled is None else compiled
        comp = "off" if compiled is None else f"{compiled:.1f} ({compile_s:.0f} s)"
        lc, ratio = ("skipped", "-") if lcpp is None else (f"{lcpp:.1f}", f"{ours / lcpp:.2f}x")
        print(f"| {what} | {dtype} | {eager:.1f} | {comp} | {hf:.1f} | {lc} | {ours / hf:.2f}x | {ratio} "
              f"| {floor:.1f} | {ours / floor:.0%} |")
    print("\naggregate decode tok/s by concurrent streams" + (" (--compile)" if args.compile else "") + "\n")
    print("| model | dtype | " + " | ".join(f"{n} streams" for n in streams) + f" | {streams[-1]} / 1 |")
    print("|---|---|" + "---|" * (len(streams) + 1))
    for what, dtype, speeds in stream_rows:
        print(f"| {what} | {dtype} | " + " | ".join(f"{s:.1f}" for s in speeds) + f" | {speeds[-1] / speeds[0]:.1f}x |")
    print(f"\nprefill (engine token budget {args.prefill_chunk} per step"
          + (", --compile" if args.compile else "") + ")\n")
    print("| model | dtype | prompt tokens | tok/s | fraction of the dtype's matmul peak | of the fp32 peak |")
    print("|---|---|---|---|---|---|")
    for what, dtype, n, speed, fraction, of_fp32 in prefill_rows:
        print(f"| {what} | {dtype} | {n} | {speed:.0f} | {fraction:.0%} | {of_fp32:.0%} |")
    if skip:
        print(f"\nllama.cpp skipped: {skip}")


if __name__ == "__main__":
    main()
