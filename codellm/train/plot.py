"""`codellm train plot RUN_DIR`: loss curves (train, val) and the learning rate from metrics.jsonl as a PNG."""

from __future__ import annotations

import json
from pathlib import Path

from codellm.errors import UserError


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise UserError(f"{run_dir} has no metrics.jsonl (not a training run directory?)")
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:  # a last line cut short by a crash
            continue
    return records


def plot_run(run_dir: Path, png: Path | None = None) -> Path:
    """Write the plot (default RUN_DIR/loss.png) and return its path."""
    try:
        import matplotlib
    except ModuleNotFoundError:
        raise UserError("train plot needs matplotlib: pip install 'matplotlib>=3.8'") from None
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    records = read_metrics(run_dir)
    train = [(r["step"], r["loss"], r["lr"]) for r in records if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    if not train and not val:
        raise UserError(f"{run_dir}/metrics.jsonl has no loss records yet")
    fig, (ax_loss, ax_lr) = plt.subplots(2, 1, figsize=(8, 6), sharex=True, height_ratios=(3, 1))
    if train:
        ax_loss.plot([s for s, _, _ in train], [x for _, x, _ in train], label="train")
        ax_lr.plot([s for s, _, _ in train], [lr for _, _, lr in train], color="gray")
    if val:
        ax_loss.plot([s for s, _ in val], [x for _, x in val], "o-", label="val")
    ax_loss.set(ylabel="loss", title=Path(run_dir).resolve().name)
    ax_loss.legend()
    ax_loss.grid(alpha=0.3)
    ax_lr.set(xlabel="step", ylabel="lr")
    ax_lr.grid(alpha=0.3)
    png = Path(png) if png is not None else Path(run_dir) / "loss.png"
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return png
