"""Training configuration: one dataclass per concern, one preset per Code Llama stage.

A run is `TrainConfig.for_stage(stage, **flags)`: the stage preset fills every field, command-line flags
override any of them by field name, and the result is written to RUN_DIR/config.json. The numbers follow
the Code Llama paper (RECIPE.md §1.5-1.9), scaled to the small `default` model: the paper's 4M-token
batches, 4,096-token contexts and 1,000 warm-up steps become 256K tokens, 1,024 tokens and 1,000 steps.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from codellm.errors import UserError

STAGES = ("pretrain", "long-context", "python", "sft")


@dataclass
class OptimConfig:
    lr: float = 3e-4  # peak learning rate, reached after the warm-up
    min_lr_ratio: float = 1 / 30  # cosine decays to lr * this (the paper: peak/30)
    warmup_steps: int = 1000  # linear warm-up from 0
    weight_decay: float = 0.1  # on matrices except the token embedding (see loop.param_groups)
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-5  # Llama 2 pretraining (the Code Llama paper does not say)
    grad_clip: float = 1.0  # max global gradient norm; 0 = off


@dataclass
class DataConfig:
    corpus: str | None = None  # corpus directory (codellm data build): JSONL shards per split
    seq_len: int | None = None  # tokens per training row; None = the model's context
    fim_rate: float = 0.9  # share of documents turned into infilling examples
    spm_rate: float = 0.5  # share of infilling examples in SPM order (the rest PSM)
    fim_level: str = "document"  # document: FIM only for documents that fit a row (paper); context: cut first
    langs: tuple[str, ...] = ()  # keep only documents of these languages; () = all
    sft_data: tuple[str, ...] = ()  # JSONL files of {"system"?, "messages": [...]} dialogs
    mine_docstrings: bool = True  # sft: docstring -> function pairs from the corpus Python files
    mined_share: float = 0.5  # sft: share of mined pairs among SFT examples when --sft-data is given
    rehearsal: float = 0.0  # share of pretraining documents mixed into SFT (the paper: 6% code + 2% NL)
    interleave: int = 8  # documents packed at once, rows continuing a random one (SFT packs 1 at a time)
    data_workers: int = 0  # processes that tokenize and pack (feeders.WorkerPool); 0 = one background thread


@dataclass
class TrainConfig:
    stage: str = "pretrain"
    out: str | None = None  # run directory
    init: str | None = None  # HF checkpoint to start from; None = a fresh `model_preset`
    model_preset: str = "default"  # codellm.config preset when training from scratch
    tokenizer: str | None = None  # tokenizer directory; None = the --init checkpoint's
    rope_theta: float | None = None  # set RoPE base period (long-context: 1e4 -> 1e6); None = keep
    seq_len_multiplier: int = 1  # long-context: context = init's context x this
    steps: int = 20_000
    batch_tokens: int = 262_144  # tokens per optimizer step, all ranks and micro-batches together
    micro_batch_size: int = 16  # rows per forward pass on one rank
    seed: int = 0
    device: str | None = None  # None = cuda if available, else cpu
    precision: str = "auto"  # auto (bf16 autocast on CUDA with bf16, fp32 elsewhere) | bf16 | fp32
    fsdp: bool = False  # shard parameters, gradients and optimizer state across ranks
    log_every: int = 10
    eval_every: int = 500
    eval_batches: int = 20  # micro-batches of the val split per evaluation
    save_every: int = 1000
    keep_last: int = 3  # training-state checkpoints to keep
    peak_tflops: float | None = None  # device peak for the MFU estimate; None = look up or measure
    compile: bool = False  # torch.compile the forward + loss (worth it on a GPU; the first step compiles)
    time_budget: float = 0.0  # seconds of optimizer steps after which the run ends, cosine fitted to it; 0 = off
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)

    @classmethod
    def for_stage(cls, stage: str, **overrides) -> TrainConfig:
        if stage not in STAGE_PRESETS:
            raise UserError(f"--stage must be one of {', '.join(STAGES)}, got {stage!r}")
        cfg = cls(stage=stage)
        apply_overrides(cfg, {**STAGE_PRESETS[stage], **overrides})
        cfg.validate()
        return cfg

    def validate(self) -> None:
        checks = {
            "steps": self.steps > 0, "batch_tokens": self.batch_tokens > 0,
            "micro_batch_size": self.micro_batch_size > 0, "seq_len_multiplier": self.seq_len_multiplier >= 1,
            "lr": self.optim.lr > 0, "warmup_steps": self.optim.warmup_steps >= 0,
            "fim_rate": 0 <= self.data.fim_rate <= 1, "spm_rate": 0 <= self.data.spm_rate <= 1,
            "rehearsal": 0 <= self.data.rehearsal < 1, "mined_share": 0 <= self.data.mined_share <= 1,
            "interleave": self.data.interleave >= 1, "data_workers": self.data.data_workers >= 0,
            "time_budget": self.time_budget >= 0,
            "log_every": self.log_every > 0, "eval_every": self.eval_every >= 0,
            "save_every": self.save_every >= 0, "keep_last": self.keep_last >= 1,
            "precision": self.precision in ("auto", "bf16", "fp32"),
            "fim_level": self.data.fim_level in ("document", "context"),
        }
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            raise UserError(f"invalid training setting(s): {', '.join(bad)} (rates lie in [0, 1], counts "
                            "are positive, precision is auto|bf16|fp32, fim level document|context)")
        if self.save_every % self.log_every:
            raise UserError(f"--save-every {self.save_every} must be a multiple of --log-every {self.log_every} "
                            "(a resumed run's logged losses then average the same steps)")
        if self.out is None:
            raise UserError("--out RUN_DIR is required")
        if self.data.corpus is None and not (self.stage == "sft" and self.data.sft_data):
            raise UserError("--corpus DIR is required (only sft can do without, given --sft-data)")
        if self.stage != "pretrain" and self.init is None:
            raise UserError(f"--stage {self.stage} continues a model: pass --init CHECKPOINT_DIR")
        if self.init is None and self.tokenizer is None:
            raise UserError("training from scratch needs --tokenizer DIR (or --init CHECKPOINT_DIR)")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        """Inverse of `to_dict` (RUN_DIR/config.json)."""
        top = {k: v for k, v in d.items() if k not in ("optim", "data")}
        data = {k: tuple(v) if isinstance(v, list) else v for k, v in d["data"].items()}
        data.setdefault("interleave", 1)  # runs saved before interleaving packed in order, and resume so
        return cls(**top, optim=OptimConfig(**d["optim"]), data=DataConfig(**data))


def short_run_warnings(cfg: TrainConfig, given: set[str]) -> list[str]:
    """What makes a run too short for its settings, most often a stage preset fitted to a real run used for a
    short try: `given` names the settings set on the command line."""
    o, preset, warnings = cfg.optim, STAGE_PRESETS[cfg.stage], []
    if 2 * o.warmup_steps > cfg.steps:
        share = "all" if o.warmup_steps >= cfg.steps else "over half"
        warnings.append(f"--warmup-steps {o.warmup_steps} is {share} of --steps {cfg.steps}: the learning rate "
                        + ("never reaches" if o.warmup_steps >= cfg.steps else "barely stays at")
                        + f" its peak {o.lr:g}; pass a shorter --warmup-steps (e.g. {max(1, cfg.steps // 10)})")
    if "batch_tokens" not in given and cfg.steps * 10 < preset["steps"]:
        warnings.append(f"--steps {cfg.steps} with the {cfg.stage} preset's {cfg.batch_tokens:,}-token batches, "
                        f"sized for {preset['steps']:,}-step runs on a GPU: pass --batch-tokens (and "
                        "--micro-batch-size) for a short try")
    return warnings


def apply_overrides(cfg: TrainConfig, overrides: dict) -> None:
    """Set fields by name, wherever they live (field names are unique across the sections)."""
    sections = [cfg, cfg.optim, cfg.data]
    for name, value in overrides.items():
        owner = next((s for s in sections if name in {f.name for f in dataclasses.fields(s)}), None)
        if owner is None or name in ("optim", "data"):
            raise UserError(f"unknown training setting {name!r}")
        setattr(owner, name, tuple(value) if isinstance(value, list) else value)


# Code Llama stages (RECIPE.md): peak lr, schedule length and objective per stage.
STAGE_PRESETS: dict[str, dict] = {
    # code training: AR + FIM on 90% of documents, half PSM half SPM; lr 3e-4 (7B/13B)
    "pretrain": dict(lr=3e-4, warmup_steps=1000, steps=20_000, batch_tokens=262_144, micro_batch_size=16,
                     fim_rate=0.9),
    # LCFT: 4x context, RoPE theta -> 1e6, lr 2e-5 (~1/15 of the code peak), same objective
    "long-context": dict(lr=2e-5, warmup_steps=100, steps=2_000, batch_tokens=262_144, micro_batch_size=4,
                         fim_rate=0.9, rope_theta=1e6, seq_len_multiplier=4),
    # Python specialisation: Python documents only, lr 1e-4, no FIM
    "python": dict(lr=1e-4, warmup_steps=200, steps=5_000, batch_tokens=262_144, micro_batch_size=16,
                   fim_rate=0.0, langs=("python",)),
    # Instruct: [INST] dialogs, loss on answers only, 8% pretraining rehearsal (keeps FIM alive);
    # lr 2e-5 as Llama 2 SFT; 64K-token batches (the paper's 524,288 = 128 x 4,096, scaled by 1/8)
    "sft": dict(lr=2e-5, warmup_steps=100, steps=2_000, batch_tokens=65_536, micro_batch_size=16,
                fim_rate=0.9, rehearsal=0.08),
}
