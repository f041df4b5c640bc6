"""Model configuration: one dataclass, named presets, derived values computed once.

The presets for Code Llama sizes match Meta's released checkpoints (params.json / HF config.json) and
exist for loading and memory planning; `tiny` is for tests; `default` is the model codellm ships.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from codellm.errors import UserError


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int  # < n_heads means grouped-query attention (Code Llama 34B uses 8 for 64 heads)
    hidden_dim: int  # SwiGLU inner width
    max_seq_len: int  # context length the model was trained for
    rope_theta: float = 10_000.0  # 1e6 for Code Llama (long-context fine-tuning raises it)
    rope_scaling: float = 1.0  # linear position interpolation: positions are divided by this
    norm_eps: float = 1e-5
    bos_id: int = 1
    eos_id: int = 2

    def __post_init__(self):
        checks = {
            "vocab_size": self.vocab_size > 0,
            "dim": self.dim > 0 and self.dim % self.n_heads == 0,
            "n_layers": self.n_layers > 0,
            "n_heads": self.n_heads > 0,
            "n_kv_heads": 0 < self.n_kv_heads <= self.n_heads and self.n_heads % self.n_kv_heads == 0,
            "hidden_dim": self.hidden_dim > 0,
            "max_seq_len": self.max_seq_len > 0,
            "rope_theta": self.rope_theta > 0,
            "rope_scaling": self.rope_scaling >= 1.0,
            "norm_eps": self.norm_eps > 0,
        }
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            values = ", ".join(f"{n}={getattr(self, n)}" for n in bad)
            raise UserError(f"invalid model config: {values} (dim must divide by n_heads, n_heads by "
                            f"n_kv_heads, rope_scaling >= 1)")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    def replace(self, **changes) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    def num_params(self) -> int:
        attn = self.dim * self.head_dim * (2 * self.n_heads + 2 * self.n_kv_heads)
        mlp = 3 * self.dim * self.hidden_dim
        per_layer = attn + mlp + 2 * self.dim
        return 2 * self.vocab_size * self.dim + self.n_layers * per_layer + self.dim

    def projection_shapes(self) -> list[tuple[int, int]]:
        """(in_features, out_features) of one layer's projections (q, k, v, o, gate, up, down): the
        matrices a weight format quantizes; embeddings, norms and (by default) the head stay dense."""
        q, kv = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        return [(self.dim, q), (self.dim, kv), (self.dim, kv), (q, self.dim), (self.dim, self.hidden_dim),
                (self.dim, self.hidden_dim), (self.hidden_dim, self.dim)]

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        return 2 * self.n_layers * self.n_kv_heads * self.head_dim * dtype_bytes

    @classmethod
    def from_preset(cls, name: str, **overrides) -> ModelConfig:
        if name not in PRESETS:
            raise UserError(f"unknown model preset {name!r}; known: {', '.join(sorted(PRESETS))}")
        return cls(**{**PRESETS[name], **overrides})


PRESETS: dict[str, dict] = {
    # tests: fast on a CPU, still exercises GQA
    "tiny": dict(vocab_size=512, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=176,
                 max_seq_len=256, rope_theta=1e6),
    # the model codellm trains and ships (models/default/MODEL_CARD.md, runs/gpu_default.sh): 11.1M
    # parameters, so base + instruct in bf16 fit the 48 MB models/ budget; its pretraining shape: the
    # long-context stage then sets theta 1e6 and 4x the context, as Code Llama
    "default": dict(vocab_size=8192, dim=320, n_layers=6, n_heads=5, n_kv_heads=1, hidden_dim=768,
                    max_seq_len=1024, rope_theta=1e4),
    # the CPU-trained default of 2026-11 (runs/default_model.sh): 8.6M parameters, 512-token pretraining
    "default-cpu": dict(vocab_size=8192, dim=256, n_layers=6, n_heads=4, n_kv_heads=2, hidden_dim=704,
                        max_seq_len=512, rope_theta=1e4),
    # Code Llama shapes (meta-llama/CodeLlama-*-hf config.json)
    "codellama-7b": dict(vocab_size=32016, dim=4096, n_layers=32, n_heads=32, n_kv_heads=32,
                         hidden_dim=11008, max_seq_len=16384, rope_theta=1e6),
    "codellama-13b": dict(vocab_size=32016, dim=5120, n_layers=40, n_heads=40, n_kv_heads=40,
                          hidden_dim=13824, max_seq_len=16384, rope_theta=1e6),
    "codellama-34b": dict(vocab_size=32000, dim=8192, n_layers=48, n_heads=64, n_kv_heads=8,
                          hidden_dim=22016, max_seq_len=16384, rope_theta=1e6),
}
