"""GGUF files (llama.cpp, Ollama) in and out, for Llama / Code Llama.

In: `load(path)` builds our Transformer and tokenizer from one `.gguf` file, read with the `gguf` package.
The config comes from the `llama.*` metadata, the tokenizer from `tokenizer.ggml.*` (a SentencePiece model
rebuilt from the tokens, scores and types for `llama`; a byte-level BPE tokenizer.json from the tokens and
merges for `gpt2`), each materialised in a private temporary directory and read by `codellm.tokenizer`.
Tensors map to the weights seam where the formats agree bit for bit: Q8_0 -> `Int8Linear` group 32 (scale =
the block's fp16 d), Q4_0 -> `Int4Linear` symmetric, Q4_1 -> `Int4Linear` with mins; anything else (F16,
BF16, the K-quants, ...) is dequantized by `gguf.quants` into the model dtype, with a one-line note.

Out: `export(model_dir, out, "f16" | "q8_0" | "q4_0")` writes the file llama.cpp's `convert_hf_to_gguf.py`
writes for a Llama (same metadata keys, tensor names, q/k row order), through a temporary file renamed into
place.

RoPE layout: llama.cpp's converter permutes the q and k rows of every head from Hugging Face's rotate-half
order back to Meta's interleaved pairs; loading undoes that permutation, exporting applies it.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as GGML
from gguf import TokenType
from torch import nn

from codellm import weights
from codellm.config import ModelConfig
from codellm.errors import UserError
from codellm.model import Transformer

ARCH = "llama"
# GGUF tensor names (blk.N.<name>.weight) -> ours (layers.N.<name>.weight)
LAYER_TENSORS = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
}
TOP_TENSORS = {"token_embd": "embed_tokens", "output_norm": "norm", "output": "lm_head"}
# GGUF block types codellm's weight formats hold as they are: (format, options)
NATIVE = {GGML.Q8_0: ("int8", {"group": 32}), GGML.Q4_0: ("int4", {"group": 32, "symmetric": True}),
          GGML.Q4_1: ("int4", {"group": 32, "symmetric": False})}
# the projections inference runs as one matmul (Transformer.fuse_projections): one format each
FUSED_GROUPS = (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("mlp.gate_proj", "mlp.up_proj"))
EXPORT_TYPES = {"f16": GGML.F16, "q8_0": GGML.Q8_0, "q4_0": GGML.Q4_0}
FILE_TYPES = {"f16": gguf.LlamaFileType.MOSTLY_F16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
              "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}
# llama.cpp's byte-level BPE pre-tokenizers codellm can express as a tokenizer.json pre_tokenizer
BYTE_LEVEL = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
DIGITS = {"type": "Digits", "individual_digits": True}
BPE_PRE = {"gpt-2": BYTE_LEVEL, "starcoder": {"type": "Sequence", "pretokenizers": [DIGITS, BYTE_LEVEL]}}
BPE_PRE["refact"] = BPE_PRE["starcoder"]  # the same split: single digits, then GPT-2's regex
_MISSING = object()


def is_gguf(path: str | Path | None) -> bool:
    """A file (not a directory) named *.gguf or starting with the GGUF magic."""
    if path is None or not Path(path).is_file():
        return False
    if Path(path).suffix.lower() == ".gguf":
        return True
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


def load(path: str | Path, device: str = "cpu", dtype: str | torch.dtype = "float32"):
    """(model, tokenizer) of a Llama GGUF file."""
    reader = _reader(path)
    return _load_model(reader, Path(path), device, dtype), _load_tokenizer(reader, Path(path))


def apply_options(model: Transformer, args, path: Path, quantize_loaded) -> Transformer:
    """--quantize/--group-size/--compile for a loaded GGUF model: a file of dense tensors quantizes as a
    directory does (`quantize_loaded`); one holding Q8_0/Q4_0/Q4_1 projections runs them as they are (its
    formats may differ per tensor, e.g. a Q4_0 file's Q8_0 head), through the native step on a CPU."""
    if not any(isinstance(m, weights.QuantLinear) for m in model.modules()):
        return quantize_loaded(model, args, path)
    for flag, key in (("--quantize", "quantize"), ("--group-size", "group_size")):
        value = getattr(args, key, None)
        if value is not None:
            raise UserError(f"{flag}: {path} holds quantized GGUF blocks (Q8_0/Q4_0/Q4_1), which codellm runs as "
                            f"they are; load it without {flag}")
    if args.device == "cpu" and hasattr(args, "compile"):
        args.compile = True  # as for --quantize: the native step reads the quantized matrices directly
    return model


def load_config(path: str | Path) -> ModelConfig:
    return config_from_gguf(_reader(path), Path(path))


def load_model(path: str | Path, device: str = "cpu", dtype: str | torch.dtype = "float32") -> Transformer:
    return _load_model(_reader(path), Path(path), device, dtype)


def load_tokenizer(path: str | Path):
    return _load_tokenizer(_reader(path), Path(path))


def _reader(path: str | Path) -> gguf.GGUFReader:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"GGUF file {path} does not exist")
    try:
        reader = gguf.GGUFReader(path)
    except Exception as e:  # ValueError on a bad magic/version, struct/numpy errors on a truncated file
        raise UserError(f"{path}: cannot read it as a GGUF file ({type(e).__name__}: {e})") from None
    if int(_field(reader, path, "split.count", 1) or 1) > 1:
        raise UserError(f"{path}: a split GGUF file (one of {_field(reader, path, 'split.count')} parts); merge it "
                        "first with llama.cpp's `llama-gguf-split --merge`")
    arch = _field(reader, path, "general.architecture")
    if arch != ARCH:
        raise UserError(f"{path}: general.architecture is {arch!r}; codellm loads {ARCH!r} GGUF files "
                        "(Llama / Code Llama)")
    return reader


