"""`codellm train --stage pretrain|long-context|python|sft ...` and `codellm train plot RUN_DIR`.

Every flag overrides the stage preset field of the same name (codellm/train/config.py). Also runs alone
and under torchrun: `torchrun --nproc_per_node 2 -m codellm.train.cli train --stage pretrain ...`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from codellm.errors import UserError
from codellm.train.config import STAGES, TrainConfig, apply_overrides, short_run_warnings

# (flag, type, help) per config field; the field name is the flag without dashes, "-" -> "_"
RUN_FLAGS = [
    ("--out", str, "run directory: config.json, metrics.jsonl, checkpoints/, final/"),
    ("--init", str, "HF checkpoint to continue from (required for every stage but pretrain)"),
    ("--model-preset", str, "model preset when pretraining from scratch (default: default)"),
    ("--tokenizer", str, "tokenizer directory (default: the --init checkpoint's)"),
    ("--rope-theta", float, "set RoPE theta (long-context default: 1e6)"),
    ("--seq-len-multiplier", int, "long-context: new context = init context x this (default 4)"),
    ("--steps", int, "optimizer steps"),
    ("--batch-tokens", int, "tokens per optimizer step over all ranks (a multiple of rows x seq-len x ranks)"),
    ("--micro-batch-size", int, "rows per forward pass on one rank (gradient accumulation fills the rest)"),
    ("--seed", int, "seed of the initialisation and of the data order/transform"),
    ("--device", str, "auto (default: cuda when a GPU is there, else cpu), cpu, cuda, cuda:1, ..."),
    ("--precision", str, "auto (bf16 autocast on CUDA), bf16 or fp32"),
    ("--log-every", int, "steps between progress lines"),
    ("--eval-every", int, "steps between validation losses (0 = off)"),
    ("--eval-batches", int, "micro-batches per validation"),
    ("--save-every", int, "steps between resumable checkpoints (0 = off; a multiple of --log-every)"),
    ("--keep-last", int, "resumable checkpoints to keep"),
    ("--peak-tflops", float, "device peak for the MFU estimate (default: datasheet or measured)"),
    ("--time-budget", float, "end the run after this many seconds of training steps, the cosine schedule "
                             "fitted to it (--steps stays an upper bound; 0 = off)"),
]
OPTIM_FLAGS = [
    ("--lr", float, "peak learning rate"),
    ("--min-lr-ratio", float, "final lr / peak lr (default 1/30)"),
    ("--warmup-steps", int, "linear warm-up steps"),
    ("--weight-decay", float, "AdamW weight decay on matrices (default 0.1)"),
    ("--beta1", float, "AdamW beta1 (0.9)"),
    ("--beta2", float, "AdamW beta2 (0.95)"),
    ("--eps", float, "AdamW epsilon (1e-5)"),
    ("--grad-clip", float, "max gradient norm (1.0; 0 = off)"),
]
DATA_FLAGS = [
    ("--corpus", str, "corpus directory from `codellm data build` (JSONL documents per split)"),
    ("--seq-len", int, "tokens per training row (default: the model's context)"),
    ("--fim-rate", float, "share of documents made infilling examples (pretrain 0.9, python 0)"),
    ("--spm-rate", float, "share of infilling examples in SPM order (0.5)"),
    ("--fim-level", str, "document: only documents that fit a row become infilling examples (the paper); "
                         "context: longer ones are first cut into row-sized pieces (Bavarian et al.)"),
    ("--mined-share", float, "sft: share of docstring-mined dialogs when --sft-data is given (0.5)"),
    ("--rehearsal", float, "sft: share of pretraining documents mixed in (0.08)"),
    ("--interleave", int, "documents packed at once, each row continuing a random one, so a long file "
                          "spreads over many steps (8; 1 = in order)"),
    ("--data-workers", int, "processes that tokenize and pack batches, for a GPU that outruns one thread "
                            "(0 = one background thread; resume with the same number)"),
]


def add_parser(subparsers) -> None:
    """Add `train` (and `train plot`) to an argparse subparsers object; each sets `func`."""
    configure(subparsers.add_parser("train", help="train a model: pretrain, long-context, python, sft",
                                    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter))


def configure(p: argparse.ArgumentParser) -> None:
    actions = p.add_subparsers(dest="train_action", metavar="plot | val-loss")
    plot = actions.add_parser("plot", help="render RUN_DIR/metrics.jsonl as a PNG of the loss curves")
    plot.add_argument("run_dir", type=Path, metavar="RUN_DIR")
    plot.add_argument("--png", type=Path, default=None, help="output file (default: RUN_DIR/loss.png)")
    plot.set_defaults(func=run_plot)
    loss = actions.add_parser("val-loss", help="a model's loss on a corpus split, rows drawn as training "
                                               "validates (compare models that share a tokenizer)")
    loss.add_argument("model", metavar="MODEL_DIR")
    loss.add_argument("--corpus", required=True, metavar="DIR", help="corpus from `codellm data build`")
    loss.add_argument("--split", default="val", choices=("train", "val"))
    loss.add_argument("--seq-len", type=int, default=512, help="tokens per row (default 512)")
    loss.add_argument("--rows", type=int, default=8, help="rows per batch (default 8)")
    loss.add_argument("--batches", type=int, default=16, help="batches scored (default 16)")
    loss.add_argument("--fim-rate", type=float, default=0.9, help="share of infilling examples, as training (0.9)")
    loss.add_argument("--device", default="auto", help="auto (default: cuda when a GPU is there), cpu, cuda")
    loss.add_argument("--json", action="store_true", help="print one JSON object")
    loss.set_defaults(func=run_val_loss)

    p.add_argument("--stage", choices=STAGES, help="which Code Llama stage's preset to start from")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    for title, flags in (("run", RUN_FLAGS), ("optimizer", OPTIM_FLAGS), ("data", DATA_FLAGS)):
        g = p.add_argument_group(title)
        for flag, kind, help_text in flags:
            metavar = "DIR" if flag in ("--out", "--init", "--tokenizer", "--corpus") else None
            g.add_argument(flag, type=kind, default=None, metavar=metavar, help=help_text)
    g = p.add_argument_group("flags")
    g.add_argument("--fsdp", action="store_const", const=True, help="shard the model across ranks (FSDP)")
    g.add_argument("--compile", action="store_const", const=True,
                   help="torch.compile the forward and loss (GPU: faster steps after a compile of ~1 min)")
    g.add_argument("--lang", dest="langs", action="append", metavar="LANG",
                   help="keep documents of this language, e.g. python (repeatable)")
    g.add_argument("--sft-data", action="append", metavar="FILE",
                   help="sft: JSONL of {system?, messages} dialogs (repeatable)")
    g.add_argument("--no-mine-docstrings", dest="mine_docstrings", action="store_const", const=False,
                   help="sft: do not mine docstring -> function dialogs from the corpus")
    p.set_defaults(func=run_train)


def overrides(args: argparse.Namespace) -> dict:
    names = [f.lstrip("-").replace("-", "_") for f, _, _ in RUN_FLAGS + OPTIM_FLAGS + DATA_FLAGS]
    names += ["fsdp", "compile", "langs", "sft_data", "mine_docstrings"]
    return {n: getattr(args, n) for n in names if getattr(args, n) is not None}


# What --resume may change: how the run is watched, saved and placed, which leaves its numbers as they were,
# and --steps, which stretches (or shortens) the cosine schedule from the checkpoint on (logged). Anything
# else (learning rate, batch, data, model, seed, precision, time budget) would silently make a different run.
RESUME_MAY_CHANGE = ("steps", "device", "log_every", "eval_every", "eval_batches", "save_every", "keep_last",
                     "peak_tflops", "compile", "fsdp")


def run_train(args: argparse.Namespace) -> None:
    from codellm.train.loop import train

    if args.resume:
        cfg = resume_config(args)
    elif args.stage is None:
        raise UserError(f"--stage is required ({', '.join(STAGES)}), or `train plot RUN_DIR`")
    else:
        cfg = TrainConfig.for_stage(args.stage, **overrides(args))
        for warning in short_run_warnings(cfg, set(overrides(args))):
            _note(f"warning: {warning}")
    train(cfg, resume=args.resume)


def resume_config(args: argparse.Namespace) -> TrainConfig:
    """The saved config of the run in --out with the changes --resume allows; any other change is an error."""
    from codellm.train.checkpoints import checkpoint_dirs
    from codellm.train.loop import lr_at

    cfg = saved_config(args.out)
    if args.stage not in (None, cfg.stage):
        raise UserError(f"--stage {args.stage}: the run in {args.out} is a {cfg.stage} run")
    given = overrides(args)
    changed = {name: (setting(cfg, name), value) for name, value in given.items()
               if _same(setting(cfg, name)) != _same(value)}
    refused = [name for name in changed if name not in RESUME_MAY_CHANGE]
    if refused:
        what = ", ".join(f"{_flag(n)} {_show(changed[n][0])} -> {_show(changed[n][1])}" for n in refused)
        raise UserError(f"--resume would change the run in {args.out}: {what}. Resume with its own settings "
                        f"(only {', '.join(_flag(n) for n in RESUME_MAY_CHANGE)} may change), or start a new run "
                        "with a new --out")
    old_steps = cfg.steps
    apply_overrides(cfg, given)
    cfg.validate()
    found = checkpoint_dirs(cfg.out)
    if "steps" in changed and found:
        at = int(found[-1].name.removeprefix("step_"))
        if cfg.steps <= at:
            raise UserError(f"--steps {cfg.steps}: the run's latest checkpoint is already at step {at}")
        _note(f"resume: --steps {old_steps} -> {cfg.steps}: the cosine schedule now ends at step {cfg.steps}; the "
              f"learning rate at step {at + 1} moves from {lr_at(at, old_steps, cfg.optim):.2e} to "
              f"{lr_at(at, cfg.steps, cfg.optim):.2e}")
    for name in changed.keys() - {"steps"}:
        _note(f"resume: {_flag(name)} {_show(changed[name][0])} -> {_show(changed[name][1])}")
    return cfg


def setting(cfg: TrainConfig, name: str):
    return next(getattr(s, name) for s in (cfg, cfg.optim, cfg.data) if hasattr(s, name))


def _same(value):
    return tuple(value) if isinstance(value, list | tuple) else value


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _show(value) -> str:
    return ",".join(map(str, value)) if isinstance(value, list | tuple) else str(value)


def _note(line: str) -> None:
    """A line on stderr from rank 0 (under torchrun every rank runs this)."""
    if os.environ.get("RANK", "0") == "0":
        print(f"codellm: {line}", file=sys.stderr, flush=True)


def saved_config(out: str | None) -> TrainConfig:
    if out is None:
        raise UserError("--resume needs --out RUN_DIR")
    path = Path(out) / "config.json"
    if not path.is_file():
        raise UserError(f"--resume: {path} does not exist")
    return TrainConfig.from_dict(json.loads(path.read_text()))


def run_val_loss(args: argparse.Namespace) -> None:
    from codellm.train.loop import corpus_loss

    for name in ("seq_len", "rows", "batches"):
        if getattr(args, name) <= 0:
            raise UserError(f"--{name.replace('_', '-')} {getattr(args, name)}: must be positive")
    if not 0 <= args.fim_rate <= 1:
        raise UserError(f"--fim-rate {args.fim_rate}: must be in [0, 1]")
    loss, tokens = corpus_loss(args.model, args.corpus, args.seq_len, args.batches, args.rows, args.device,
                               args.fim_rate, args.split)
    if args.json:
        print(json.dumps({"model": args.model, "corpus": args.corpus, "split": args.split, "loss": loss,
                          "tokens": tokens, "seq_len": args.seq_len, "fim_rate": args.fim_rate}))
    else:
        print(f"{args.model}: {args.split} loss {loss:.4f} nats/token over {tokens:,} tokens "
              f"(seq_len {args.seq_len}, fim_rate {args.fim_rate})")


def run_plot(args: argparse.Namespace) -> None:
    from codellm.train.plot import plot_run

    print(plot_run(args.run_dir, args.png))


def main(argv: list[str] | None = None) -> int:
    from codellm.options import run_standalone

    return run_standalone(add_parser, argv)


if __name__ == "__main__":
    sys.exit(main())
