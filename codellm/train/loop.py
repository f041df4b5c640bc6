"""The one training loop; the stages differ only in their config and their batch source (batches.py).

Per optimizer step: draw all micro-batches of the step, count the loss-weighted target tokens over all
ranks, then forward/backward each micro-batch (bf16 autocast where enabled) scaled so the gradient is
the mean over those tokens, clip, and step AdamW at the scheduled learning rate (linear warm-up, cosine
to lr x min_lr_ratio). Weight decay applies to the projection matrices and the output head, not to norm
gains or the token embedding: AdamW's decoupled decay shrinks every row of the embedding each step,
including rows of rare tokens that get no gradient to hold them up.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from codellm.checkpoint import load_model, save_model
from codellm.config import ModelConfig
from codellm.errors import UserError
from codellm.model import Transformer
from codellm.tokenizer import Tokenizer, load_tokenizer
from codellm.train import checkpoints, distributed
from codellm.train.batches import make_batches, sft_summary
from codellm.train.config import OptimConfig, TrainConfig
from codellm.train.distributed import Dist
from codellm.train.feeders import Prefetcher, WorkerPool
from codellm.train.progress import MetricsLog, flops_per_token, peak_flops, progress_line


def lr_at(step: int, steps: int, o: OptimConfig, time_done: float = 0.0) -> float:
    """Learning rate of optimizer step `step` (0-based). With a time budget, `time_done` (the share of it
    spent) moves the cosine too: the schedule follows whichever of steps and time runs out first."""
    if step < o.warmup_steps:
        return o.lr * (step + 1) / o.warmup_steps
    progress = max((step - o.warmup_steps) / max(1, steps - o.warmup_steps), min(time_done, 1.0))
    low = o.lr * o.min_lr_ratio
    return low + 0.5 * (o.lr - low) * (1 + math.cos(math.pi * progress))


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: decay on matrices except the token embedding, none on norm gains and the embedding."""
    named = list(model.named_parameters())
    decays = {n for n, p in named if p.dim() >= 2 and not n.startswith("embed_tokens")}
    return [{"params": [p for n, p in named if n in decays], "weight_decay": weight_decay},
            {"params": [p for n, p in named if n not in decays], "weight_decay": 0.0}]


def initial_model(cfg: TrainConfig, tok: Tokenizer) -> Transformer:
    """The model a fresh run starts from, with the run's context length and RoPE theta applied."""
    seq_len = cfg.data.seq_len
    if cfg.init is None:
        mcfg = ModelConfig.from_preset(cfg.model_preset, vocab_size=tok.vocab_size, bos_id=tok.bos_id,
                                       eos_id=tok.eos_id)
        if seq_len and seq_len > mcfg.max_seq_len * cfg.seq_len_multiplier:
            raise UserError(f"--seq-len {seq_len} exceeds the {cfg.model_preset} preset's context {mcfg.max_seq_len}"
                            + (f" x --seq-len-multiplier {cfg.seq_len_multiplier}" if cfg.seq_len_multiplier > 1
                               else "")
                            + "; pretrain within it and extend it with --stage long-context")
        mcfg = mcfg.replace(max_seq_len=seq_len or mcfg.max_seq_len, rope_theta=cfg.rope_theta or mcfg.rope_theta)
        return Transformer(mcfg).init_weights(cfg.seed)
    model = load_model(cfg.init, dtype="float32")
    mcfg = model.cfg
    if tok.vocab_size > mcfg.vocab_size:
        raise UserError(f"tokenizer has {tok.vocab_size} tokens but --init {cfg.init} only {mcfg.vocab_size}")
    context = seq_len or mcfg.max_seq_len * cfg.seq_len_multiplier
    if context > mcfg.max_seq_len * cfg.seq_len_multiplier:
        raise UserError(f"--seq-len {context} exceeds the model's context {mcfg.max_seq_len} x "
                        f"--seq-len-multiplier {cfg.seq_len_multiplier}; extend it with --stage long-context")
    mcfg = mcfg.replace(max_seq_len=max(context, mcfg.max_seq_len), rope_theta=cfg.rope_theta or mcfg.rope_theta)
    with torch.device("meta"):  # no second random copy of the weights
        out = Transformer(mcfg)
    out.load_state_dict(model.state_dict(), assign=True)
    return out


