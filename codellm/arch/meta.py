"""Meta's own download layout of (Code) Llama: `params.json`, `consolidated.NN.pth`, `tokenizer.model`.

Meta ships one `consolidated.NN.pth` per model-parallel rank (1 for 7B, 2 for 13B, 4 for 34B), each
holding that rank's slice of every weight as fairscale's layers split them (llama/model.py):

- column-parallel (`ColumnParallelLinear`, each rank owns some output rows): wq, wk, wv, w1, w3, output;
- row-parallel (`RowParallelLinear`, each rank owns some input columns): wo, w2;
- `ParallelEmbedding` splits the embedding dimension, so tok_embeddings is merged along dim 1;
- norms are replicated (rank 0's copy is used); `rope.freqs` is a recomputed buffer.

Meta applies RoPE to interleaved pairs (x0, x1), (x2, x3)... of each head, transformers (and codellm)
to its two halves (rotate-half), so the q and k rows of every head are permuted exactly as transformers'
`convert_llama_weights_to_hf.py` does (`permute`). This module returns a Hugging Face `config.json`
dict and HF-named tensors, so loading and `codellm convert` go through the one HF code path.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import torch

from codellm.errors import UserError

PARAMS = "params.json"
SHARD = re.compile(r"consolidated\.(\d+)\.pth")
# max_position_embeddings for params.json files without max_seq_len (transformers' converter: Code Llama,
# whose rope_theta is raised, 16384; Llama 2, 4096)
CONTEXT_CODE_LLAMA, CONTEXT_LLAMA2 = 16384, 4096

# Meta name (after "layers.N.") -> (HF name, how ranks split it: dim to concatenate, None = replicated)
LAYER_TENSORS = {
    "attention.wq.weight": ("self_attn.q_proj.weight", 0),
    "attention.wk.weight": ("self_attn.k_proj.weight", 0),
    "attention.wv.weight": ("self_attn.v_proj.weight", 0),
    "attention.wo.weight": ("self_attn.o_proj.weight", 1),
    "feed_forward.w1.weight": ("mlp.gate_proj.weight", 0),
    "feed_forward.w2.weight": ("mlp.down_proj.weight", 1),
    "feed_forward.w3.weight": ("mlp.up_proj.weight", 0),
    "attention_norm.weight": ("input_layernorm.weight", None),
    "ffn_norm.weight": ("post_attention_layernorm.weight", None),
}
TOP_TENSORS = {
    "tok_embeddings.weight": ("model.embed_tokens.weight", 1),
    "norm.weight": ("model.norm.weight", None),
    "output.weight": ("lm_head.weight", 0),
}
IGNORED = ("rope.freqs",)


def is_meta_dir(path: str | Path) -> bool:
    """A directory in Meta's layout: params.json and no config.json."""
    path = Path(path)
    return (path / PARAMS).is_file() and not (path / "config.json").is_file()


def shard_files(path: Path) -> list[Path]:
    """consolidated.00.pth ... in rank order; refuses gaps."""
    found = {int(m.group(1)): p for p in path.iterdir() if (m := SHARD.fullmatch(p.name))}
    if not found:
        raise UserError(f"{path}: has {PARAMS} but no consolidated.NN.pth weights (Meta's layout)")
    missing = [f"consolidated.{i:02d}.pth" for i in range(max(found) + 1) if i not in found]
    if missing:
        raise UserError(f"{path}: model-parallel shards are missing: {', '.join(missing)} "
                        f"(found {len(found)} of {max(found) + 1})")
    return [found[i] for i in range(len(found))]


def read_params(path: Path) -> dict:
    file = path / PARAMS
    try:
        params = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{file} is not valid JSON: {e}") from None
    if not isinstance(params, dict):
        raise UserError(f"{file} must be a JSON object")
    for key in ("dim", "n_layers", "n_heads"):
        if not isinstance(params.get(key), int) or params[key] <= 0:
            raise UserError(f"{file}: {key} must be a positive integer (got {params.get(key)!r})")
    for key in ("use_scaled_rope", "moe_args", "vision_chunk_size"):  # Llama 3.1+ features codellm does not run
        if params.get(key):
            raise UserError(f"{file}: {key} is not supported (codellm runs Llama 2 / Code Llama checkpoints)")
    return params


