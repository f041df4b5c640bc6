"""`codellm eval report RUN...`: a table of pass@k per task/language and model, and a bar chart (PNG)."""

from __future__ import annotations

import json
from pathlib import Path

from codellm.errors import UserError


def load_summaries(paths: list[Path]) -> list[dict]:
    """Summaries from run dirs (their summary.json) or from summary files (`codellm eval execute` writes them)."""
    out = []
    for path in paths:
        file = path / "summary.json" if path.is_dir() else path
        if not file.is_file():
            raise UserError(f"{path}: no summary.json (not an eval run directory or summary file)")
        try:
            out.append(json.loads(file.read_text()) | {"path": str(file)})
        except json.JSONDecodeError as e:
            raise UserError(f"{file}: not valid JSON ({e.msg})") from None
    return out


def model_name(summary: dict) -> str:
    model = summary.get("model") or {}
    return str(model.get("model") or model.get("url") or model.get("samples") or "?")


def table(summaries: list[dict]) -> str:
    ks = sorted({k for s in summaries for k in s["pass_at_k"]}, key=lambda k: int(k.split("@")[1]))
    head = ["task", "language", "model", "problems", "samples", *ks, "statuses", "sandbox"]
    rows = []
    for s in summaries:
        statuses = ", ".join(f"{k} {v}" for k, v in s["status_counts"].items())
        scores = [f"{100 * s['pass_at_k'][k]:.1f}" if k in s["pass_at_k"] else "-" for k in ks]
        sandbox = s["sandbox"]["mode"] + ("" if s["sandbox"]["network_namespace"] else ", NETWORK NOT ISOLATED")
        rows.append([s["task"], s["language"], model_name(s), f"{s['problems']}/{s['problems_in_task']}",
                     str(s["samples"]), *scores, statuses, sandbox])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def chart(summaries: list[dict], png: Path) -> Path:
    """pass@1 (%) per task, one bar per model."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    tasks = list(dict.fromkeys(s["task"] for s in summaries))
    models = list(dict.fromkeys(model_name(s) for s in summaries))
    width = 0.8 / len(models)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.2 * len(tasks) + 2), 4))
    for m, model in enumerate(models):
        values = [next((100 * s["pass_at_k"].get("pass@1", 0.0) for s in summaries
                        if s["task"] == t and model_name(s) == model), 0.0) for t in tasks]
        bars = ax.bar([i + m * width for i in range(len(tasks))], values, width, label=model)
        ax.bar_label(bars, fmt="%.1f", fontsize=8)
    ax.set_xticks([i + width * (len(models) - 1) / 2 for i in range(len(tasks))], tasks, rotation=30, ha="right")
    ax.set_ylabel("pass@1 (%)")
    ax.set_ylim(0, 100)
    ax.set_title("codellm eval")
    ax.legend(fontsize=8)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=120)
    plt.close(fig)
    return png