def _field(reader: gguf.GGUFReader, path: Path, key: str, default=_MISSING):
    field = reader.fields.get(key)
    if field is None:
        if default is _MISSING:
            raise UserError(f"{path}: metadata key {key} is missing")
        return default
    return field.contents()


# --- in: config and weights -------------------------------------------------------------------------

def config_from_gguf(reader: gguf.GGUFReader, path: Path) -> ModelConfig:
    """Our ModelConfig from the llama.* metadata (the vocabulary size from token_embd's rows)."""
    get = lambda key, default=_MISSING: _field(reader, path, f"{ARCH}.{key}", default)
    n_heads = int(get("attention.head_count"))
    dim = int(get("embedding_length"))
    embd = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    if embd is None:
        raise UserError(f"{path}: tensor token_embd.weight is missing")
    vocab = int(embd.shape[1])  # ggml order: (dim, vocab)
    if get("vocab_size", vocab) != vocab:
        raise UserError(f"{path}: {ARCH}.vocab_size={get('vocab_size')} but token_embd has {vocab} rows")
    head_dim = dim // n_heads if n_heads else 0
    for key in ("rope.dimension_count", "attention.key_length", "attention.value_length"):
        if get(key, head_dim) != head_dim:
            raise UserError(f"{path}: {ARCH}.{key}={get(key)} but embedding_length/head_count = {head_dim}: "
                            "codellm rotates and attends over whole heads")
    kind = get("rope.scaling.type", None)
    factor = float(get("rope.scaling.factor", 0.0) or get("rope.scale_linear", 0.0) or 1.0)
    if kind not in (None, "none", "linear") or (kind == "none" and factor != 1.0):
        raise UserError(f"{path}: {ARCH}.rope.scaling.type={kind!r} is not supported (only linear)")
    return ModelConfig(
        vocab_size=vocab, dim=dim, n_layers=int(get("block_count")), n_heads=n_heads,
        n_kv_heads=int(get("attention.head_count_kv", n_heads)), hidden_dim=int(get("feed_forward_length")),
        max_seq_len=int(get("context_length")), rope_theta=float(get("rope.freq_base", 10_000.0)),
        rope_scaling=factor if kind in (None, "linear") else 1.0,
        norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
        bos_id=int(_field(reader, path, "tokenizer.ggml.bos_token_id", 1)),
        eos_id=int(_field(reader, path, "tokenizer.ggml.eos_token_id", 2)),
    )


def our_name(gguf_name: str) -> str | None:
    """`blk.3.attn_q.weight` -> `layers.3.self_attn.q_proj.weight`; None for a name we do not know."""
    parts = gguf_name.split(".")
    if parts[-1] != "weight":
        return None
    if len(parts) == 4 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in LAYER_TENSORS:
        return f"layers.{parts[1]}.{LAYER_TENSORS[parts[2]]}.weight"
    if len(parts) == 2 and parts[0] in TOP_TENSORS:
        return f"{TOP_TENSORS[parts[0]]}.weight"
    return None


