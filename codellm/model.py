"""The Llama-2 / Code Llama decoder, read top to bottom.

Architecture (as Code Llama; numerics follow Hugging Face `LlamaForCausalLM` so logits match):
- pre-norm blocks with RMSNorm (eps from config, computed in fp32)
- rotary position embeddings, "rotate half" layout (the q/k layout of HF checkpoints), configurable
  base theta (1e4 Llama 2, 1e6 Code Llama) and linear position scaling
- grouped-query attention (n_kv_heads <= n_heads) through `scaled_dot_product_attention`
- SwiGLU MLP, untied output head

`forward(tokens, positions, cache)` serves training and inference: positions are a (B, T) tensor so each
row of a batch may sit at a different offset. Without a cache attention is causal over the given
tokens; with a cache, keys are stored at their positions and each query sees the keys at positions <= its
own. Parameter names equal the HF names without the `model.` prefix, so checkpoints map one to one.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from codellm import weights
from codellm.config import ModelConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)  # one kernel, bit-equal to below
        # normalise in fp32 (bf16 variance is too coarse), scale in the input dtype, as HF does
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rope_cos_sin(cfg: ModelConfig, positions: torch.Tensor, dtype: torch.dtype):
    """cos/sin tables for `positions` (B, T) -> two (B, 1, T, head_dim) tensors.

    Linear scaling divides the frequencies by the factor, i.e. positions are interpolated.
    """
    half = torch.arange(0, cfg.head_dim, 2, dtype=torch.int64, device=positions.device).float()
    inv_freq = 1.0 / (cfg.rope_theta ** (half / cfg.head_dim)) / cfg.rope_scaling
    freqs = positions.float()[..., None] * inv_freq  # (B, T, head_dim/2)
    emb = torch.cat((freqs, freqs), dim=-1)[:, None]  # (B, 1, T, head_dim)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def cache_mask(positions: torch.Tensor, length: int) -> torch.Tensor | None:
    """Which cached keys (positions 0..length-1) each query at `positions` (B, T) sees: (B, 1, T, length),
    or None for a single query row, which sees every key up to its own position, i.e. all of them."""
    if positions.numel() == 1:
        return None
    keys = torch.arange(length, device=positions.device)
    return (keys <= positions[..., None])[:, None]


class KVCache:
    """Keys/values of a fixed batch of rows, stored at their positions: (B, n_kv_heads, max_len, head_dim).

    The simple cache used by the reference generator; the serving engine brings its own slot cache with
    the same contract: `prepare(positions)` once per forward returns the attention mask, then
    `update(layer, k, v)` per layer stores the new keys/values and returns the cache up to the furthest
    position.
    """

    def __init__(self, cfg: ModelConfig, batch: int, max_len: int, dtype: torch.dtype, device="cpu"):
        shape = (cfg.n_layers, batch, cfg.n_kv_heads, max_len, cfg.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.max_len = max_len

    def prepare(self, positions: torch.Tensor) -> torch.Tensor | None:
        self.positions, self.length = positions, int(positions.max()) + 1
        self.rows = torch.arange(positions.shape[0], device=positions.device)[:, None]
        return cache_mask(positions, self.length)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Write k/v (B, n_kv, T, hd) at the prepared positions; -> keys, values (B, n_kv, length, hd)."""
        self.k[layer][self.rows, :, self.positions] = k.transpose(1, 2)
        self.v[layer][self.rows, :, self.positions] = v.transpose(1, 2)
        return self.k[layer, :, :, :self.length], self.v[layer, :, :, :self.length]


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer, self.n_heads, self.n_kv_heads, self.head_dim = layer, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.qkv: nn.Module | None = None  # q/k/v as one linear, set by Transformer.fuse_projections
        self.q_proj = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)

    def forward(self, x, cos, sin, cache: KVCache | None, mask: torch.Tensor | None):
        B, T, _ = x.shape
        H, KV, hd = self.n_heads, self.n_kv_heads, self.head_dim
        if self.qkv is not None:  # one matmul, and one RoPE over the query and key heads together
            qkv = self.qkv(x).view(B, T, H + 2 * KV, hd).transpose(1, 2)
            qk = apply_rope(qkv[:, :H + KV], cos, sin)
            q, k, v = qk[:, :H], qk[:, H:], qkv[:, H + KV:]
        else:
            q = self.q_proj(x).view(B, T, H, hd).transpose(1, 2)  # (B, H, T, hd)
            k = self.k_proj(x).view(B, T, KV, hd).transpose(1, 2)  # (B, KV, T, hd)
            v = self.v_proj(x).view(B, T, KV, hd).transpose(1, 2)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1, enable_gqa=True)
        else:
            k, v = cache.update(self.layer, k, v)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.dim, cfg.hidden_dim, bias=False)
        self.up_proj = nn.Linear(cfg.dim, cfg.hidden_dim, bias=False)
        self.down_proj = nn.Linear(cfg.hidden_dim, cfg.dim, bias=False)
        self.gate_up: nn.Module | None = None  # gate/up as one linear, set by Transformer.fuse_projections

    def forward(self, x):
        if self.gate_up is not None:
            gate, up = self.gate_up(x).chunk(2, dim=-1)
            return self.down_proj(F.silu(gate) * up)
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.self_attn = Attention(cfg, layer)
        self.post_attention_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, cache, mask):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor | None = None,
                cache: KVCache | None = None, last_only: bool = False) -> torch.Tensor:
        """tokens (B, T) -> logits (B, T, vocab), or (B, 1, vocab) with `last_only` (generation)."""
        if positions is None:
            positions = torch.arange(tokens.shape[1], device=tokens.device).expand(tokens.shape[0], -1)
        x = self.embed_tokens(tokens)
        cos, sin = rope_cos_sin(self.cfg, positions, x.dtype)
        mask = cache.prepare(positions) if cache is not None else None
        for block in self.layers:
            x = block(x, cos, sin, cache, mask)
        if last_only:
            x = x[:, -1:]
        return self.lm_head(self.norm(x))

    @torch.no_grad()
    def fuse_projections(self) -> Transformer:
        """For inference: q/k/v and gate/up as one linear each (`weights.fuse`, any weight format), so a
        step runs 2 matmuls where it ran 5 (the per-op cost dominates small-batch decode on a CPU). The
        separate weights become views into the fused ones: names, state_dict and memory stay as they
        were. Frozen afterwards (the fused path has no gradients to the separate weights)."""
        for block in self.layers:
            attn, mlp = block.self_attn, block.mlp
            if attn.qkv is None:
                # plain attributes, not submodules: their weights are the projections' own
                object.__setattr__(attn, "qkv", weights.fuse(attn.q_proj, attn.k_proj, attn.v_proj))
                object.__setattr__(mlp, "gate_up", weights.fuse(mlp.gate_proj, mlp.up_proj))
        return self.requires_grad_(False)

    @torch.no_grad()
    def init_weights(self, seed: int = 0, std: float = 0.02):
        """Llama-style init for training from scratch: N(0, std); the projections that write into the
        residual stream are scaled by 1/sqrt(2 * n_layers) (GPT-2) so the stream's variance stays flat."""
        gen = torch.Generator().manual_seed(seed)
        residual_std = std / math.sqrt(2 * self.cfg.n_layers)
        for name, p in self.named_parameters():
            if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
                p.fill_(1.0)
            else:
                s = residual_std if name.endswith(("o_proj.weight", "down_proj.weight")) else std
                p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float32) * s)
        return self