def hidden_dim(params: dict) -> int:
    """SwiGLU width as Meta's FeedForward computes it from dim, multiple_of and ffn_dim_multiplier."""
    multiple_of = params.get("multiple_of", 256)
    hidden = int(2 * 4 * params["dim"] / 3)
    if params.get("ffn_dim_multiplier") is not None:
        hidden = int(params["ffn_dim_multiplier"] * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def _load_shard(file: Path) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(file, map_location="cpu", mmap=True, weights_only=True)
    except Exception as e:  # pickle/zip errors of a truncated or foreign file
        raise UserError(f"{file}: cannot read it as a PyTorch checkpoint ({e})") from None
    if not isinstance(state, dict):
        raise UserError(f"{file}: expected a dict of tensors, found {type(state).__name__}")
    return state


def _special_ids(path: Path) -> tuple[int, int]:
    """BOS/EOS of tokenizer.model (Meta's Tokenizer reads them there), else Llama's 1/2."""
    if not (path / "tokenizer.model").is_file():
        return 1, 2
    from codellm.tokenizer import load_tokenizer

    tok = load_tokenizer(path)
    return (tok.bos_id if tok.bos_id is not None else 1), (tok.eos_id if tok.eos_id is not None else 2)


def hf_config(path: str | Path) -> dict:
    """transformers' `config.json` for the model in a Meta-layout directory."""
    path = Path(path)
    params = read_params(path)
    dim, n_heads = params["dim"], params["n_heads"]
    vocab = params.get("vocab_size", -1)
    if not isinstance(vocab, int) or vocab <= 0:  # Llama 2 writes -1: the size comes from the tokenizer
        vocab = _load_shard(shard_files(path)[0])["tok_embeddings.weight"].shape[0]
    theta = float(params.get("rope_theta", 10_000.0))
    bos, eos = _special_ids(path)
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": vocab, "hidden_size": dim, "intermediate_size": hidden_dim(params),
        "num_hidden_layers": params["n_layers"], "num_attention_heads": n_heads,
        "num_key_value_heads": params.get("n_kv_heads") or n_heads, "hidden_act": "silu",
        "max_position_embeddings": params.get("max_seq_len")
        or (CONTEXT_CODE_LLAMA if theta > 10_000.0 else CONTEXT_LLAMA2),
        "rms_norm_eps": params.get("norm_eps", 1e-5), "rope_theta": theta,
        "bos_token_id": bos, "eos_token_id": eos, "tie_word_embeddings": False,
    }


def permute_rope(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rows of q/k from Meta's interleaved RoPE pairs to rotate-half (transformers' `permute`): within each
    head, rows (0, 1), (2, 3), ... become rows (0, d/2), (1, d/2 + 1), ..."""
    rows, cols = w.shape
    return w.view(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def hf_tensors(path: str | Path, config: dict) -> Iterator[tuple[str, str, torch.Tensor]]:
    """(source file, HF tensor name, tensor) for every weight, the ranks' slices merged, q/k permuted."""
    path = Path(path)
    files = shard_files(path)
    shards = [_load_shard(f) for f in files]
    source = files[0].name if len(files) == 1 else f"{files[0].name}..{files[-1].name}"
    keys = set(shards[0])
    for file, shard in zip(files[1:], shards[1:], strict=True):
        if set(shard) != keys:
            diff = sorted(keys ^ set(shard))[:4]
            raise UserError(f"{file.name} and {files[0].name} hold different tensors (e.g. {', '.join(diff)})")
    heads = {"self_attn.q_proj.weight": config["num_attention_heads"],
             "self_attn.k_proj.weight": config["num_key_value_heads"]}
    for key in sorted(keys):
        if key in IGNORED:
            continue
        layer, rest = _split_layer(key)
        table = LAYER_TENSORS if layer is not None else TOP_TENSORS
        if rest not in table:
            raise UserError(f"{source}: unexpected tensor {key!r} for a Llama model in Meta's layout")
        name, dim = table[rest]
        parts = [s[key] for s in shards]
        tensor = parts[0] if dim is None or len(parts) == 1 else torch.cat(parts, dim=dim)
        if name in heads:
            n = heads[name]
            if tensor.shape[0] % (2 * n):
                raise UserError(f"{source}: {key} has {tensor.shape[0]} rows, not a multiple of 2 x {n} heads")
            tensor = permute_rope(tensor, n)
        yield source, (f"model.layers.{layer}.{name}" if layer is not None else name), tensor


def _split_layer(key: str) -> tuple[int | None, str]:
    m = re.fullmatch(r"layers\.(\d+)\.(.+)", key)
    return (int(m.group(1)), m.group(2)) if m else (None, key)


def stored_dtype(path: str | Path) -> torch.dtype:
    """dtype of the weights as Meta stored them (bfloat16 for its releases)."""
    return _load_shard(shard_files(Path(path))[0])["tok_embeddings.weight"].dtype


def tokenizer_files(path: str | Path) -> dict[str, str]:
    """tokenizer_config.json and special_tokens_map.json for tokenizer.model, as transformers' converter
    writes them: CodeLlamaTokenizer when the vocabulary has the infilling pieces, else LlamaTokenizer."""
    from codellm.tokenizer import load_tokenizer

    tok = load_tokenizer(path)
    infill = tok.piece_to_id("▁<PRE>") is not None
    special = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    config = {"tokenizer_class": "CodeLlamaTokenizer" if infill else "LlamaTokenizer", **special,
              "pad_token": None, "add_bos_token": True, "add_eos_token": False,
              "clean_up_tokenization_spaces": False, "legacy": False,
              "model_input_names": ["input_ids", "attention_mask"]}
    if infill:
        config.update(prefix_token="▁<PRE>", middle_token="▁<MID>", suffix_token="▁<SUF>", eot_token="▁<EOT>",
                      fill_token="<FILL_ME>")
    else:
        config["add_prefix_space"] = True  # legacy=False Llama tokenizers need it to add SentencePiece's space
    dump = lambda d: json.dumps(d, indent=2, ensure_ascii=False) + "\n"
    return {"tokenizer_config.json": dump(config), "special_tokens_map.json": dump(special)}
