"""Progress: one fixed-format line per log step on rank 0, the same numbers in RUN_DIR/metrics.jsonl.

    step 00420/10000 (4.2%) | loss 2.314 | lr 3.0e-4 | 61,230 tok/s | mfu 38.1% | eta 1h05m

MFU = model FLOPs per token x tokens/s / (peak FLOP/s x ranks). FLOPs per token: 6 x the parameters
that do matmuls (all but the embedding table) plus attention's 12 x layers x dim x seq_len (PaLM App. B).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from codellm.config import ModelConfig

# Dense bf16 peaks (vendor datasheets, TFLOP/s), matched against torch.cuda.get_device_name.
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0, "A10": 125.0,
               "4090": 165.0, "3090": 71.0}


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    matmul_params = cfg.num_params() - cfg.vocab_size * cfg.dim
    return 6 * matmul_params + 12 * cfg.n_layers * cfg.dim * seq_len


def peak_flops(device: torch.device, bf16: bool) -> tuple[float, str]:
    """(peak FLOP/s of one device, where the number comes from): a datasheet for known GPUs in bf16,
    else a short matmul measurement (so on a CPU, MFU is relative to what matmuls reach there)."""
    if device.type == "cuda" and bf16:
        name = torch.cuda.get_device_name(device)
        for key, tflops in PEAK_TFLOPS.items():
            if key in name:
                return tflops * 1e12, f"{name} datasheet"
    dtype = torch.bfloat16 if bf16 else torch.float32
    n = 2048 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    a @ a  # warm-up
    best = float("inf")
    for _ in range(10):  # the best of several: a busy moment on a shared machine must not set the peak
        start = time.perf_counter()
        (a @ a).sum().item()
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best, f"measured {str(dtype).removeprefix('torch.')} matmul"


def format_duration(seconds: float) -> str:
    seconds = int(seconds)
    h, m, s = seconds // 3600, seconds // 60 % 60, seconds % 60
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def progress_line(step: int, steps: int, loss: float, lr: float, tok_s: float, mfu: float, eta_s: float) -> str:
    width = max(5, len(str(steps)))
    return (f"step {step:0{width}d}/{steps} ({step / steps:.1%}) | loss {loss:.3f} | lr {lr:.1e} | "
            f"{tok_s:,.0f} tok/s | mfu {mfu:.1%} | eta {format_duration(eta_s)}")


class MetricsLog:
    """Appends one JSON object per log/eval step to metrics.jsonl and prints lines (rank 0 only)."""

    def __init__(self, run_dir: Path, enabled: bool, resume_step: int | None):
        self.path, self.enabled = run_dir / "metrics.jsonl", enabled
        if enabled and resume_step is not None:
            self._truncate_after(resume_step)
        elif enabled:
            self.path.write_text("")

    def _truncate_after(self, step: int) -> None:
        """Drop records a crashed run wrote after its last checkpoint: the resumed run redoes those steps."""
        if not self.path.is_file():
            return
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                if json.loads(line)["step"] <= step:
                    kept.append(line)
            except (json.JSONDecodeError, KeyError, TypeError):  # a line cut short by the crash
                continue
        self.path.write_text("".join(line + "\n" for line in kept))

    def write(self, record: dict) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")

    def print(self, line: str) -> None:
        if self.enabled:
            print(line, flush=True)