def _load_model(reader: gguf.GGUFReader, path: Path, device: str, dtype: str | torch.dtype) -> Transformer:
    from codellm.checkpoint import parse_dtype

    cfg, dtype = config_from_gguf(reader, path), parse_dtype(dtype)
    with torch.device("meta"):
        model = Transformer(cfg)
    expected = {name: p.shape for name, p in model.state_dict().items()}
    tensors = {}
    for t in reader.tensors:
        name = our_name(t.name)
        if name is None or name not in expected:
            raise UserError(f"{path}: unexpected tensor {t.name!r} for a {cfg.n_layers}-layer llama model")
        shape = tuple(int(n) for n in reversed(t.shape.tolist()))  # ggml lists the fastest dimension first
        if shape != tuple(expected[name]):
            raise UserError(f"{path}: tensor {t.name} has shape {shape}, the metadata implies "
                            f"{tuple(expected[name])}")
        tensors[name] = t
    if "lm_head.weight" not in tensors and "embed_tokens.weight" in tensors:  # tied head: no output.weight
        tensors["lm_head.weight"] = tensors["embed_tokens.weight"]
    missing = sorted(set(expected) - set(tensors))
    if missing:
        shown = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
        raise UserError(f"{path}: missing tensors (our names): {shown}")

    native = _native_modules(model, tensors)
    with torch.device("meta"):  # filled by load_state_dict(assign=True), as the dense weights
        weights.swap_linears(model, lambda name, lin: _empty(native[name], lin) if name in native else None)
    heads = {"self_attn.q_proj.weight": cfg.n_heads, "self_attn.k_proj.weight": cfg.n_kv_heads}
    state, converted = {}, {}
    for name, t in tensors.items():
        rows = np.asarray(t.data)
        n_heads = next((n for suffix, n in heads.items() if name.endswith(suffix)), None)
        module = name.removesuffix(".weight")
        if module in native:
            rows = _unpermute(rows, n_heads) if n_heads else rows
            for key, value in _native_buffers(t.tensor_type, rows, expected[name][1]).items():
                state[f"{module}.{key}"] = value.to(device)
            continue
        if t.tensor_type not in (GGML.F32, GGML.F16):
            converted[t.tensor_type.name] = converted.get(t.tensor_type.name, 0) + 1
        dense = _dequantize(t, path).reshape(tuple(expected[name]))
        dense = _unpermute(dense, n_heads) if n_heads else dense
        state[name] = torch.from_numpy(np.array(dense, dtype=np.float32)).to(device=device, dtype=dtype)
    if converted:
        kinds = ", ".join(f"{n} {k}" for k, n in sorted(converted.items()))
        print(f"codellm: note: {path.name}: {kinds} tensors dequantized to {str(dtype).removeprefix('torch.')} "
              "(codellm runs Q8_0, Q4_0 and Q4_1 projections as they are)", file=sys.stderr)
    model.load_state_dict(state, assign=True, strict=True)
    return model.eval()


def _native_modules(model: Transformer, tensors: dict) -> dict[str, tuple[str, dict]]:
    """module name -> (format, options) for projections stored in a block type a weight format holds as
    it is; the members of a fused group (q/k/v, gate/up) only when they all share one."""
    linears = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    kind = {name: NATIVE.get(tensors[f"{name}.weight"].tensor_type) for name in linears}
    if tensors["lm_head.weight"] is tensors["embed_tokens.weight"]:
        kind["lm_head"] = None  # a tied head is the embedding's dense copy
    for layer in range(model.cfg.n_layers):
        for group in FUSED_GROUPS:
            names = [f"layers.{layer}.{member}" for member in group]
            if len({json.dumps(kind[n], sort_keys=True) for n in names}) > 1:
                for n in names:  # mixed block types (e.g. Q4_0 q/k with a Q8_0 v): dense, exact
                    kind[n] = None
    return {name: k for name, k in kind.items() if k is not None}


def _empty(kind: tuple[str, dict], lin: nn.Linear) -> nn.Module:
    fmt, options = kind
    return weights.get_format(fmt).empty(lin.in_features, lin.out_features, **options)


