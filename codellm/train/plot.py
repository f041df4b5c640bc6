"""`codellm train plot RUN_DIR`: loss curves (train, val) and the learning rate from metrics.jsonl as a PNG.

The title names the run, its stage and the model it trained (config.json); the top axis counts tokens;
dashed lines mark the steps a run was resumed at."""

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

    fig = figure(run_dir)
    png = Path(png) if png is not None else Path(run_dir) / "loss.png"
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return png


def figure(run_dir: Path):
    """The plot of a run as a matplotlib Figure (train and val loss over steps, tokens on top, the lr below)."""
    import matplotlib.pyplot as plt

    records = read_metrics(run_dir)
    train = [(r["step"], r["loss"], r["lr"]) for r in records if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    resumes = [r["step"] for r in records if r.get("resumed")]
    if not train and not val:
        raise UserError(f"{run_dir}/metrics.jsonl has no loss records yet")
    config = _config(run_dir)
    fig, (ax_loss, ax_lr) = plt.subplots(2, 1, figsize=(8, 6), sharex=True, height_ratios=(3, 1))
    if train:
        ax_loss.plot([s for s, _, _ in train], [x for _, x, _ in train], label="train")
        ax_lr.plot([s for s, _, _ in train], [lr for _, _, lr in train], color="gray")
    if val:
        ax_loss.plot([s for s, _ in val], [x for _, x in val], "o-", label="val")
    for i, step in enumerate(resumes):
        for ax in (ax_loss, ax_lr):
            ax.axvline(step, color="tab:red", linestyle="--", linewidth=1, label="resumed" if ax is ax_loss and not i
                       else None)
    ax_loss.set(ylabel="loss", title=title(run_dir, config))
    batch = config.get("batch_tokens")
    if batch:  # tokens = step x the batch (the batch cannot change on --resume)
        top = ax_loss.secondary_xaxis("top", functions=(lambda s: s * batch, lambda t: t / batch))
        top.set_xlabel("tokens")
    ax_loss.legend()
    ax_loss.grid(alpha=0.3)
    ax_lr.set(xlabel="step", ylabel="lr")
    ax_lr.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def _config(run_dir: Path) -> dict:
    path = Path(run_dir) / "config.json"
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except json.JSONDecodeError:
        return {}


def title(run_dir: Path, config: dict) -> str:
    """`RUN: STAGE of MODEL`: the model is the --init checkpoint (its last two path parts), or the preset a
    pretraining run started from."""
    name = Path(run_dir).resolve().name
    if not config:
        return name
    init = config.get("init")
    model = "/".join(Path(init).parts[-2:]) if init else f"{config.get('model_preset')} preset, from scratch"
    return f"{name}: {config.get('stage')} of {model}"
