"""T5 / CodeT5+: the encoder-decoder family, read top to bottom, and its registry entry.

Architecture (numerics follow Hugging Face `T5ForConditionalGeneration`, so logits match):
- pre-norm blocks with T5's RMS layer norm (no mean, no bias; variance in fp32)
- no position embeddings: each stack's first layer owns a table of learned biases per relative-position
  bucket and head, shared by all its layers; buckets are bidirectional in the encoder, causal in the
  decoder (32 buckets, exact up to 8 / 16 apart, logarithmic up to 128)
- attention logits are not scaled by 1/sqrt(d_kv) (T5 folds that into the initialisation)
- feed-forward: ReLU (`wi`, `wo`; CodeT5+ 220M/770M) or gated GELU (`wi_0`, `wi_1`, `wo`; T5 v1.1)
- decoder blocks: causal self-attention, cross-attention over the encoder states, feed-forward
- output head tied to the shared embedding (hidden states scaled by d_model**-0.5 first) or untied

Three kinds of model share this class, as the three CodeT5+ checkpoints: `seq2seq`
(T5ForConditionalGeneration: codet5p-220m/770m), `encoder` (T5EncoderModel) and `embedding`
(codet5p-110m-embedding: an encoder plus `proj`, the embedding being the L2-normalised projection of the
first token's final state). Parameter names equal HF's, so checkpoints map one to one; the per-stack
copies of the shared embedding (`encoder.embed_tokens`, `decoder.embed_tokens`) load as `shared`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from codellm.arch.registry import Architecture, register
from codellm.errors import UserError
from codellm.model import RMSNorm

KINDS = {"seq2seq": "T5ForConditionalGeneration", "encoder": "T5EncoderModel",
         "embedding": "CodeT5pEmbeddingModel"}


def gelu_new(x: torch.Tensor) -> torch.Tensor:
    """GELU's tanh approximation, written out as HF's `NewGELUActivation` (F.gelu(approximate="tanh")
    rounds differently)."""
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


ACTIVATIONS = {"relu": F.relu, "gelu_new": gelu_new, "gelu": F.gelu, "silu": F.silu}


@dataclass(frozen=True)
class T5Config:
    vocab_size: int
    d_model: int
    d_kv: int  # per-head width (d_model need not equal n_heads * d_kv)
    d_ff: int
    n_layers: int  # encoder blocks
    n_decoder_layers: int  # 0 for the encoder-only kinds
    n_heads: int
    feed_forward: str = "relu"  # "relu" | "gated-gelu" | any "[gated-]relu/gelu/gelu_new/silu"
    num_buckets: int = 32
    max_distance: int = 128
    eps: float = 1e-6
    tied: bool = True  # output head = shared embedding (and hidden states scaled by d_model**-0.5)
    kind: str = "seq2seq"  # "seq2seq" | "encoder" | "embedding"
    embed_dim: int = 0  # width of `proj` (embedding kind)
    pad_id: int = 0
    eos_id: int = 1
    bos_id: int | None = None  # CodeT5's <s>: the first token of an encoder input
    decoder_start_id: int = 0
    max_seq_len: int = 512  # what the model was trained on (relative positions have no hard limit)

    def __post_init__(self):
        gated, act = self.activation
        checks = {"vocab_size": self.vocab_size > 0, "d_model": self.d_model > 0, "d_kv": self.d_kv > 0,
                  "d_ff": self.d_ff > 0, "n_layers": self.n_layers > 0, "n_heads": self.n_heads > 0,
                  "n_decoder_layers": (self.n_decoder_layers > 0) == (self.kind == "seq2seq"),
                  "kind": self.kind in KINDS, "embed_dim": (self.embed_dim > 0) == (self.kind == "embedding"),
                  "feed_forward": act in ACTIVATIONS, "num_buckets": self.num_buckets >= 4,
                  "max_distance": self.max_distance > self.num_buckets // 4, "eps": self.eps > 0}
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            raise UserError("invalid T5 config: " + ", ".join(f"{n}={getattr(self, n)!r}" for n in bad) +
                            f" (kind is one of {', '.join(KINDS)}; only seq2seq has decoder layers, only "
                            f"embedding a proj; activations: {', '.join(ACTIVATIONS)})")

    @property
    def activation(self) -> tuple[bool, str]:
        """(gated, activation name), read as HF reads `feed_forward_proj`."""
        parts = self.feed_forward.split("-")
        gated = len(parts) > 1 and parts[0] == "gated"
        act = "gelu_new" if self.feed_forward == "gated-gelu" else parts[-1]
        return gated, act if len(parts) == 1 + gated else "?"

    def replace(self, **changes) -> T5Config:
        return dataclasses.replace(self, **changes)

    def num_params(self) -> int:
        return sum(p.numel() for p in T5(self.replace(), device="meta").parameters())


def relative_bucket(relative: torch.Tensor, bidirectional: bool, num_buckets: int, max_distance: int):
    """Bucket of each (key - query) distance: half the buckets exact, the rest logarithmic up to
    max_distance; bidirectional buckets spend half of them on keys after the query (Mesh TensorFlow)."""
    buckets = torch.zeros_like(relative)
    if bidirectional:
        num_buckets //= 2
        buckets += (relative > 0).long() * num_buckets
        relative = relative.abs()
    else:
        relative = -relative.clamp(max=0)  # keys after the query are masked anyway
    exact = num_buckets // 2
    log = exact + (torch.log(relative.float() / exact) / math.log(max_distance / exact)
                   * (num_buckets - exact)).long()
    log = log.clamp(max=num_buckets - 1)
    return buckets + torch.where(relative < exact, relative, log)


class Attention(nn.Module):
    """Multi-head attention without 1/sqrt(d) scaling; the relative-position table lives in layer 0 only."""

    def __init__(self, cfg: T5Config, relative_bias: bool):
        super().__init__()
        self.n_heads, self.d_kv = cfg.n_heads, cfg.d_kv
        inner = cfg.n_heads * cfg.d_kv
        self.q = nn.Linear(cfg.d_model, inner, bias=False)
        self.k = nn.Linear(cfg.d_model, inner, bias=False)
        self.v = nn.Linear(cfg.d_model, inner, bias=False)
        self.o = nn.Linear(inner, cfg.d_model, bias=False)
        if relative_bias:
            self.relative_attention_bias = nn.Embedding(cfg.num_buckets, cfg.n_heads)

    def heads(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, H*dk) -> (B, H, T, dk)
        return x.view(x.shape[0], x.shape[1], self.n_heads, self.d_kv).transpose(1, 2)

    def keys_values(self, source: torch.Tensor):
        return self.heads(self.k(source)), self.heads(self.v(source))

    def forward(self, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor):
        """x (B, T, d) attends to k/v (B, H, S, dk) with the additive `bias` (B or 1, H or 1, T, S)."""
        scores = self.heads(self.q(x)) @ k.transpose(-1, -2) + bias  # (B, H, T, S)
        out = torch.softmax(scores.float(), dim=-1).to(v.dtype) @ v  # softmax in fp32, as HF
        return self.o(out.transpose(1, 2).reshape(x.shape[0], x.shape[1], -1))


class FeedForward(nn.Module):
    def __init__(self, cfg: T5Config):
        super().__init__()
        self.gated, act = cfg.activation
        self.act = ACTIVATIONS[act]
        if self.gated:
            self.wi_0 = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
            self.wi_1 = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        else:
            self.wi = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.wo = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)

    def forward(self, x):
        h = self.act(self.wi_0(x)) * self.wi_1(x) if self.gated else self.act(self.wi(x))
        return self.wo(h)


# HF's sub-layer wrappers, kept so that parameter names match checkpoints (block.i.layer.j.<name>)
class SelfAttentionLayer(nn.Module):
    def __init__(self, cfg: T5Config, relative_bias: bool):
        super().__init__()
        self.SelfAttention = Attention(cfg, relative_bias)
        self.layer_norm = RMSNorm(cfg.d_model, cfg.eps)


class CrossAttentionLayer(nn.Module):
    def __init__(self, cfg: T5Config):
        super().__init__()
        self.EncDecAttention = Attention(cfg, relative_bias=False)
        self.layer_norm = RMSNorm(cfg.d_model, cfg.eps)


class FeedForwardLayer(nn.Module):
    def __init__(self, cfg: T5Config):
        super().__init__()
        self.DenseReluDense = FeedForward(cfg)
        self.layer_norm = RMSNorm(cfg.d_model, cfg.eps)


class Block(nn.Module):
    def __init__(self, cfg: T5Config, first: bool, decoder: bool):
        super().__init__()
        parts = [SelfAttentionLayer(cfg, relative_bias=first)]
        parts += [CrossAttentionLayer(cfg)] if decoder else []
        self.layer = nn.ModuleList(parts + [FeedForwardLayer(cfg)])

    def forward(self, x, self_bias, cache: DecoderCache | None, index: int):
        attn = self.layer[0]
        h = attn.layer_norm(x)
        k, v = attn.SelfAttention.keys_values(h)
        if cache is not None:  # the decoder: keys/values of the earlier positions come first
            k, v = cache.extend(index, k, v)
        x = x + attn.SelfAttention(h, k, v, self_bias)
        if cache is not None:
            cross = self.layer[1]
            x = x + cross.EncDecAttention(cross.layer_norm(x), *cache.cross[index], cache.cross_bias)
        ff = self.layer[-1]
        return x + ff.DenseReluDense(ff.layer_norm(x))


class Stack(nn.Module):
    """The encoder (bidirectional) or the decoder (causal, with cross-attention): blocks + final norm."""

    def __init__(self, cfg: T5Config, n_layers: int, decoder: bool):
        super().__init__()
        self.cfg, self.decoder = cfg, decoder
        self.block = nn.ModuleList(Block(cfg, first=i == 0, decoder=decoder) for i in range(n_layers))
        self.final_layer_norm = RMSNorm(cfg.d_model, cfg.eps)

    def position_bias(self, queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """Bias (1, H, T, S) for query positions (T,) against key positions (S,), from layer 0's table."""
        buckets = relative_bucket(keys[None, :] - queries[:, None], not self.decoder,
                                  self.cfg.num_buckets, self.cfg.max_distance)
        table = self.block[0].layer[0].SelfAttention.relative_attention_bias
        return table(buckets).permute(2, 0, 1)[None]

    def forward(self, x, self_bias, cache: DecoderCache | None = None):
        for i, block in enumerate(self.block):
            x = block(x, self_bias, cache, i)
        return self.final_layer_norm(x)


