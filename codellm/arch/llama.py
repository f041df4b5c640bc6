"""Llama / Code Llama: Hugging Face `LlamaForCausalLM` configs and tensor names <-> codellm's Transformer."""

from __future__ import annotations

import torch

from codellm.arch.registry import Architecture, register
from codellm.config import ModelConfig
from codellm.errors import UserError
from codellm.model import Transformer


def config_from_hf(hf: dict, source: str = "config.json") -> ModelConfig:
    """Translate an HF `LlamaConfig` dict (transformers 4.x `rope_theta`/`rope_scaling` or 5.x
    `rope_parameters`) into our ModelConfig; refuse what our model cannot represent."""
    for flag in ("attention_bias", "mlp_bias"):
        if hf.get(flag):
            raise UserError(f"{source}: {flag}=true is not supported (Llama/Code Llama have no biases)")
    if hf.get("hidden_act", "silu") != "silu":
        raise UserError(f"{source}: hidden_act={hf['hidden_act']!r} is not supported (SwiGLU uses silu)")
    rope = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or ({} if rope.get("rope_type", "default") == "default" else rope)
    kind = scaling.get("rope_type", scaling.get("type", "default")) if scaling else "default"
    if kind not in ("default", "linear"):
        raise UserError(f"{source}: rope scaling type {kind!r} is not supported (only linear)")
    n_heads = hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or hf["hidden_size"] // n_heads
    if head_dim * n_heads != hf["hidden_size"]:
        raise UserError(f"{source}: head_dim={head_dim} x heads={n_heads} != hidden_size={hf['hidden_size']}")
    return ModelConfig(
        vocab_size=hf["vocab_size"], dim=hf["hidden_size"], n_layers=hf["num_hidden_layers"],
        n_heads=n_heads, n_kv_heads=hf.get("num_key_value_heads") or n_heads,
        hidden_dim=hf["intermediate_size"], max_seq_len=hf.get("max_position_embeddings", 2048),
        rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10_000.0))),
        rope_scaling=float(scaling.get("factor", 1.0)) if kind == "linear" else 1.0,
        norm_eps=hf.get("rms_norm_eps", 1e-6), bos_id=hf.get("bos_token_id", 1),
        eos_id=_first(hf.get("eos_token_id", 2)),
    )


def _first(value):
    return value[0] if isinstance(value, list) else value


def config_to_hf(cfg: ModelConfig, dtype: torch.dtype) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.dim, "intermediate_size": cfg.hidden_dim,
        "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim, "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": {"type": "linear", "rope_type": "linear", "factor": cfg.rope_scaling}
        if cfg.rope_scaling != 1.0 else None,
        "bos_token_id": cfg.bos_id, "eos_token_id": cfg.eos_id, "tie_word_embeddings": False,
        "attention_bias": False, "mlp_bias": False, "initializer_range": 0.02, "pretraining_tp": 1,
        "use_cache": True, "torch_dtype": str(dtype).removeprefix("torch."),
    }


LLAMA = register(Architecture(
    name="llama",
    hf_classes=("LlamaForCausalLM",),
    config_from_hf=config_from_hf,
    config_to_hf=config_to_hf,
    build=Transformer,
    model_class=Transformer,
    # our names are HF's without the `model.` prefix, except the head, which has none there either
    to_ours=lambda key: key.removeprefix("model."),
    to_hf=lambda name: name if name == "lm_head.weight" else f"model.{name}",
    ignored=("rotary_emb.inv_freq",),  # a buffer some older checkpoints carry; recomputed from the config
    tied=("lm_head.weight", "embed_tokens.weight"),
))
