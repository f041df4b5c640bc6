"""`codellm eval report RUN...`: a table of pass@k per task/language and model, a bar chart (PNG), and
optionally a markdown summary (task, problems, pass@1, statuses, seconds)."""

from __future__ import annotations

import json
import os
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


def label(summary: dict) -> str:
    """The task, with the prompt order for infilling (PSM and SPM runs are different rows)."""
    order = (summary.get("params") or {}).get("order")
    return f"{summary['task']} ({order})" if summary["task"].startswith("infill") and order else summary["task"]


def table(summaries: list[dict]) -> str:
    ks = sorted({k for s in summaries for k in s["pass_at_k"]}, key=lambda k: int(k.split("@")[1]))
    timed = any("seconds" in s for s in summaries)
    head = ["task", "language", "model", "problems", "samples", *ks, "statuses", "sandbox"] + ["seconds"] * timed
    rows = []
    for s in summaries:
        scores = [f"{100 * s['pass_at_k'][k]:.1f}" if k in s["pass_at_k"] else "-" for k in ks]
        sandbox = s["sandbox"]["mode"] + ("" if s["sandbox"]["network_namespace"] else ", NETWORK NOT ISOLATED")
        rows.append(
            [
                label(s),
                s["language"],
                model_name(s),
                f"{s['problems']}/{s['problems_in_task']}",
                str(s["samples"]),
                *scores,
                statuses(s),
                sandbox,
            ]
            + [_seconds(s)] * timed
        )
    return _markdown_table(head, rows)


def markdown(summaries: list[dict], png: Path, where: Path) -> str:
    """A short report: one row per run (problems, pass@1, statuses, seconds), the models, sandbox and chart."""
    rows = [
        [
            label(s),
            f"{s['problems']}/{s['problems_in_task']}",
            f"{100 * s['pass_at_k']['pass@1']:.1f}" if "pass@1" in s["pass_at_k"] else "-",
            f"{100 * s['well_formed']:.0f}" if "well_formed" in s else "-",
            statuses(s),
            _seconds(s),
        ]
        for s in summaries
    ]
    total = sum(s.get("seconds", 0.0) for s in summaries)
    rows.append(["**total**", str(sum(s["problems"] for s in summaries)), "", "", "", f"{total:.0f}"])
    models = ", ".join(dict.fromkeys(model_name(s) for s in summaries))
    sandboxes = "; ".join(dict.fromkeys(s["sandbox"]["note"] for s in summaries))
    settings = summaries[0].get("params") or {}
    return "\n".join(
        [
            "# codellm eval summary",
            "",
            f"Model: {models}. Decoding: n={settings.get('n', '?')}, temperature {settings.get('temperature', '?')} "
            "(0 = greedy pass@1). Sandbox: " + sandboxes + ".",
            "",
            _markdown_table(["task", "problems", "pass@1 (%)", "well-formed (%)", "statuses", "seconds"], rows),
            "",
            "Well-formed: the completion parses as Python and gives the function a body beyond its docstring "
            "(not only a comment or `pass`); HumanEval only.",
            "",
            f"![pass@1 per task]({os.path.relpath(png, where)})",
            "",
        ]
    )


def statuses(summary: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in summary["status_counts"].items())


def _seconds(summary: dict) -> str:
    return f"{summary['seconds']:.0f}" if "seconds" in summary else "-"


def _markdown_table(head: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def chart(summaries: list[dict], png: Path) -> Path:
    """pass@1 (%) per task, one bar per model."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    tasks = list(dict.fromkeys(label(s) for s in summaries))
    models = list(dict.fromkeys(model_name(s) for s in summaries))
    width = 0.8 / len(models)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.2 * len(tasks) + 2), 4))
    for m, model in enumerate(models):
        values = [
            next(
                (
                    100 * s["pass_at_k"].get("pass@1", 0.0)
                    for s in summaries
                    if label(s) == t and model_name(s) == model
                ),
                0.0,
            )
            for t in tasks
        ]
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
