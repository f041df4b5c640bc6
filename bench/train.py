"""Training throughput: codellm's loop (`codellm.train.loop.train`, real data pipeline: JSONL documents,
tokenization, infilling transform, packing) vs a plain hand-written PyTorch loop over the same model,
batch shape, optimizer, accumulation, clipping and precision, on one fixed random batch.

    .venv/bin/python bench/train.py [--preset tiny] [--seq-len 256] [--micro-batch-size 8] [--accum 2]
                                    [--steps 20] [--threads 2] [--device cpu]

The corpus is the Python standard library (real code), the tokenizer is trained on it in a few
seconds. Each loop's tokens/s is the median over its steps after the warm-up (robust to a shared
machine), best of `--repeats` runs. Prints a table; our loop's overhead should stay under 5%.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sysconfig
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from codellm.config import ModelConfig
from codellm.model import Transformer
from codellm.tokenizer import load_tokenizer
from codellm.tokenizer_train import train_tokenizer
from codellm.train.config import TrainConfig
from codellm.train.loop import param_groups, train
from codellm.train.progress import flops_per_token, peak_flops


def stdlib_files(n_docs: int) -> list[Path]:
    return sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[:n_docs]


def stdlib_corpus(root: Path, files: list[Path]) -> Path:
    """A corpus dir in the `codellm data build` layout: 4 files for val, the rest for train."""
    root.mkdir(parents=True)
    docs = [{"text": f.read_text(errors="replace"), "path": f.name, "lang": "python", "package": "stdlib",
             "license": "PSF-2.0"} for f in files]
    splits = {}
    for split, part in (("train", docs[4:]), ("val", docs[:4])):
        (root / f"{split}-00000.jsonl").write_text("".join(json.dumps(d) + "\n" for d in part))
        splits[split] = {"docs": len(part), "shards": [{"file": f"{split}-00000.jsonl", "docs": len(part)}]}
    (root / "manifest.json").write_text(json.dumps({"format": "codellm-corpus/1", "splits": splits}))
    return root


def plain_loop(cfg: TrainConfig, mcfg: ModelConfig, device: torch.device, bf16: bool, warmup: int) -> float:
    """Tokens per second of the textbook loop: fixed batch, AdamW, accumulation, clipping."""
    model = Transformer(mcfg).init_weights(cfg.seed).to(device).train()
    o = cfg.optim
    opt = torch.optim.AdamW(param_groups(model, o.weight_decay), lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps)
    seq_len, accum = cfg.data.seq_len, cfg.batch_tokens // (cfg.micro_batch_size * cfg.data.seq_len)
    batch = torch.randint(0, mcfg.vocab_size, (cfg.micro_batch_size, seq_len + 1), device=device)
    x, y = batch[:, :-1], batch[:, 1:]

    def step():
        for _ in range(accum):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                logits = model(x)
            loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
            (loss / accum).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    rates = []
    for k in range(cfg.steps):
        start = time.perf_counter()
        float(step())  # waits for the device, like our loop's per-step log line
        if k >= warmup:
            rates.append(cfg.batch_tokens / (time.perf_counter() - start))
    return statistics.median(rates)


def our_loop(cfg: TrainConfig, warmup: int) -> float:
    """Median tokens per second of `train()`'s steps after the warm-up (log_every=1: one record a step)."""
    train(cfg)
    records = [json.loads(line) for line in (Path(cfg.out) / "metrics.jsonl").read_text().splitlines()]
    return statistics.median(r["tok_s"] for r in records if "loss" in r and r["step"] > warmup)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--micro-batch-size", type=int, default=8)
    ap.add_argument("--accum", type=int, default=2)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3, help="steps left out of the timing")
    ap.add_argument("--repeats", type=int, default=2, help="best of this many runs of each loop")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        files = stdlib_files(200)
        corpus = stdlib_corpus(tmp / "corpus", files)
        tok_dir = train_tokenizer(files, tmp / "tok", vocab_size=2048, show_progress=False)
        tok = load_tokenizer(tok_dir)
        mcfg = ModelConfig.from_preset(args.preset, vocab_size=tok.vocab_size, max_seq_len=args.seq_len)
        batch_tokens = args.micro_batch_size * args.seq_len * args.accum
        ours, plain = [], []
        for k in range(args.repeats):
            cfg = TrainConfig.for_stage(
                "pretrain", out=str(tmp / f"run{k}"), tokenizer=str(tok_dir), model_preset=args.preset,
                corpus=str(corpus), seq_len=args.seq_len, micro_batch_size=args.micro_batch_size,
                batch_tokens=batch_tokens, steps=args.steps, warmup_steps=2, log_every=1, eval_every=0,
                save_every=0, device=args.device)
            plain.append(plain_loop(cfg, mcfg, device, bf16, args.warmup))
            ours.append(our_loop(cfg, args.warmup))
    peak, source = peak_flops(device, bf16)
    flops = flops_per_token(mcfg, args.seq_len)
    print(f"\nmodel {args.preset}: {mcfg.num_params() / 1e6:.2f}M params, vocab {mcfg.vocab_size} | seq_len "
          f"{args.seq_len} | {batch_tokens:,} tokens/step ({args.accum} x {args.micro_batch_size} rows) | "
          f"{device} {'bf16' if bf16 else 'fp32'} | {args.threads} threads | peak {peak / 1e12:.3g} TFLOP/s "
          f"({source}) | best of {args.repeats}\n")
    print(f"{'loop':<34}{'tok/s':>10}{'mfu':>8}{'vs plain':>10}")
    for name, tok_s in (("plain PyTorch (fixed batch)", max(plain)), ("codellm train() (real data)", max(ours))):
        print(f"{name:<34}{tok_s:>10,.0f}{flops * tok_s / peak:>8.1%}{tok_s / max(plain) - 1:>+10.1%}")


if __name__ == "__main__":
    main()