def padding_bias(mask: torch.Tensor | None, dtype=torch.float32) -> torch.Tensor | None:
    """An attention mask (B, S) of 1 (token) / 0 (padding) as an additive bias (B, 1, 1, S)."""
    if mask is None:
        return None
    return (1.0 - mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min


class DecoderCache:
    """What a decoding batch keeps between steps: each decoder block's self-attention keys/values so far,
    and its cross-attention keys/values over the encoder states, computed once."""

    def __init__(self, model: T5, encoded: torch.Tensor, encoder_mask: torch.Tensor | None = None):
        self.cross = [b.layer[1].EncDecAttention.keys_values(encoded) for b in model.decoder.block]
        self.cross_bias = padding_bias(encoder_mask)
        if self.cross_bias is None:
            self.cross_bias = torch.zeros(1, 1, 1, encoded.shape[1], device=encoded.device)
        self.self_kv: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * len(model.decoder.block)
        self.length = 0

    def extend(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        if (old := self.self_kv[layer]) is not None:
            k, v = torch.cat((old[0], k), dim=2), torch.cat((old[1], v), dim=2)
        self.self_kv[layer] = (k, v)
        return k, v

    def select(self, rows: torch.Tensor) -> DecoderCache:
        """Keep only `rows` of the batch (finished requests leave)."""
        self.cross = [(k[rows], v[rows]) for k, v in self.cross]
        self.cross_bias = self.cross_bias[rows] if self.cross_bias.shape[0] > 1 else self.cross_bias
        self.self_kv = [(k[rows], v[rows]) for k, v in self.self_kv]
        return self


class T5(nn.Module):
    def __init__(self, cfg: T5Config, device=None):
        super().__init__()
        self.cfg = cfg
        with torch.device(device) if device is not None else contextlib.nullcontext():
            self.shared = nn.Embedding(cfg.vocab_size, cfg.d_model)
            self.encoder = Stack(cfg, cfg.n_layers, decoder=False)
            if cfg.kind == "seq2seq":
                self.decoder = Stack(cfg, cfg.n_decoder_layers, decoder=True)
                if not cfg.tied:
                    self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
            if cfg.kind == "embedding":
                self.proj = nn.Linear(cfg.d_model, cfg.embed_dim)

    def encode(self, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Encoder states (B, S, d_model) of ids (B, S); `mask` (B, S) is 0 on padding."""
        pos = torch.arange(ids.shape[1], device=ids.device)
        bias = self.encoder.position_bias(pos, pos)
        if mask is not None:
            bias = bias + padding_bias(mask)
        return self.encoder(self.shared(ids), bias)

    def embed(self, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Unit vectors (B, embed_dim): the projected first-token state (an encoder without `proj`: the
        state itself), L2-normalised."""
        first = self.encode(ids, mask)[:, 0]
        return F.normalize(self.proj(first) if self.cfg.kind == "embedding" else first, dim=-1)

    def decode(self, ids: torch.Tensor, cache: DecoderCache) -> torch.Tensor:
        """Decoder states (B, T, d_model) for ids (B, T) that follow the `cache.length` tokens before them."""
        self._require_decoder()
        start, T = cache.length, ids.shape[1]
        queries = torch.arange(start, start + T, device=ids.device)
        keys = torch.arange(start + T, device=ids.device)
        bias = self.decoder.position_bias(queries, keys)
        bias = bias.masked_fill(keys[None, :] > queries[:, None], torch.finfo(bias.dtype).min)
        out = self.decoder(self.shared(ids), bias, cache)
        cache.length += T
        return out

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.cfg.tied:  # T5 rescales before the tied head (the embedding is not scaled on input)
            return F.linear(hidden * self.cfg.d_model ** -0.5, self.shared.weight)
        return self.lm_head(hidden)

    def forward(self, input_ids: torch.Tensor, decoder_input_ids: torch.Tensor,
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Teacher-forced seq2seq logits (B, T, vocab) (training, parity)."""
        cache = DecoderCache(self, self.encode(input_ids, attention_mask), attention_mask)
        return self.logits(self.decode(decoder_input_ids, cache))

    def shift_right(self, labels: torch.Tensor) -> torch.Tensor:
        """Decoder inputs for `labels` (B, T): the start id, then the labels but the last (-100 -> pad)."""
        start = torch.full_like(labels[:, :1], self.cfg.decoder_start_id)
        shifted = torch.cat((start, labels[:, :-1]), dim=1)
        return shifted.masked_fill(shifted == -100, self.cfg.pad_id)

    def _require_decoder(self):
        if self.cfg.kind != "seq2seq":
            raise UserError(f"this is a T5 {self.cfg.kind} model ({KINDS[self.cfg.kind]}): it has no decoder; "
                            "it embeds (`codellm embed`) but does not generate")

    @torch.no_grad()
    def init_weights(self, seed: int = 0, factor: float = 1.0) -> T5:
        """T5's initialisation (HF `_init_weights`): std 1/sqrt(fan-in) per projection, with the query's
        1/sqrt(d_kv) folded in because attention logits are not scaled; norms 1."""
        gen = torch.Generator().manual_seed(seed)
        d, dk, H = self.cfg.d_model, self.cfg.d_kv, self.cfg.n_heads
        for name, p in self.named_parameters():
            leaf = name.rsplit(".", 2)[-2]
            std = {"q": (d * dk) ** -0.5, "k": d ** -0.5, "v": d ** -0.5, "o": (H * dk) ** -0.5,
                   "wi": d ** -0.5, "wi_0": d ** -0.5, "wi_1": d ** -0.5, "wo": self.cfg.d_ff ** -0.5,
                   "relative_attention_bias": d ** -0.5, "lm_head": d ** -0.5, "proj": d ** -0.5}.get(leaf, 1.0)
            if name.endswith("layer_norm.weight"):
                p.fill_(1.0)
            elif name.endswith(".bias"):
                p.zero_()
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * std * factor)
        return self


# --- Hugging Face configs ---------------------------------------------------------------------------

def config_from_hf(hf: dict, source: str = "config.json") -> T5Config:
    """Read a T5 / CodeT5+ config.json (T5ForConditionalGeneration, T5EncoderModel, CodeT5pEmbeddingModel)."""
    classes = hf.get("architectures") or ["T5ForConditionalGeneration"]
    kind = next((k for k, c in KINDS.items() if c in classes), None)
    if kind is None:
        raise UserError(f"{source}: architectures={classes} is not a T5 kind codellm runs "
                        f"({', '.join(KINDS.values())})")
    try:
        cfg = T5Config(
            vocab_size=hf["vocab_size"], d_model=hf["d_model"], d_kv=hf["d_kv"], d_ff=hf["d_ff"],
            n_layers=hf["num_layers"], n_heads=hf["num_heads"],
            n_decoder_layers=(hf.get("num_decoder_layers") or hf["num_layers"]) if kind == "seq2seq" else 0,
            feed_forward=hf.get("feed_forward_proj", "relu"),
            num_buckets=hf.get("relative_attention_num_buckets", 32),
            max_distance=hf.get("relative_attention_max_distance", 128),
            eps=hf.get("layer_norm_epsilon", 1e-6), tied=hf.get("tie_word_embeddings", True), kind=kind,
            embed_dim=hf.get("embed_dim", 0) if kind == "embedding" else 0, pad_id=hf.get("pad_token_id", 0),
            eos_id=_first(hf.get("eos_token_id", 1)), bos_id=hf.get("bos_token_id"),
            decoder_start_id=hf.get("decoder_start_token_id", hf.get("pad_token_id", 0)),
            max_seq_len=hf.get("n_positions", 512))
    except KeyError as e:
        raise UserError(f"{source}: a T5 config needs {e.args[0]!r}") from None
    except UserError as e:
        raise UserError(f"{source}: {e}") from None
    return cfg


def _first(value):
    return value[0] if isinstance(value, list) else value


def config_to_hf(cfg: T5Config, dtype: torch.dtype) -> dict:
    hf = {
        "architectures": [KINDS[cfg.kind]], "model_type": "codet5p_embedding" if cfg.kind == "embedding" else "t5",
        "vocab_size": cfg.vocab_size, "d_model": cfg.d_model, "d_kv": cfg.d_kv, "d_ff": cfg.d_ff,
        "num_layers": cfg.n_layers, "num_decoder_layers": cfg.n_decoder_layers or cfg.n_layers,
        "num_heads": cfg.n_heads, "feed_forward_proj": cfg.feed_forward,
        "relative_attention_num_buckets": cfg.num_buckets, "relative_attention_max_distance": cfg.max_distance,
        "layer_norm_epsilon": cfg.eps, "tie_word_embeddings": cfg.tied, "is_encoder_decoder": cfg.kind == "seq2seq",
        "pad_token_id": cfg.pad_id, "eos_token_id": cfg.eos_id, "decoder_start_token_id": cfg.decoder_start_id,
        "n_positions": cfg.max_seq_len, "dropout_rate": 0.0, "initializer_factor": 1.0,
        "use_cache": cfg.kind == "seq2seq", "torch_dtype": str(dtype).removeprefix("torch."),
    }
    if cfg.bos_id is not None:
        hf["bos_token_id"] = cfg.bos_id
    if cfg.kind == "embedding":
        hf["embed_dim"] = cfg.embed_dim
    return hf


T5_ARCH = register(Architecture(
    name="t5",
    hf_classes=tuple(KINDS.values()),  # model_type "codet5p_embedding" is found by its class
    config_from_hf=config_from_hf,
    config_to_hf=config_to_hf,
    build=T5,
    model_class=T5,
    # each stack's `embed_tokens` is a tie of `shared` (a checkpoint may carry any of them)
    to_ours=lambda key: "shared.weight" if key.endswith("embed_tokens.weight") else key,
    to_hf=lambda name: name,
    ignored=("EncDecAttention.relative_attention_bias.weight",),  # in old checkpoints, read by no model (HF too)
))
