"""Ship a finished default-model run: bf16 copies of the base and instruct models into models/, each with
a MODEL_CARD.md written from the run's own records (corpus manifest, stage configs, metrics, wall times,
the device it ran on) and with sample outputs generated on the spot.

    .venv/bin/python runs/ship_default.py [--run runs/default] [--out models]       # runs/default_model.sh (CPU)
    .venv/bin/python runs/ship_default.py --gpu-files runs/gpu/files --run runs/gpu  # runs/gpu_default.sh (GPU)
        [--eval-base runs/eval/new] [--eval-instruct DIR] [--compare OLD_EVAL_DIR NEW_EVAL_DIR]

--gpu-files: what runs/gpu_default.sh left in $OUT (shards + records.tar.gz), unpacked into --run first.
--eval-*: an eval folder (`runs/eval_default.sh` output, or `codellm eval` runs with a SUMMARY.md);
--compare: the old and the new model's eval folders (one run folder per task), for the old-vs-new table,
with the validation losses the GPU run measured on its held-out packages (val_loss.json).
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import torch

from codellm import generate
from codellm.checkpoint import load_model, save_model
from codellm.sampling import SamplingParams
from codellm.streaming import collect
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
    steady = train[1:] or train  # the first window holds a --compile's compilation
    return {"config": cfg, "steps": info["steps"], "tokens": info["tokens"],
            "final_loss": train[-1]["loss"] if train else None,
            "final_val_loss": val[-1]["val_loss"] if val else None,
            "tok_s": sum(m["tok_s"] for m in steady) / max(len(steady), 1),
            "mfu": sum(m.get("mfu", 0) for m in steady) / max(len(steady), 1)}


def wall_times(run: Path) -> dict[str, int]:
    path = run / "times.tsv"
    rows = [line.split("\t") for line in path.read_text().splitlines()] if path.is_file() else []
    return {name: int(seconds) for name, seconds in rows}


def samples(model_dir: Path, instruct: bool) -> str:
    model, tok = load_model(model_dir), load_tokenizer(model_dir)
    params = SamplingParams(max_new_tokens=64, temperature=0.7, top_p=0.9, seed=0, heal=True)
    out = []
    for prompt in COMPLETION_PROMPTS:
        text = collect(generate.complete(model, tok, prompt, params))
        out.append(f"`codellm complete --temperature 0.7 --top-p 0.9 --seed 0`:\n\n```python\n{prompt}{text}\n```")
    prefix, suffix = INFILL
    params = SamplingParams(max_new_tokens=64, temperature=0.7, top_p=0.9, seed=0)
    for order in ("psm", "spm"):
        middle = collect(generate.infill(model, tok, prefix, suffix, params, order))
        out.append(f"`codellm infill --order {order}` (middle in «»):\n\n```python\n{prefix}«{middle}»{suffix}```")
    if instruct:
        answer = collect(generate.chat(model, tok, [{"role": "user", "content": CHAT}], params))
        out.append(f"`codellm chat '{CHAT}'`:\n\n```\n{answer}\n```")
    return "\n\n".join(out)


def comparison(old: Path, new: Path, val_losses: list[dict]) -> str:
    """Old vs new, task by task (runs present in both folders), plus the validation losses."""
    rows = ["| measure | old (8.6M, CPU) | new (11.1M, GPU) |", "|---|---|---|"]
    if len(val_losses) >= 2:
        rows.append(f"| validation loss, nats/token ({val_losses[0]['tokens']:,} tokens of held-out packages) | "
                    f"{val_losses[0]['loss']:.3f} | {val_losses[1]['loss']:.3f} |")
    for run in sorted(p for p in new.iterdir() if (p / "summary.json").is_file()):
        if not (old / run.name / "summary.json").is_file():
            continue
        s_old, s_new = (json.loads((d / run.name / "summary.json").read_text()) for d in (old, new))
        task = {"humaneval": "humaneval, no token healing", "humaneval-heal": "humaneval"}.get(run.name, run.name)
        what = f"{task} pass@1 % ({s_new['problems']}/{s_new['problems_in_task']})"
        rows.append(f"| {what} | {100 * s_old['pass_at_k']['pass@1']:.1f} | {100 * s_new['pass_at_k']['pass@1']:.1f} |")
        if "well_formed" in s_new and "well_formed" in s_old:
            rows.append(f"| {task}: completions that parse with a function body beyond the docstring % | "
                        f"{100 * s_old['well_formed']:.1f} | {100 * s_new['well_formed']:.1f} |")
    return "\n".join(rows)


def card(run: Path, name: str, stages: list[str], model_dir: Path, instruct: bool, evaluation: Path | None,
         compare: tuple[Path, Path] | None) -> str:
    corpus = json.loads((run / "corpus" / "manifest.json").read_text())
    times = wall_times(run)
    device = (run / "device.txt").read_text().strip() if (run / "device.txt").is_file() else None
    train_minutes = sum(times.get(_time_key(stage), 0) for stage in stages) / 60
    prep_minutes = (times.get("corpus", 0) + times.get("tokenizer", 0)) / 60
    n_params = sum(p.numel() for p in load_model(model_dir).parameters())
    cfg = json.loads((model_dir / "config.json").read_text())
    summaries = {stage: stage_summary(run, stage) for stage in stages}
    tokens = sum(s["tokens"] for s in summaries.values())
    permissive = sorted({p["license"] for p in corpus["packages"] if p.get("permissive")}) \
        if isinstance(corpus.get("packages"), list) else []
    script = "runs/gpu_default.sh" if device else "runs/default_model.sh"
    chip = device.split(" | ")[0].split(",")[0] if device else None
    where = "2 CPU cores" if chip is None else "the CPU" if chip == "cpu" else f"one {chip} GPU"
    contexts = [summaries[s]["config"]["data"]["seq_len"] for s in ("pretrain", "long") if s in summaries]
    lines = [
        f"# codellm {name}",
        "",
        f"A {n_params / 1e6:.1f}M-parameter Code Llama-style model (Llama-2 architecture, GQA "
        f"{cfg['num_attention_heads']}/{cfg['num_key_value_heads']} heads, RoPE theta {cfg['rope_theta']:g}, "
        f"{cfg['max_position_embeddings']:,}-token context, {cfg['vocab_size']:,}-token byte-level BPE with "
        f"`<PRE> <SUF> <MID> <EOT>`), trained from scratch by codellm's own pipeline (`{script}`) on {where} in "
        f"{train_minutes:.0f} minutes of training ({tokens / 1e6:,.0f}M tokens; {prep_minutes:.1f} minutes "
        "building the corpus before). It exists so that every codellm command works offline out of the box "
        "and to show the pipeline end to end. It writes Python that looks like Python (imports, functions, "
        "indented bodies), but it is far too small and too briefly trained to solve programming problems: "
        "it scores 0 on every benchmark below. Point `--model` at a real Code Llama for useful output.",
        "",
        "## Data",
        "",
        "`codellm data build " + ("--stdlib " if any(s["kind"] == "stdlib" for s in corpus["sources"]) else "")
        + " ".join(f"--source {s['path']}" for s in corpus["sources"] if s["kind"] != "stdlib") + "`: "
        + ("the Python standard library (PSF) and the source of the packages installed on the machine that "
           "trained it. " if device else "the Python standard library (PSF) and the wheels/sdists of the "
           "machine's local package store. ")
        + "Only permissively licensed packages are kept (licence of every package read from its metadata and "
        "recorded in the corpus manifest), exact and near duplicates removed (MinHash LSH, Jaccard 0.85), "
        "generated/minified files dropped, and every file sharing a 13-gram with HumanEval, MBPP or MultiPL-E "
        "removed; packages are split 95/5 into train and held-out validation.",
        "",
        f"- documents kept: {corpus['docs']:,} ({corpus['bytes'] / 1e6:.0f} MB) from {corpus['files_seen']:,} "
        f"files seen, {len(corpus['packages'])} packages",
        "- by language (docs): " + ", ".join(f"{k} {v['docs']:,}" for k, v in sorted(
            corpus["langs"].items(), key=lambda kv: -kv[1]["bytes"])),
        "- dropped: " + ", ".join(f"{k} {v:,}" for k, v in corpus["dropped"].items() if v),
    ]
    if permissive:
        lines.append("- licences kept: " + ", ".join(permissive))
    lines += ["", "## Training", "", "| stage | steps | tokens | seq len | lr | theta | final loss | val loss "
              "| tok/s | MFU | wall time |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for stage in stages:
        s = summaries[stage]
        c = s["config"]
        theta = c.get("rope_theta") or "-"
        val = "-" if s["final_val_loss"] is None else f"{s['final_val_loss']:.3f}"
        lines.append(f"| {c['stage']} | {s['steps']:,} | {s['tokens']:,} | {c['data']['seq_len']} | "
                     f"{c['optim']['lr']:g} | {theta} | {s['final_loss']:.3f} | {val} | {s['tok_s']:,.0f} | "
                     f"{s['mfu']:.1%} | {times.get(_time_key(stage), 0) / 60:.1f} min |")
    first = summaries[stages[0]]["config"]
    precision = "bf16 autocast" if device else "fp32"
    extras = ", torch.compile, fused AdamW" if first.get("compile") else ""
    budget = (" Stages ran to time budgets (`--time-budget`: the cosine schedule ends when the budget does)."
              if first.get("time_budget") else "")
    lines += [
        "",
        "Pretraining applies the infilling transform to 90% of the documents that fit in a row (PSM/SPM "
        "half-half, split points drawn uniformly at character level; longer documents stay left-to-right); "
        f"long-context fine-tuning raises RoPE theta 1e4 -> 1e6 and the context {contexts[0]:,} -> "
        f"{contexts[-1]:,}; the instruct variant is tuned on docstring -> function dialogs mined from the corpus "
        f"with 8% pretraining rehearsal. AdamW (0.9, 0.95), cosine to peak/30, weight decay 0.1, clip 1.0, "
        f"{precision}{extras}.{budget} Learning rates are higher than the paper's (which are for 7B+ models) "
        "because the model is small and the stages short.",
        "",
        f"Hardware: {device}." if device else
        f"Hardware: {platform.processor() or platform.machine()}, 2 cores, {torch.get_num_threads()} threads, "
        "no GPU (the machine was shared with other work during training).",
        "",
        "Loss curves:",
        "",
    ]
    lines += [f"![{stage} loss]({stage}_loss.png)" for stage in stages]
    lines += ["", "## Samples", "", samples(model_dir, instruct), ""]
    if compare is not None:
        val_losses = read_jsonl(run / "val_loss.json") if (run / "val_loss.json").is_file() else []
        lines += ["## Old vs new", "", "The previous default (8.6M parameters, 6.8M tokens on 2 CPU cores, "
                  "`runs/default_model.sh`) and this one, with the same tokenizer, evaluated the same way (greedy, "
                  "token healing on completion prompts, the subsets below):", "",
                  comparison(*compare, val_losses), ""]
    if evaluation is not None:
        summary = (evaluation / "SUMMARY.md").read_text().strip().removeprefix("# codellm eval summary").strip()
        lines += ["## Evaluation", "", f"`codellm eval` on models/{name}, greedy pass@1 (which problems were "
                  "scored is said below the table):", "", summary, ""]
    return "\n".join(lines)


def _time_key(stage: str) -> str:
    return {"long": "long-context"}.get(stage, stage)


def ship(run: Path, name: str, stage_dir: str, stages: list[str], out: Path, instruct: bool,
         evaluation: Path | None = None, compare: tuple[Path, Path] | None = None) -> Path:
    model = load_model(run / stage_dir / "final")
    target = save_model(model, out / name, tokenizer_dir=run / stage_dir / "final", dtype="bfloat16")
    for stage in stages:
        shutil.copy2(run / stage / "loss.png", target / f"{stage}_loss.png")
    if evaluation is not None and (evaluation / "report.png").is_file():
        shutil.copy2(evaluation / "report.png", target / "report.png")  # the chart SUMMARY.md shows
    (target / "MODEL_CARD.md").write_text(card(run, name, stages, target, instruct, evaluation, compare))
    return target


def unpack_gpu_files(files: Path, run: Path) -> None:
    """records.tar.gz into `run`, the base and instruct shards into run/long/final and run/sft/final."""
    run.mkdir(parents=True, exist_ok=True)
    with tarfile.open(files / "records.tar.gz") as tar:
        tar.extractall(run, filter="data")
    helper = Path(__file__).with_name("gpu_default.py")
    for name, stage in (("base", "long"), ("instruct", "sft")):
        training = (run / stage / "final" / "training.json").read_text()
        subprocess.run([sys.executable, str(helper), "unpack", str(files), name, str(run / stage / "final")],
                       check=True)
        (run / stage / "final" / "training.json").write_text(training)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, default=Path("runs/default"))
    ap.add_argument("--out", type=Path, default=Path("models"))
    ap.add_argument("--gpu-files", type=Path, help="runs/gpu_default.sh's $OUT files, unpacked into --run first")
    ap.add_argument("--eval-base", type=Path, help="eval folder with a SUMMARY.md for the base model")
    ap.add_argument("--eval-instruct", type=Path, help="eval folder with a SUMMARY.md for the instruct model")
    ap.add_argument("--compare", type=Path, nargs=2, metavar=("OLD_EVAL", "NEW_EVAL"),
                    help="eval folders of the old and the new base model, for the old-vs-new table")
    args = ap.parse_args()
    for flag, folder in (("--eval-base", args.eval_base), ("--eval-instruct", args.eval_instruct)):
        if folder is not None and not (folder / "SUMMARY.md").is_file():
            ap.error(f"{flag} {folder}: no SUMMARY.md there (make it with runs/eval_default.sh)")
    if args.gpu_files is not None:
        if not (args.gpu_files / "records.tar.gz").is_file():
            ap.error(f"--gpu-files {args.gpu_files}: no records.tar.gz there (runs/gpu_default.sh writes it to $OUT)")
        unpack_gpu_files(args.gpu_files, args.run)
    compare = tuple(args.compare) if args.compare else None
    print(ship(args.run, "default", "long", ["pretrain", "long"], args.out, False, args.eval_base, compare))
    print(ship(args.run, "default-instruct", "sft", ["pretrain", "long", "sft"], args.out, True, args.eval_instruct))


if __name__ == "__main__":
    main()