def micro_steps(cfg: TrainConfig, seq_len: int, world: int) -> int:
    per_pass = cfg.micro_batch_size * seq_len * world
    if cfg.batch_tokens % per_pass:
        raise UserError(f"--batch-tokens {cfg.batch_tokens} must be a multiple of micro-batch-size x seq-len "
                        f"x ranks = {cfg.micro_batch_size} x {seq_len} x {world} = {per_pass}")
    return cfg.batch_tokens // per_pass


def loss_sum(model: nn.Module, tokens: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Sum over target positions of weight x cross-entropy; rows are (B, seq_len + 1)."""
    logits = model(tokens[:, :-1])
    ce = F.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten(), reduction="none")
    return (ce * weights[:, 1:].flatten()).sum()


def train_step(wrapped: nn.Module, opt: torch.optim.Optimizer, micro: list[tuple[torch.Tensor, torch.Tensor]],
               grad_clip: float, d: Dist, autocast, loss_fn=loss_sum) -> tuple[torch.Tensor, float, torch.Tensor]:
    """One optimizer step over the micro-batches (tokens, weights) of this rank; returns (summed weighted
    loss on this rank, the weight over all ranks, the gradient norm before clipping)."""
    accum = len(micro)
    (count,) = distributed.all_reduce_sum([sum(float(w[:, 1:].sum()) for _, w in micro)], d)
    total = torch.zeros((), device=d.device)
    for i, (tokens, weights) in enumerate(micro):
        tokens, weights = tokens.to(d.device, non_blocking=True), weights.to(d.device, non_blocking=True)
        with distributed.no_grad_sync(wrapped, sync=i == accum - 1), autocast():
            loss = loss_fn(wrapped, tokens, weights)
        # DDP/FSDP average gradients over ranks; the token mean over all ranks needs x world
        (loss * (d.world / max(count, 1.0))).backward()
        total += loss.detach()
    norm = torch.nn.utils.clip_grad_norm_(wrapped.parameters(), grad_clip or float("inf"))
    opt.step()
    opt.zero_grad(set_to_none=True)
    return total, count, norm


@torch.no_grad()
def evaluate(wrapped: nn.Module, cfg: TrainConfig, tok: Tokenizer, seq_len: int, d: Dist, autocast,
             split: str = "val") -> float | None:
    """Mean loss over `eval_batches` micro-batches of the val split (the same ones every time)."""
    batches = make_batches(cfg, tok, seq_len, split, d.rank, d.world)
    if batches is None:
        return None
    wrapped.eval()
    total = count = 0.0
    for _ in range(cfg.eval_batches):
        tokens, weights = batches.next_batch(cfg.micro_batch_size)
        with autocast():
            total += float(loss_sum(wrapped, tokens.to(d.device), weights.to(d.device)))
        count += float(weights[:, 1:].sum())
    wrapped.train()
    total, count = distributed.all_reduce_sum([total, count], d)
    return total / max(count, 1.0)


def corpus_loss(model_dir: str, corpus: str, seq_len: int, batches: int, rows: int, device: str | None,
                fim_rate: float = 0.9, split: str = "val", seed: int = 0) -> tuple[float, int]:
    """(mean loss in nats per target token, tokens scored) of a saved model on a corpus split, the way
    training validates: the same rows for any model with the same tokenizer, so two models compare."""
    from codellm.options import resolve_device

    d = distributed.Dist(0, 1, torch.device(resolve_device(device)))
    model = load_model(model_dir, dtype="float32").to(d.device)
    if seq_len > model.cfg.max_seq_len:
        raise UserError(f"--seq-len {seq_len} exceeds the model's context {model.cfg.max_seq_len}")
    cfg = TrainConfig(stage="pretrain", init=model_dir, micro_batch_size=rows, eval_batches=batches, seed=seed)
    cfg.data.corpus, cfg.data.fim_rate = corpus, fim_rate
    loss = evaluate(model, cfg, load_tokenizer(model_dir), seq_len, d,
                    partial(autocast, d.device, uses_bf16(d.device, "auto")), split)
    if loss is None:
        raise UserError(f"--corpus {corpus}: no {split} documents")
    return loss, batches * rows * seq_len


def train(cfg: TrainConfig, resume: bool = False) -> Path:
    """Run (or resume) training; returns RUN_DIR/final, the HF-layout model."""
    d = distributed.setup(cfg.device)
    try:
        run = _setup(cfg, resume, d)
        try:
            return _loop(run)
        finally:
            run.batches.close()
    finally:
        distributed.teardown()


@dataclass
class Run:
    """Everything one training run holds."""

    cfg: TrainConfig
    d: Dist
    tok: Tokenizer
    model: Transformer  # unwrapped (under FSDP, sharded in place)
    wrapped: nn.Module  # what forward/backward go through: the model, DDP or FSDP
    opt: torch.optim.Optimizer
    batches: Prefetcher | WorkerPool
    accum: int  # micro-batches per optimizer step on each rank
    resumed_from: Path | None
    step: int = 0
    tokens: int = 0
    train_seconds: float = 0.0  # time in optimizer steps (not evals, saves, or a --compile first step)
    loss_fn: object = loss_sum  # loss_sum, or its torch.compile'd version

    @property
    def time_done(self) -> float:
        """Share of --time-budget spent (0 without one)."""
        return self.train_seconds / self.cfg.time_budget if self.cfg.time_budget else 0.0

    @property
    def run_dir(self) -> Path:
        return Path(self.cfg.out)

    @property
    def tok_dir(self) -> Path:
        return Path(self.cfg.tokenizer or self.cfg.init)

    @property
    def bf16(self) -> bool:
        return uses_bf16(self.d.device, self.cfg.precision)

    def autocast(self):
        return autocast(self.d.device, self.bf16)


def uses_bf16(device: torch.device, precision: str) -> bool:
    """bf16 autocast: asked for, or by default where the hardware has it (CUDA with bf16)."""
    cuda_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    return precision == "bf16" or (precision == "auto" and cuda_bf16)


def autocast(device: torch.device, bf16: bool):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)


def _setup(cfg: TrainConfig, resume: bool, d: Dist) -> Run:
    run_dir = Path(cfg.out)
    tok = load_tokenizer(cfg.tokenizer or cfg.init)
    found = checkpoints.checkpoint_dirs(run_dir)
    if resume and (run_dir / "final" / "training.json").is_file():
        done = json.loads((run_dir / "final" / "training.json").read_text())
        raise UserError(f"--resume: the run in {run_dir} is complete ({run_dir / 'final'} holds step "
                        f"{done['steps']:,} of {done['config']['steps']:,}); nothing to resume. To train further, "
                        f"start a new run from it: --init {run_dir / 'final'} --out NEW_DIR")
    if resume and not found:
        raise UserError(f"--resume: {run_dir}/checkpoints has no complete checkpoint")
    if not resume and (run_dir / "config.json").exists():
        hint = "pass --resume to continue it" if found else "it has no checkpoint to resume: delete it"
        raise UserError(f"{run_dir} already holds a run; {hint}, or choose a new --out")
    ckpt = found[-1] if resume else None
    distributed.barrier(d)  # every rank has looked at the run dir before rank 0 writes into it
    model = load_model(ckpt / "model", dtype="float32") if ckpt else initial_model(cfg, tok)
    cfg.data.seq_len = cfg.data.seq_len or model.cfg.max_seq_len
    accum = micro_steps(cfg, cfg.data.seq_len, d.world)
    if d.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        checkpoints.remove_temp_dirs(run_dir)
        (run_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
    wrapped = distributed.wrap(model.to(d.device).train(), d, cfg.fsdp)
    o = cfg.optim  # the optimizer comes after wrapping: FSDP replaces the parameters
    opt = torch.optim.AdamW(param_groups(model, o.weight_decay), lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps,
                            fused=d.device.type == "cuda")  # one kernel for all parameters
    step = tokens = 0
    train_seconds, data_state = 0.0, None
    if ckpt is not None:
        step, tokens, train_seconds, data_state = _restore(ckpt, model, opt, cfg, d)
    batches = _feeder(cfg, tok, d, accum, data_state)
    loss_fn = torch.compile(loss_sum) if cfg.compile else loss_sum
    return Run(cfg, d, tok, model, wrapped, opt, batches, accum, ckpt, step, tokens, train_seconds, loss_fn)


def _feeder(cfg: TrainConfig, tok: Tokenizer, d: Dist, accum: int, state: dict | None) -> Prefetcher | WorkerPool:
    pin = d.device.type == "cuda"
    if cfg.data.data_workers:
        return WorkerPool(cfg, str(Path(cfg.tokenizer or cfg.init)), cfg.data.seq_len, d.rank, d.world,
                          cfg.micro_batch_size, accum, cfg.data.data_workers, pin, state)
    packer = make_batches(cfg, tok, cfg.data.seq_len, "train", d.rank, d.world)
    if state is not None:
        packer.load_state_dict(state)
    return Prefetcher(packer, cfg.micro_batch_size, accum, pin)


def _loop(run: Run) -> Path:
    cfg, d = run.cfg, run.d
    log = MetricsLog(run.run_dir, d.main, run.step if run.resumed_from else None)
    peak, source = (cfg.peak_tflops * 1e12, "--peak-tflops") if cfg.peak_tflops else peak_flops(d.device, run.bf16)
    flops = flops_per_token(run.model.cfg, cfg.data.seq_len)
    log.print(f"train {cfg.stage}: {run.model.cfg.num_params() / 1e6:.1f}M params | seq_len {cfg.data.seq_len} | "
              f"rope theta {run.model.cfg.rope_theta:g} | {cfg.batch_tokens:,} tokens/step = {d.world} rank(s) x "
              f"{run.accum} x {cfg.micro_batch_size} rows | {'bf16' if run.bf16 else 'fp32'} | peak "
              f"{peak / 1e12:.3g} TFLOP/s ({source})" + (f" | resumed at step {run.step}" if run.resumed_from else ""))
    if cfg.stage == "sft" and d.main:
        log.print(sft_summary(cfg, run.tok))
    if run.resumed_from:  # `train plot` marks it
        log.write({"step": run.step, "tokens": run.tokens, "resumed": True})
    window = _Window()
    first = run.step
    while run.step < cfg.steps and run.time_done < 1.0:
        lr = lr_at(run.step, cfg.steps, cfg.optim, run.time_done)
        for group in run.opt.param_groups:
            group["lr"] = lr
        started = time.perf_counter()
        total, count, norm = train_step(run.wrapped, run.opt, run.batches.next_step(), cfg.optim.grad_clip, d,
                                        run.autocast, run.loss_fn)
        if cfg.time_budget:  # the clock needs the step finished; ranks agree on it so they stop together
            float(norm)
            (elapsed,) = distributed.all_reduce_max([time.perf_counter() - started], d)
            run.train_seconds += elapsed if not (cfg.compile and run.step == first) else 0.0
        run.step, run.tokens = run.step + 1, run.tokens + cfg.batch_tokens
        window.add(total, count)
        step = run.step
        last = step == cfg.steps or run.time_done >= 1.0
        if step % cfg.log_every == 0 or last:
            loss, tok_s = window.flush(d, cfg.batch_tokens)
            mfu = flops * tok_s / (peak * d.world)
            eta = (cfg.steps - step) * cfg.batch_tokens / tok_s
            if cfg.time_budget:
                eta = min(eta, cfg.time_budget - run.train_seconds)
            log.print(progress_line(step, cfg.steps, loss, lr, tok_s, mfu, eta))
            log.write({"step": step, "loss": loss, "lr": lr, "grad_norm": float(norm), "tokens": run.tokens,
                       "tok_s": tok_s, "mfu": mfu})
        paused = time.perf_counter()
        if cfg.eval_every and (step % cfg.eval_every == 0 or last):
            val = evaluate(run.wrapped, cfg, run.tok, cfg.data.seq_len, d, run.autocast)
            if val is not None:
                log.print(f"eval {step:0{max(5, len(str(cfg.steps)))}d}/{cfg.steps} | val_loss {val:.3f}")
                log.write({"step": step, "val_loss": val, "tokens": run.tokens})
        if cfg.save_every and step % cfg.save_every == 0 and not last:
            _save(run)
        window.exclude(time.perf_counter() - paused)
    final = distributed.full_model(run.model, cfg.fsdp, d)
    if d.main:
        info = {"config": cfg.to_dict(), "steps": run.step, "tokens": run.tokens,
                "train_seconds": round(run.train_seconds, 1)}
        save_model(final, run.run_dir / "final", tokenizer_dir=run.tok_dir,
                   extra_files={"training.json": json.dumps(info, indent=2) + "\n"})
        log.print(f"saved {run.run_dir / 'final'}")
    distributed.barrier(d)
    return run.run_dir / "final"


class _Window:
    """Loss and throughput since the last log line; the loss sum stays on the device until then."""

    def __init__(self):
        self.total, self.count, self.steps, self.start = 0.0, 0.0, 0, time.perf_counter()

    def add(self, total: torch.Tensor, count: float) -> None:
        self.total, self.count, self.steps = self.total + total, self.count + count, self.steps + 1

    def exclude(self, seconds: float) -> None:
        """Leave time spent outside training steps (eval, checkpoints) out of the throughput."""
        self.start += seconds

    def flush(self, d: Dist, batch_tokens: int) -> tuple[float, float]:
        (total,) = distributed.all_reduce_sum([float(self.total)], d)
        loss, tok_s = total / max(self.count, 1.0), self.steps * batch_tokens / (time.perf_counter() - self.start)
        self.__init__()
        return loss, tok_s


def _save(run: Run) -> None:
    """Write checkpoints/step_N (every rank takes part: FSDP gathers the full state for rank 0)."""
    cfg, d = run.cfg, run.d
    full = distributed.full_model(run.model, cfg.fsdp, d)
    opt_state = distributed.optimizer_state(run.model, run.opt, cfg.fsdp)
    ranks = distributed.gather({"data": run.batches.state_dict(), **checkpoints.rng_states()}, d)
    if d.main:
        checkpoints.save_checkpoint(run.run_dir, run.step, full, opt_state, ranks,
                                    {"tokens": run.tokens, "train_seconds": run.train_seconds}, run.tok_dir,
                                    cfg.keep_last)
    distributed.barrier(d)


def _restore(ckpt: Path, model: nn.Module, opt: torch.optim.Optimizer, cfg: TrainConfig,
             d: Dist) -> tuple[int, int, float, dict]:
    """Optimizer and RNGs of `ckpt` (the weights were loaded with the model); returns (step, tokens,
    train seconds, this rank's data state) for the feeder."""
    state, opt_state, rng = checkpoints.load_checkpoint(ckpt, d.rank, d.device)
    if state["world"] != d.world:
        raise UserError(f"{ckpt} was written by {state['world']} rank(s); resume with the same number "
                        f"(now {d.world}) so every rank continues its own slice of the data")
    distributed.load_optimizer_state(model, opt, opt_state, cfg.fsdp)
    checkpoints.set_rng_states(rng)
    return state["step"], state["tokens"], state.get("train_seconds", 0.0), state["ranks"][d.rank]["data"]
