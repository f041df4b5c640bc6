"""Batch-1 decode speed: codellm's reference generator vs `transformers.generate`, same weights, same
threads, plus the memory-bandwidth floor (every decode step reads all weights once).

    .venv/bin/python bench/decode.py [--threads 2] [--new-tokens 128] [--prompt-tokens 64]

Prints a table; numbers go into the README with this command.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

from codellm.checkpoint import load_model, save_model
from codellm.config import ModelConfig
from codellm.generate import generate_tokens
from codellm.model import Transformer
from codellm.sampling import SamplingParams

# ~50M parameters with Code Llama's vocabulary
BENCH_CONFIG = dict(vocab_size=32016, dim=512, n_layers=6, n_heads=8, n_kv_heads=8, hidden_dim=1408,
                    max_seq_len=2048, rope_theta=1e6)


def copy_bandwidth(n_bytes: int = 512 << 20, repeats: int = 5) -> float:
    """Bytes per second a plain tensor copy moves (read + write), the best of a few runs."""
    src = torch.empty(n_bytes // 4, dtype=torch.float32).fill_(1.0)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t0)
    return 2 * n_bytes / best


def decode_bytes(model: Transformer) -> int:
    """Weights read per decoded token: everything but the embedding table (one row is gathered)."""
    return sum(p.numel() * p.element_size() for n, p in model.named_parameters() if n != "embed_tokens.weight")


def time_ours(model, prompt: list[int], new_tokens: int) -> float:
    params = SamplingParams(max_new_tokens=new_tokens)
    list(generate_tokens(model, prompt[:8], SamplingParams(max_new_tokens=4), set()))  # warm-up
    t0 = time.perf_counter()
    n = sum(1 for _ in generate_tokens(model, prompt, params, stop_ids=set()))
    assert n == new_tokens
    return n / (time.perf_counter() - t0)


def time_hf(model, prompt: list[int], new_tokens: int) -> float:
    ids = torch.tensor([prompt])
    kwargs = dict(do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.inference_mode():
        model.generate(ids[:, :8], max_new_tokens=4, min_new_tokens=4, **kwargs)
        t0 = time.perf_counter()
        out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kwargs)
    assert out.shape[1] - len(prompt) == new_tokens
    return new_tokens / (time.perf_counter() - t0)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--dtypes", default="float32,bfloat16")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import LlamaForCausalLM

    bandwidth = copy_bandwidth()
    prompt = torch.randint(3, BENCH_CONFIG["vocab_size"], (args.prompt_tokens,),
                           generator=torch.Generator().manual_seed(0)).tolist()
    with tempfile.TemporaryDirectory() as tmp:
        save_model(Transformer(ModelConfig(**BENCH_CONFIG)).init_weights(), tmp, dtype="float32")
        rows = []
        for dtype in args.dtypes.split(","):
            ours = load_model(tmp, dtype=dtype)
            hf = LlamaForCausalLM.from_pretrained(tmp, dtype=getattr(torch, dtype)).eval()
            floor = bandwidth / decode_bytes(ours)
            ours_speed, hf_speed = time_ours(ours, prompt, args.new_tokens), time_hf(hf, prompt, args.new_tokens)
            rows.append((dtype, ours_speed, hf_speed, floor))
            del ours, hf
    n_params = ModelConfig(**BENCH_CONFIG).num_params()
    print(f"\nbatch-1 decode, {n_params / 1e6:.0f}M-param Llama, prompt {args.prompt_tokens}, "
          f"{args.new_tokens} new tokens, {args.threads} threads, copy bandwidth {bandwidth / 1e9:.1f} GB/s\n")
    print("| dtype | codellm tok/s | transformers tok/s | codellm / transformers | bandwidth floor tok/s "
          "| codellm / floor |")
    print("|---|---|---|---|---|---|")
    for dtype, ours, hf, floor in rows:
        print(f"| {dtype} | {ours:.1f} | {hf:.1f} | {ours / hf:.2f}x | {floor:.1f} | {ours / floor:.0%} |")


if __name__ == "__main__":
    main()