def _native_buffers(qtype: GGML, rows: np.ndarray, in_features: int) -> dict[str, torch.Tensor]:
    """The buffers of an Int8Linear / Int4Linear holding a Q8_0 / Q4_0 / Q4_1 tensor's blocks (bytes per
    row, in the row order wanted) exactly: Q8_0 is fp16 d + 32 int8; Q4_0 fp16 d + 16 bytes of nibbles;
    Q4_1 fp16 d, fp16 m + 16 bytes. The nibble order is Int4Linear's own."""
    out = rows.shape[0]
    blocks = rows.reshape(out, in_features // 32, -1)
    half = lambda a: torch.from_numpy(np.ascontiguousarray(a).view(np.float16)[..., 0].astype(np.float32))
    body = lambda start: torch.from_numpy(np.array(blocks[..., start:]).reshape(out, -1))
    if qtype == GGML.Q8_0:
        return {"weight": body(2).view(torch.int8), "scales": half(blocks[..., 0:2])}
    if qtype == GGML.Q4_0:
        return {"weight": body(2), "scales": half(blocks[..., 0:2]), "mins": torch.zeros(out, 0)}
    return {"weight": body(4), "scales": half(blocks[..., 0:2]), "mins": half(blocks[..., 2:4])}


def _dequantize(t, path: Path) -> np.ndarray:
    try:
        return gguf.quants.dequantize(np.asarray(t.data), t.tensor_type)
    except NotImplementedError:
        raise UserError(f"{path}: tensor {t.name} is stored as {t.tensor_type.name}, which the gguf package "
                        "cannot dequantize") from None


def _unpermute(rows: np.ndarray, n_heads: int) -> np.ndarray:
    """q/k rows from llama.cpp's interleaved RoPE order back to rotate-half (inverse of `_permute`)."""
    return rows.reshape(n_heads, rows.shape[0] // n_heads // 2, 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def _permute(rows: np.ndarray, n_heads: int) -> np.ndarray:
    """q/k rows from rotate-half to the interleaved order llama.cpp expects (its converter's `permute`)."""
    return rows.reshape(n_heads, 2, rows.shape[0] // n_heads // 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


# --- in: tokenizer ----------------------------------------------------------------------------------

def _load_tokenizer(reader: gguf.GGUFReader, path: Path):
    from codellm.tokenizer import load_tokenizer as load_dir

    get = lambda key, default=_MISSING: _field(reader, path, f"tokenizer.ggml.{key}", default)
    kind = get("model")
    tokens = get("tokens")
    types = get("token_type", [int(TokenType.NORMAL)] * len(tokens))
    special = {}  # tokenizer_config.json names of the special tokens, found by id
    for role, keys in {"bos_token": ("bos_token_id",), "eos_token": ("eos_token_id",),
                       "unk_token": ("unknown_token_id",), "pad_token": ("padding_token_id",),
                       "prefix_token": ("fim_pre_token_id", "prefix_token_id"),
                       "suffix_token": ("fim_suf_token_id", "suffix_token_id"),
                       "middle_token": ("fim_mid_token_id", "middle_token_id"), "eot_token": ("eot_token_id",)}.items():
        token_id = next((get(k) for k in keys if get(k, None) is not None), None)
        if token_id is not None:
            if not 0 <= int(token_id) < len(tokens):
                raise UserError(f"{path}: tokenizer.ggml.{keys[0]}={token_id} is outside the {len(tokens)} tokens")
            special[role] = tokens[int(token_id)]
    with tempfile.TemporaryDirectory(prefix="codellm-gguf-tok-") as tmp:
        folder = Path(tmp)
        if kind == "llama":
            (folder / "tokenizer.model").write_bytes(_sentencepiece_proto(reader, path, tokens, types, special))
        elif kind == "gpt2":
            (folder / "tokenizer.json").write_text(json.dumps(_bpe_spec(reader, path, tokens, types)),
                                                   encoding="utf-8")
        else:
            raise UserError(f"{path}: tokenizer.ggml.model={kind!r} is not supported (llama: SentencePiece, "
                            "gpt2: byte-level BPE)")
        (folder / "tokenizer_config.json").write_text(json.dumps(special), encoding="utf-8")
        return load_dir(folder)  # the tokenizer holds everything it read; the directory can go


def _sentencepiece_proto(reader, path: Path, tokens: list[str], types: list[int], special: dict) -> bytes:
    """A SentencePiece BPE model with the file's pieces, scores and types (GGUF's token types are
    SentencePiece's piece types, number for number) and Llama's normalizer (identity, escaped spaces)."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    scores = _field(reader, path, "tokenizer.ggml.scores", [0.0] * len(tokens))
    model = pb.ModelProto()
    for piece, score, kind in zip(tokens, scores, types, strict=True):
        entry = model.pieces.add()
        entry.piece, entry.score = piece, float(score)
        entry.type = int(kind) if int(kind) in (1, 2, 3, 4, 5, 6) else int(TokenType.NORMAL)
    if int(TokenType.UNKNOWN) not in types:
        raise UserError(f"{path}: the SentencePiece vocabulary has no unknown token (token_type 2)")
    spec = model.trainer_spec
    spec.model_type = pb.TrainerSpec.BPE
    spec.vocab_size = len(tokens)
    spec.byte_fallback = int(TokenType.BYTE) in types
    spec.unk_id = types.index(int(TokenType.UNKNOWN))
    spec.unk_piece = tokens[spec.unk_id]
    for role in ("bos", "eos", "pad"):
        piece = special.get(f"{role}_token")
        setattr(spec, f"{role}_id", tokens.index(piece) if piece is not None else -1)
        if piece is not None:
            setattr(spec, f"{role}_piece", piece)
    norm = model.normalizer_spec
    norm.name = "identity"
    norm.add_dummy_prefix = bool(_field(reader, path, "tokenizer.ggml.add_space_prefix", True))
    norm.remove_extra_whitespaces = bool(_field(reader, path, "tokenizer.ggml.remove_extra_whitespaces", False))
    norm.escape_whitespaces = True
    return model.SerializeToString()


def _bpe_spec(reader, path: Path, tokens: list[str], types: list[int]) -> dict:
    """A tokenizer.json for a `gpt2` (byte-level BPE) vocabulary; CONTROL tokens become special added tokens,
    USER_DEFINED ones plain added tokens."""
    pre = _field(reader, path, "tokenizer.ggml.pre", "gpt-2")
    if pre not in BPE_PRE:
        raise UserError(f"{path}: tokenizer.ggml.pre={pre!r} is not supported for byte-level BPE "
                        f"(supported: {', '.join(sorted(BPE_PRE))})")
    merges = _field(reader, path, "tokenizer.ggml.merges", [])
    added = [{"id": i, "content": tok, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
              "special": kind == TokenType.CONTROL}
             for i, (tok, kind) in enumerate(zip(tokens, types, strict=True))
             if kind in (TokenType.CONTROL, TokenType.USER_DEFINED)]
    return {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": None,
        "pre_tokenizer": BPE_PRE[pre], "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": {tok: i for i, tok in enumerate(tokens)}, "merges": list(merges)},
    }


# --- out ----------------------------------------------------------------------------------------------

def export(model_dir: str | Path, out: str | Path, qtype: str = "f16") -> Path:
    """Write the model directory `model_dir` (HF layout, dense or codellm-quantized) as a llama.cpp GGUF
    file of type f16, q8_0 or q4_0; returns `out`. Matrices whose rows are not a multiple of 32 stay F16
    (as llama.cpp's converter does); with q4_0 the output head is Q8_0 (llama.cpp's quantizer keeps it
    at a higher precision too); norms are F32."""
    from codellm.checkpoint import load_model

    if qtype not in EXPORT_TYPES:
        raise UserError(f"--type {qtype!r} is not supported; choose one of: {', '.join(EXPORT_TYPES)}")
    src, out = Path(model_dir), Path(out)
    if not src.is_dir():
        raise UserError(f"{src} is not a model directory (export reads a Hugging Face-layout directory)")
    model = load_model(src, dtype="float32")
    writer_path = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    out.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(writer_path, ARCH)
    try:
        _write_metadata(writer, model.cfg, src, qtype)
        fallback = _write_tensors(writer, model, qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(writer_path, out)
    except BaseException:
        writer.close()
        writer_path.unlink(missing_ok=True)
        raise
    if fallback:
        print(f"codellm: note: {len(fallback)} tensors stay F16: their rows are not a multiple of 32 "
              f"({', '.join(fallback[:3])}{', ...' if len(fallback) > 3 else ''})", file=sys.stderr)
    return out


def _write_metadata(writer: gguf.GGUFWriter, cfg: ModelConfig, src: Path, qtype: str):
    writer.add_name(src.resolve().name)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_context_length(cfg.max_seq_len)
    writer.add_embedding_length(cfg.dim)
    writer.add_block_count(cfg.n_layers)
    writer.add_feed_forward_length(cfg.hidden_dim)
    writer.add_rope_dimension_count(cfg.head_dim)
    writer.add_head_count(cfg.n_heads)
    writer.add_head_count_kv(cfg.n_kv_heads)
    writer.add_layer_norm_rms_eps(cfg.norm_eps)
    writer.add_rope_freq_base(cfg.rope_theta)
    if cfg.rope_scaling != 1.0:
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(cfg.rope_scaling)
    writer.add_file_type(FILE_TYPES[qtype])
    if qtype != "f16":
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _write_tokenizer(writer, cfg, src)


def _write_tokenizer(writer: gguf.GGUFWriter, cfg: ModelConfig, src: Path):
    """tokenizer.ggml.* as llama.cpp's converter writes them: `llama` (tokens, scores, types) from a
    tokenizer.model, `gpt2` (tokens, types, merges, pre) from a byte-level BPE tokenizer.json."""
    from codellm.tokenizer import load_tokenizer as load_dir
    from codellm.tokenizer import read_added_tokens

    tok = load_dir(src)
    config_path = src / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
    if (src / "tokenizer.model").is_file():
        tokens, scores, types = _sentencepiece_vocab(src, read_added_tokens(src, config))
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre("default")
    elif (src / "tokenizer.json").is_file():
        tokens, types, merges, pre = _bpe_vocab(src)
        scores = None
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(pre)
    else:
        raise UserError(f"{src}: no tokenizer.model or tokenizer.json to write into the GGUF file")
    if len(tokens) > cfg.vocab_size:
        raise UserError(f"{src}: the tokenizer has {len(tokens)} tokens but the model's vocabulary is "
                        f"{cfg.vocab_size}")
    for i in range(len(tokens), cfg.vocab_size):  # rows the tokenizer never produces, as llama.cpp pads them
        tokens.append(f"[PAD{i}]")
        types.append(int(TokenType.UNUSED))
        if scores is not None:
            scores.append(-1000.0)
    writer.add_token_list(tokens)
    if scores is not None:
        writer.add_token_scores(scores)
    writer.add_token_types(types)
    if scores is None:
        writer.add_token_merges(merges)
    if scores is not None:
        from sentencepiece import sentencepiece_model_pb2 as pb

        proto = pb.ModelProto.FromString((src / "tokenizer.model").read_bytes())
        writer.add_add_space_prefix(proto.normalizer_spec.add_dummy_prefix)
        writer.add_remove_extra_whitespaces(proto.normalizer_spec.remove_extra_whitespaces)
        unk = next((i for i, t in enumerate(types) if t == TokenType.UNKNOWN), None)
        if unk is not None:
            writer.add_unk_token_id(unk)
    for token_id, add in ((tok.bos_id, writer.add_bos_token_id), (tok.eos_id, writer.add_eos_token_id),
                          (tok.pad_id, writer.add_pad_token_id), (tok.eot_id, writer.add_eot_token_id)):
        if token_id is not None:
            add(token_id)
    for token_id, key in ((tok.prefix_id, gguf.Keys.Tokenizer.FIM_PRE_ID),
                          (tok.suffix_id, gguf.Keys.Tokenizer.FIM_SUF_ID),
                          (tok.middle_id, gguf.Keys.Tokenizer.FIM_MID_ID)):
        if token_id is not None:
            writer.add_uint32(key, token_id)
    writer.add_add_bos_token(bool(config.get("add_bos_token", True)))
    writer.add_add_eos_token(bool(config.get("add_eos_token", False)))


def _sentencepiece_vocab(src: Path, added: dict) -> tuple[list[str], list[float], list[int]]:
    """Pieces, scores and piece types of tokenizer.model (types are GGUF's token types, number for number),
    then the tokens a transformers save adds after them: CONTROL when special, else USER_DEFINED."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto.FromString((src / "tokenizer.model").read_bytes())
    tokens = [p.piece for p in proto.pieces]
    scores = [p.score for p in proto.pieces]
    types = [int(p.type) for p in proto.pieces]
    for i in sorted(added):
        kind = int(TokenType.CONTROL if added[i].special else TokenType.USER_DEFINED)
        if i < len(tokens):
            if tokens[i] != added[i].content:  # an added token in place of a piece, as llama.cpp's converter does
                tokens[i], types[i] = added[i].content, kind
            continue
        if i != len(tokens):
            raise UserError(f"{src}: added token id {i} leaves a gap after {len(tokens)} tokens")
        tokens.append(added[i].content)
        scores.append(-1000.0)
        types.append(kind)
    return tokens, scores, types


def _bpe_vocab(src: Path) -> tuple[list[str], list[int], list[str], str]:
    spec = json.loads((src / "tokenizer.json").read_text(encoding="utf-8"))
    model = spec.get("model") or {}
    pre = next((name for name, p in BPE_PRE.items() if _same_pre(spec.get("pre_tokenizer"), p)), None)
    if model.get("type") != "BPE" or pre is None or spec.get("normalizer") is not None:
        raise UserError(f"{src}/tokenizer.json: only a byte-level BPE tokenizer (no normalizer, a GPT-2 or "
                        "digits + GPT-2 pre-tokenizer) can be written as a GGUF gpt2 vocabulary; a SentencePiece "
                        "model needs its tokenizer.model beside it")
    vocab = dict(model["vocab"])
    special = {}
    for t in spec.get("added_tokens", []):
        vocab[t["content"]] = t["id"]
        special[t["id"]] = t["special"]
    by_id = {i: t for t, i in vocab.items()}
    if sorted(by_id) != list(range(len(by_id))):
        raise UserError(f"{src}/tokenizer.json: token ids are not 0..{len(by_id) - 1} without gaps")
    tokens = [by_id[i] for i in range(len(by_id))]
    types = [int(TokenType.NORMAL if i not in special else TokenType.CONTROL if special[i]
                 else TokenType.USER_DEFINED) for i in range(len(tokens))]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    return tokens, types, merges, pre


def _same_pre(found: dict | None, want: dict) -> bool:
    """Equal pre-tokenizers, ignoring keys that do not change the split (trim_offsets: offsets only)."""
    if not isinstance(found, dict) or found.get("type") != want["type"]:
        return False
    if want["type"] == "Sequence":
        inner = found.get("pretokenizers", [])
        return len(inner) == len(want["pretokenizers"]) and all(map(_same_pre, inner, want["pretokenizers"]))
    return all(found.get(k, v) == v for k, v in want.items() if k != "trim_offsets")


def _write_tensors(writer: gguf.GGUFWriter, model: Transformer, qtype: str) -> list[str]:
    """Every tensor under its GGUF name, q/k permuted; -> names that fell back to F16."""
    cfg, target = model.cfg, EXPORT_TYPES[qtype]
    ours_to_gguf = {f"layers.{i}.{ours}.weight": f"blk.{i}.{theirs}.weight"
                    for i in range(cfg.n_layers) for theirs, ours in LAYER_TENSORS.items()}
    ours_to_gguf.update({f"{ours}.weight": f"{theirs}.weight" for theirs, ours in TOP_TENSORS.items()})
    heads = {"self_attn.q_proj.weight": cfg.n_heads, "self_attn.k_proj.weight": cfg.n_kv_heads}
    fallback = []
    for name, tensor in _dense_state(model).items():
        w = tensor.detach().to("cpu", torch.float32).numpy()
        n_heads = next((n for suffix, n in heads.items() if name.endswith(suffix)), None)
        w = _permute(w, n_heads) if n_heads else w
        gguf_name = ours_to_gguf[name]
        if w.ndim == 1:
            writer.add_tensor(gguf_name, np.ascontiguousarray(w, dtype=np.float32))
            continue
        kind = GGML.Q8_0 if target == GGML.Q4_0 and name == "lm_head.weight" else target
        if kind != GGML.F16 and w.shape[1] % 32:
            fallback.append(gguf_name)
            kind = GGML.F16
        if kind == GGML.F16:
            writer.add_tensor(gguf_name, np.ascontiguousarray(w, dtype=np.float16))
        else:
            writer.add_tensor(gguf_name, gguf.quants.quantize(np.ascontiguousarray(w), kind), raw_dtype=kind)
    return fallback


def _dense_state(model: Transformer) -> dict[str, torch.Tensor]:
    """name -> dense weight of every tensor (quantized projections widened to fp32)."""
    state = {}
    for name, module in model.named_modules():
        if isinstance(module, weights.QuantLinear):
            state[f"{name}.weight"] = module.dequantized()
        elif isinstance(module, nn.Linear | nn.Embedding) or type(module).__name__ == "RMSNorm":
            state[f"{name}.weight"] = module.weight
    return state
