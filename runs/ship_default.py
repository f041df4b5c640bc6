"""Ship a finished `runs/default_model.sh` run: bf16 copies of the base and instruct models into models/,
each with a MODEL_CARD.md written from the run's own records (corpus manifest, stage configs, metrics,
wall times) and with sample outputs generated on the spot.

    .venv/bin/python runs/ship_default.py [--run runs/default] [--out models]
        [--eval-base runs/eval/default] [--eval-instruct runs/eval/default-instruct]

With --eval-* (a `runs/eval_default.sh` output folder), the card gets that evaluation's SUMMARY.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
from pathlib import Path

import torch

from codellm import generate
from codellm.checkpoint import load_model, save_model
from codellm.generate import SamplingParams
from codellm.tokenizer import load_tokenizer

STAGES = [("pretrain", "pretrain"), ("long", "long-context"), ("sft", "sft")]
COMPLETION_PROMPTS = ["def fibonacci(n):\n", "import os\n\n\ndef list_python_files(root):\n"]
INFILL = ("def remove_suffix(text, suffix):\n    ", "\n    return text\n")
CHAT = "Return the sum of the squares of a list of numbers."


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def stage_summary(run: Path, name: str) -> dict:
    cfg = json.loads((run / name / "config.json").read_text())
    info = json.loads((run / name / "final" / "training.json").read_text())
    metrics = read_jsonl(run / name / "metrics.jsonl")
    train = [m for m in metrics if "loss" in m]
    val = [m for m in metrics if "val_loss" in m]
    return {"config": cfg, "steps": info["steps"], "tokens": info["tokens"],
            "final_loss": train[-1]["loss"] if train else None,
            "final_val_loss": val[-1]["val_loss"] if val else None,
            "tok_s": sum(m["tok_s"] for m in train) / max(len(train), 1)}


def wall_times(run: Path) -> dict[str, int]:
    path = run / "times.tsv"
    rows = [line.split("\t") for line in path.read_text().splitlines()] if path.is_file() else []
    return {name: int(seconds) for name, seconds in rows}


def samples(model_dir: Path, instruct: bool) -> str:
    model, tok = load_model(model_dir), load_tokenizer(model_dir)
    params = SamplingParams(max_new_tokens=64, temperature=0.7, top_p=0.9, seed=0)
    out = []
    for prompt in COMPLETION_PROMPTS:
        text = generate.collect(generate.complete(model, tok, prompt, params))
        out.append(f"`codellm complete --temperature 0.7 --top-p 0.9 --seed 0`:\n\n```python\n{prompt}{text}\n```")
    prefix, suffix = INFILL
    for order in ("psm", "spm"):
        middle = generate.collect(generate.infill(model, tok, prefix, suffix, params, order))
        out.append(f"`codellm infill --order {order}` (middle in «»):\n\n```python\n{prefix}«{middle}»{suffix}```")
    if instruct:
        answer = generate.collect(generate.chat(model, tok, [{"role": "user", "content": CHAT}], params))
        out.append(f"`codellm chat '{CHAT}'`:\n\n```\n{answer}\n```")
    return "\n\n".join(out)


def card(run: Path, name: str, stages: list[str], model_dir: Path, instruct: bool, evaluation: Path | None) -> str:
    corpus = json.loads((run / "corpus" / "manifest.json").read_text())
    times = wall_times(run)
    train_minutes = sum(times.get(_time_key(stage), 0) for stage in stages) / 60
    prep_minutes = (times.get("corpus", 0) + times.get("tokenizer", 0)) / 60
    n_params = sum(p.numel() for p in load_model(model_dir).parameters())
    cfg = json.loads((model_dir / "config.json").read_text())
    permissive = sorted({p["license"] for p in corpus["packages"].values() if p.get("permissive")}) \
        if isinstance(corpus.get("packages"), dict) else []
    lines = [
        f"# codellm {name}",
        "",
        f"A {n_params / 1e6:.1f}M-parameter Code Llama-style model (Llama-2 architecture, GQA "
        f"{cfg['num_attention_heads']}/{cfg['num_key_value_heads']} heads, RoPE theta {cfg['rope_theta']:g}, "
        f"{cfg['max_position_embeddings']:,}-token context, {cfg['vocab_size']:,}-token byte-level BPE with "
        "`<PRE> <SUF> <MID> <EOT>`), trained from scratch by codellm's own pipeline (`runs/default_model.sh`) "
        f"on 2 CPU cores in {train_minutes:.0f} minutes of training (after {prep_minutes:.0f} minutes building the "
        "corpus and tokenizer). It exists so that every codellm command works offline out of "
        "the box and to show the pipeline end to end; with a few million training tokens it has learnt the "
        "surface of code (indentation, identifiers, punctuation), not programming: do not expect working code "
        "from it. The same script with larger STEPS_* on a GPU trains a useful model.",
        "",
        "## Data",
        "",
        "`codellm data build --stdlib --source /opt/pypi/files --source /opt/pypi-more/files`: the Python "
        "standard library (PSF) and the wheels/sdists of the machine's local package store. Only permissively "
        "licensed packages are kept (licence of every package recorded in the corpus manifest), exact and "
        "near duplicates removed, generated/minified files dropped, and every file sharing a 13-gram with "
        "HumanEval, MBPP or MultiPL-E removed.",
        "",
        f"- documents kept: {corpus['docs']:,} ({corpus['bytes'] / 1e6:.0f} MB) from {corpus['files_seen']:,} "
        f"files seen",
        "- by language (docs): " + ", ".join(f"{k} {v['docs']:,}" for k, v in sorted(
            corpus["langs"].items(), key=lambda kv: -kv[1]["bytes"])),
        "- dropped: " + ", ".join(f"{k} {v:,}" for k, v in corpus["dropped"].items() if v),
    ]
    if permissive:
        lines.append("- licences kept: " + ", ".join(permissive))
    lines += ["", "## Training", "", "| stage | steps | tokens | seq len | lr | theta | final loss | val loss "
              "| tok/s | wall time |", "|---|---|---|---|---|---|---|---|---|---|"]
    for stage in stages:
        s = stage_summary(run, stage)
        c = s["config"]
        theta = c.get("rope_theta") or "-"
        lines.append(f"| {c['stage']} | {s['steps']:,} | {s['tokens']:,} | {c['data']['seq_len']} | "
                     f"{c['optim']['lr']:g} | {theta} | {s['final_loss']:.3f} | "
                     f"{s['final_val_loss'] if s['final_val_loss'] is None else round(s['final_val_loss'], 3)} | "
                     f"{s['tok_s']:,.0f} | {times.get(_time_key(stage), 0) / 60:.0f} min |")
    lines += [
        "",
        "Pretraining applies the infilling transform to 90% of the documents (PSM/SPM half-half, split points "
        "drawn uniformly at character level); long-context fine-tuning raises RoPE theta 1e4 -> 1e6 and the "
        "context 512 -> 2,048; the instruct variant is tuned on docstring -> function dialogs mined from the "
        "corpus with 8% pretraining rehearsal. AdamW (0.9, 0.95), cosine to peak/30, weight decay 0.1, "
        "clip 1.0, fp32. Learning rates are higher than the paper's (which are for 7B+ models) because the "
        "stages here are a few hundred steps on a small model.",
        "",
        f"Hardware: {platform.processor() or platform.machine()}, 2 cores, {torch.get_num_threads()} threads, "
        "no GPU (the machine was shared with other work during training).",
        "",
        "Loss curves:",
        "",
    ]
    lines += [f"![{stage} loss]({stage}_loss.png)" for stage in stages]
    lines += ["", "## Samples", "", samples(model_dir, instruct), ""]
    if evaluation is not None:
        summary = (evaluation / "SUMMARY.md").read_text().strip().removeprefix("# codellm eval summary").strip()
        lines += ["## Evaluation", "", f"`codellm eval` on models/{name}, greedy pass@1 (`runs/eval_default.sh` runs "
                  "every task; which problems were scored is said below the table):", "", summary, ""]
    return "\n".join(lines)


def _time_key(stage: str) -> str:
    return {"long": "long-context"}.get(stage, stage)


def ship(run: Path, name: str, stage_dir: str, stages: list[str], out: Path, instruct: bool,
         evaluation: Path | None = None) -> Path:
    model = load_model(run / stage_dir / "final")
    target = save_model(model, out / name, tokenizer_dir=run / stage_dir / "final", dtype="bfloat16")
    for stage in stages:
        shutil.copy2(run / stage / "loss.png", target / f"{stage}_loss.png")
    if evaluation is not None and (evaluation / "report.png").is_file():
        shutil.copy2(evaluation / "report.png", target / "report.png")  # the chart SUMMARY.md shows
    (target / "MODEL_CARD.md").write_text(card(run, name, stages, target, instruct, evaluation))
    return target


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, default=Path("runs/default"))
    ap.add_argument("--out", type=Path, default=Path("models"))
    ap.add_argument("--eval-base", type=Path, help="runs/eval_default.sh output for the base model")
    ap.add_argument("--eval-instruct", type=Path, help="runs/eval_default.sh output for the instruct model")
    args = ap.parse_args()
    for flag, folder in (("--eval-base", args.eval_base), ("--eval-instruct", args.eval_instruct)):
        if folder is not None and not (folder / "SUMMARY.md").is_file():
            ap.error(f"{flag} {folder}: no SUMMARY.md there (make it with runs/eval_default.sh)")
    print(ship(args.run, "default", "long", ["pretrain", "long"], args.out, False, args.eval_base))
    print(ship(args.run, "default-instruct", "sft", ["pretrain", "long", "sft"], args.out, True, args.eval_instruct))


if __name__ == "__main__":
    main()
