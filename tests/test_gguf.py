"""GGUF in and out (codellm/gguf.py): files written by the `gguf` package load with logits equal to their
dequantized reference; exported files read back equal; the tokenizer survives both ways."""

import os
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as GGML
from sentencepiece import sentencepiece_model_pb2 as pb

from codellm import gguf as cg
from codellm import weights
from codellm.arch.meta import permute_rope
from codellm.checkpoint import save_model
from codellm.config import ModelConfig
from codellm.errors import UserError
from codellm.model import Transformer
from codellm.tokenizer import load_tokenizer
from tests.conftest import needs_cxx, tiny_model
from tests.tokenizer_fixtures import make_bpe_dir, make_sentencepiece_dir

SAMPLES = ["def add(a, b):\n    return a + b\n", "  x = [1, 22, 333]  # café ☺ 日本", "\n\n\tclass P:\n",
           "<PRE> literal"]
NAMES = {ours: theirs for theirs, ours in cg.LAYER_TENSORS.items()}


@pytest.fixture(scope="module")
def sp_dir(tmp_path_factory):
    return make_sentencepiece_dir(tmp_path_factory.mktemp("sp"))


def gguf_name(name: str) -> str:
    if name.startswith("layers."):
        _, i, rest = name.split(".", 2)
        return f"blk.{i}.{NAMES[rest.removesuffix('.weight')]}.weight"
    return {"embed_tokens.weight": "token_embd.weight", "norm.weight": "output_norm.weight",
            "lm_head.weight": "output.weight"}[name]


def llama_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py's LlamaModel.permute, verbatim."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def random_kquant(rows: int, cols: int, qtype: GGML, rng: np.random.Generator) -> np.ndarray:
    """Random K-quant blocks (the gguf package cannot quantize them) with small positive fp16 scales."""
    size, nbytes = gguf.GGML_QUANT_SIZES[qtype]
    blocks = rng.integers(0, 256, (rows, cols // size, nbytes), dtype=np.uint8)
    scale = lambda n: np.full((rows, cols // size, n), 4e-4, np.float16).view(np.uint8)
    if qtype == GGML.Q6_K:
        blocks[..., -2:] = scale(1)  # d is last
    else:
        blocks[..., 0:4] = scale(2)  # d, dmin first
    return blocks.reshape(rows, -1)


def write_gguf(path: Path, model: Transformer, tok_dir: Path, types: dict[str, GGML], seed: int = 0):
    """A llama GGUF file as llama.cpp's converter lays it out, written with the gguf package's writer:
    q/k permuted, each tensor in `types[gguf name]` (default F32), the SentencePiece vocabulary from
    tokenizer.model with Code Llama's infilling ids."""
    cfg, rng = model.cfg, np.random.default_rng(seed)
    w = gguf.GGUFWriter(path, "llama")
    w.add_context_length(cfg.max_seq_len)
    w.add_embedding_length(cfg.dim)
    w.add_block_count(cfg.n_layers)
    w.add_feed_forward_length(cfg.hidden_dim)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_head_count(cfg.n_heads)
    w.add_head_count_kv(cfg.n_kv_heads)
    w.add_layer_norm_rms_eps(cfg.norm_eps)
    w.add_rope_freq_base(cfg.rope_theta)
    proto = pb.ModelProto.FromString((tok_dir / "tokenizer.model").read_bytes())
    w.add_tokenizer_model("llama")
    w.add_token_list([p.piece for p in proto.pieces])
    w.add_token_scores([p.score for p in proto.pieces])
    w.add_token_types([int(p.type) for p in proto.pieces])
    pieces = [p.piece for p in proto.pieces]
    w.add_bos_token_id(1), w.add_eos_token_id(2), w.add_unk_token_id(0)
    w.add_uint32(gguf.Keys.Tokenizer.PREFIX_ID, pieces.index("▁<PRE>"))  # the older keys, as Code Llama files have
    w.add_uint32(gguf.Keys.Tokenizer.SUFFIX_ID, pieces.index("▁<SUF>"))
    w.add_uint32(gguf.Keys.Tokenizer.MIDDLE_ID, pieces.index("▁<MID>"))
    w.add_eot_token_id(pieces.index("▁<EOT>"))
    heads = {"attn_q": cfg.n_heads, "attn_k": cfg.n_kv_heads}
    for name, t in model.state_dict().items():
        key = gguf_name(name)
        a = t.float().numpy()
        n_heads = heads.get(key.split(".")[-2])
        a = llama_permute(a, n_heads) if n_heads else a
        qtype = types.get(key, GGML.F32)
        if qtype == GGML.F32:
            w.add_tensor(key, a)
        elif qtype == GGML.F16:
            w.add_tensor(key, a.astype(np.float16))
        elif qtype in (GGML.Q4_K, GGML.Q5_K, GGML.Q6_K):
            w.add_tensor(key, random_kquant(*a.shape, qtype, rng), raw_dtype=qtype)
        else:
            w.add_tensor(key, gguf.quants.quantize(a, qtype), raw_dtype=qtype)
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    return path


def dequantized_reference(path: Path) -> Transformer:
    """The file's tensors dequantized by the gguf package, q/k rows back to rotate-half, in a dense model."""
    reader = gguf.GGUFReader(path)
    field = lambda key, default=None: reader.fields[key].contents() if key in reader.fields else default
    tensors = {t.name: t for t in reader.tensors}
    cfg = ModelConfig(vocab_size=int(tensors["token_embd.weight"].shape[1]), dim=field("llama.embedding_length"),
                      n_layers=field("llama.block_count"), n_heads=field("llama.attention.head_count"),
                      n_kv_heads=field("llama.attention.head_count_kv"), hidden_dim=field("llama.feed_forward_length"),
                      max_seq_len=field("llama.context_length"), rope_theta=field("llama.rope.freq_base"),
                      norm_eps=field("llama.attention.layer_norm_rms_epsilon"))
    model = Transformer(cfg).eval()
    state = {}
    for name, p in model.state_dict().items():
        t = tensors[gguf_name(name)]
        a = torch.from_numpy(gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).copy()).reshape(p.shape)
        if name.endswith("q_proj.weight"):
            a = permute_rope(a, cfg.n_heads)
        elif name.endswith("k_proj.weight"):
            a = permute_rope(a, cfg.n_kv_heads)
        state[name] = a.float()
    model.load_state_dict(state)
    return model


def logits(model, seed=0):
    tokens = torch.randint(0, model.cfg.vocab_size, (2, 9), generator=torch.Generator().manual_seed(seed))
    with torch.inference_mode():
        return model(tokens)


def kquant_model(vocab: int) -> Transformer:
    # K-quant blocks hold 256 inputs: every matrix's input width is a multiple of 256
    return tiny_model(vocab, dim=256, hidden_dim=256, n_heads=4, n_kv_heads=2)


MIXED = {  # llama.cpp K-quant files mix types per tensor; layer 1's q/k/v mix Q4_0 with Q8_0
    "token_embd.weight": GGML.Q4_K, "output.weight": GGML.Q6_K,
    "blk.0.attn_q.weight": GGML.Q4_0, "blk.0.attn_k.weight": GGML.Q4_0, "blk.0.attn_v.weight": GGML.Q4_0,
    "blk.0.attn_output.weight": GGML.Q4_1, "blk.0.ffn_gate.weight": GGML.Q8_0, "blk.0.ffn_up.weight": GGML.Q8_0,
    "blk.0.ffn_down.weight": GGML.Q5_K,
    "blk.1.attn_q.weight": GGML.Q4_0, "blk.1.attn_k.weight": GGML.Q4_0, "blk.1.attn_v.weight": GGML.Q8_0,
    "blk.1.attn_output.weight": GGML.BF16, "blk.1.ffn_gate.weight": GGML.Q4_K, "blk.1.ffn_up.weight": GGML.Q4_K,
    "blk.1.ffn_down.weight": GGML.F16,
}


def test_quantized_file_loads_with_logits_of_its_dequantized_reference(sp_dir, tmp_path, capsys):
    tok = load_tokenizer(sp_dir)
    path = write_gguf(tmp_path / "mixed.gguf", kquant_model(tok.vocab_size), sp_dir, MIXED)
    model, _ = cg.load(path)
    torch.testing.assert_close(logits(model), logits(dequantized_reference(path)))
    # the weight formats Q8_0/Q4_0/Q4_1 map to, held as they are; the rest dense
    kinds = {name: (weights.format_of(m), getattr(m, "symmetric", None)) for name, m in model.named_modules()
             if isinstance(m, torch.nn.Linear | weights.QuantLinear)}
    assert kinds["layers.0.self_attn.q_proj"] == ("int4", True) and kinds["layers.0.self_attn.v_proj"] == ("int4", True)
    assert kinds["layers.0.self_attn.o_proj"] == ("int4", False)
    assert kinds["layers.0.mlp.gate_proj"] == ("int8", None) and model.layers[0].mlp.gate_proj.group == 32
    assert kinds["layers.1.self_attn.q_proj"] == ("dense", None)  # its group mixes Q4_0 with Q8_0: one format each
    assert kinds["layers.0.mlp.down_proj"] == kinds["lm_head"] == ("dense", None)
    note = capsys.readouterr().err.strip().splitlines()
    assert len(note) == 1 and "Q4_K" in note[0] and "Q6_K" in note[0] and "Q5_K" in note[0]
    # and inference's fused layout runs the same numbers
    fused = cg.load_model(path).fuse_projections()
    torch.testing.assert_close(logits(fused), logits(model))


@pytest.mark.parametrize("types", ["F16", "Q8_0", "Q4_0", "Q4_1"])
def test_uniform_file_types(sp_dir, tmp_path, types):
    tok = load_tokenizer(sp_dir)
    model = tiny_model(tok.vocab_size, hidden_dim=192)
    qtype = GGML[types]
    path = write_gguf(tmp_path / "m.gguf", model, sp_dir,
                      {gguf_name(n): qtype for n, p in model.state_dict().items() if p.ndim == 2})
    loaded = cg.load_model(path)
    torch.testing.assert_close(logits(loaded), logits(dequantized_reference(path)))
    if types != "F16":
        assert weights.format_of(loaded.layers[1].mlp.down_proj) == {"Q8_0": "int8"}.get(types, "int4")


def test_tokenizer_from_metadata_equals_the_source(sp_dir, tmp_path):
    source = load_tokenizer(sp_dir)
    path = write_gguf(tmp_path / "t.gguf", tiny_model(source.vocab_size), sp_dir, {})
    tok = cg.load_tokenizer(path)
    for attr in ("vocab_size", "bos_id", "eos_id", "pad_id", "prefix_id", "suffix_id", "middle_id", "eot_id"):
        assert getattr(tok, attr) == getattr(source, attr), attr
    assert tok.has_infilling and tok.prefix_id == source.piece_to_id("▁<PRE>")
    for text in SAMPLES:
        assert tok.encode(text, bos=True) == source.encode(text, bos=True)
        assert tok.encode_nospace(text) == source.encode_nospace(text)
        assert tok.decode(source.encode(text)) == source.decode(source.encode(text))


@pytest.mark.parametrize("qtype", ["f16", "q8_0", "q4_0"])
def test_export_reads_back_equal(sp_dir, tmp_path, qtype):
    source = load_tokenizer(sp_dir)
    model = tiny_model(source.vocab_size, hidden_dim=192)
    src = save_model(model, tmp_path / "model", tokenizer_dir=sp_dir)
    out = cg.export(src, tmp_path / "m.gguf", qtype)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf", "model"]  # no temporary file left
    reader = gguf.GGUFReader(out)
    field = lambda key: reader.fields[key].contents()
    cfg = model.cfg
    assert field("general.architecture") == "llama"
    assert (field("llama.embedding_length"), field("llama.block_count"), field("llama.feed_forward_length"),
            field("llama.attention.head_count"), field("llama.attention.head_count_kv"),
            field("llama.context_length"), field("llama.rope.dimension_count")) == \
        (cfg.dim, cfg.n_layers, cfg.hidden_dim, cfg.n_heads, cfg.n_kv_heads, cfg.max_seq_len, cfg.head_dim)
    assert field("llama.rope.freq_base") == cfg.rope_theta
    assert field("general.file_type") == {"f16": 1, "q8_0": 7, "q4_0": 2}[qtype]
    # tokenizer metadata: the SentencePiece model's pieces, scores and types; special and infilling ids
    proto = pb.ModelProto.FromString((sp_dir / "tokenizer.model").read_bytes())
    assert field("tokenizer.ggml.model") == "llama"
    assert field("tokenizer.ggml.tokens") == [p.piece for p in proto.pieces]
    assert field("tokenizer.ggml.scores") == pytest.approx([p.score for p in proto.pieces])
    assert field("tokenizer.ggml.token_type") == [int(p.type) for p in proto.pieces]
    assert (field("tokenizer.ggml.bos_token_id"), field("tokenizer.ggml.eos_token_id"),
            field("tokenizer.ggml.fim_pre_token_id"), field("tokenizer.ggml.fim_suf_token_id"),
            field("tokenizer.ggml.fim_mid_token_id"), field("tokenizer.ggml.eot_token_id")) == \
        (source.bos_id, source.eos_id, source.prefix_id, source.suffix_id, source.middle_id, source.eot_id)
    # tensors: llama.cpp's names and q/k order; values within the type's rounding
    tensors = {t.name: t for t in reader.tensors}
    assert len(tensors) == len(model.state_dict())
    for name, p in model.state_dict().items():
        t = tensors[gguf_name(name)]
        got = torch.from_numpy(gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).copy()).reshape(p.shape)
        heads = {"q_proj": cfg.n_heads, "k_proj": cfg.n_kv_heads}.get(name.split(".")[-2])
        got = permute_rope(got, heads) if heads else got
        if p.ndim == 1:
            assert t.tensor_type == GGML.F32 and torch.equal(got, p)
            continue
        want = {"f16": GGML.F16, "q8_0": GGML.Q8_0, "q4_0": GGML.Q4_0}[qtype]
        if qtype == "q4_0" and name == "lm_head.weight":
            want = GGML.Q8_0  # the head one step up, as llama.cpp's quantizer keeps it
        assert t.tensor_type == want, name
        block_max = p.reshape(p.shape[0], -1, 32).abs().amax(-1, keepdim=True).expand(-1, -1, 32).reshape(p.shape)
        step = {GGML.F16: p.abs() / 1024, GGML.Q8_0: block_max / 127, GGML.Q4_0: block_max / 8}[want]
        # half a step, plus the fp16 rounding of the block's scale (up to 2**-11 of up to 127 steps); Q4_0 maps
        # the signed peak to -8, so the other sign tops out at 7 steps: a whole step there
        bound = step * (1 + 8 / 2048) if want == GGML.Q4_0 else step * (0.5 + 127 / 2048)
        assert ((got - p).abs() <= bound + 1e-7).all(), name
    # and the loader reads it: logits equal the dequantized reference, tokenizer ids equal the source's
    loaded, tok = cg.load(out)
    torch.testing.assert_close(logits(loaded), logits(dequantized_reference(out)))
    for text in SAMPLES:
        assert tok.encode(text, bos=True) == source.encode(text, bos=True)
    assert (tok.prefix_id, tok.suffix_id, tok.middle_id, tok.eot_id) == \
        (source.prefix_id, source.suffix_id, source.middle_id, source.eot_id)


def test_export_of_a_byte_level_bpe_model_round_trips(tmp_path):
    """codellm's own tokenizer (byte-level BPE, single digits) as llama.cpp's gpt2 vocabulary, pre starcoder."""
    bpe_dir = make_bpe_dir(tmp_path / "bpe")
    source = load_tokenizer(bpe_dir)
    model = tiny_model(source.vocab_size)
    src = save_model(model, tmp_path / "model", tokenizer_dir=bpe_dir)
    out = cg.export(src, tmp_path / "m.gguf", "f16")
    reader = gguf.GGUFReader(out)
    assert reader.fields["tokenizer.ggml.model"].contents() == "gpt2"
    assert reader.fields["tokenizer.ggml.pre"].contents() == "starcoder"
    loaded, tok = cg.load(out)
    torch.testing.assert_close(logits(loaded), logits(dequantized_reference(out)))
    for attr in ("vocab_size", "bos_id", "eos_id", "pad_id", "prefix_id", "suffix_id", "middle_id", "eot_id"):
        assert getattr(tok, attr) == getattr(source, attr), attr
    for text in SAMPLES:
        assert tok.encode(text, bos=True) == source.encode(text, bos=True)
        assert tok.decode_continuation(source.encode(text)) == source.decode_continuation(source.encode(text))


def run(*args):
    return subprocess.run([sys.executable, "-m", "codellm", *map(str, args)], capture_output=True, text=True,
                          timeout=180, env=os.environ)


def test_cli_export_then_complete(sp_dir, tmp_path):
    """`codellm export gguf` then `codellm complete --model file.gguf`: the greedy text of the in-process
    generator on the loaded file; Q8_0 runs through the native step (--compile implied on a CPU)."""
    from codellm.generate import complete
    from codellm.sampling import SamplingParams

    tok = load_tokenizer(sp_dir)
    src = save_model(tiny_model(tok.vocab_size), tmp_path / "model", tokenizer_dir=sp_dir)
    out = run("export", "gguf", src, "--type", "q8_0", "--out", tmp_path / "m.gguf")
    assert out.returncode == 0 and "wrote q8_0 GGUF" in out.stdout, out.stderr
    again = run("export", "gguf", src, "--type", "q8_0", "--out", tmp_path / "m.gguf")
    assert again.returncode == 2 and "--force" in again.stderr
    model, tok = cg.load(tmp_path / "m.gguf")
    expected = "".join(e.text for e in complete(model, tok, "def add(a, b):", SamplingParams(max_new_tokens=10)))
    done = run("complete", "def add(a, b):", "--model", tmp_path / "m.gguf", "--max-new-tokens", "10")
    assert done.returncode == 0, done.stderr
    assert done.stdout.rstrip("\n") == expected.rstrip("\n") and expected.strip()
    info = run("info", "--model", tmp_path / "m.gguf")
    assert info.returncode == 0 and f"{model.cfg.n_layers} / {model.cfg.dim} / {model.cfg.hidden_dim}" in info.stdout
    assert f"PRE/SUF/MID/EOT = {tok.prefix_id}/{tok.suffix_id}/{tok.middle_id}/{tok.eot_id}" in info.stdout


@needs_cxx
def test_cli_complete_native_matches_for_q4(sp_dir, tmp_path):
    tok = load_tokenizer(sp_dir)
    model = tiny_model(tok.vocab_size, hidden_dim=192)
    path = write_gguf(tmp_path / "m.gguf", model, sp_dir,
                      {gguf_name(n): GGML.Q4_0 for n, p in model.state_dict().items() if p.ndim == 2})
    from codellm.generate import complete
    from codellm.sampling import SamplingParams

    loaded, tok = cg.load(path)
    expected = "".join(e.text for e in complete(loaded, tok, "def add(a, b):", SamplingParams(max_new_tokens=10)))
    done = run("complete", "def add(a, b):", "--model", path, "--max-new-tokens", "10", "--compile")
    assert done.returncode == 0, done.stderr
    assert done.stdout.rstrip("\n") == expected.rstrip("\n")


def test_errors_are_one_line(sp_dir, tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\x00" * 10)
    out = run("complete", "x", "--model", bad)
    assert out.returncode == 2 and "cannot read it as a GGUF file" in out.stderr and "Traceback" not in out.stderr
    w = gguf.GGUFWriter(tmp_path / "other.gguf", "gpt2")
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    with pytest.raises(UserError, match="general.architecture is 'gpt2'"):
        cg.load(tmp_path / "other.gguf")
    src = save_model(tiny_model(load_tokenizer(sp_dir).vocab_size), tmp_path / "model", tokenizer_dir=sp_dir)
    with pytest.raises(UserError, match="--type 'q5_0' is not supported"):
        cg.export(src, tmp_path / "x.gguf", "q5_0")


def test_quantize_flag_is_refused_for_quantized_blocks(sp_dir, tmp_path):
    """--quantize on a file whose projections are Q8_0: a clear error, not a second rounding."""
    path = write_gguf(tmp_path / "q8.gguf", tiny_model(load_tokenizer(sp_dir).vocab_size, hidden_dim=192), sp_dir,
                      {"blk.0.attn_q.weight": GGML.Q8_0, "blk.0.attn_k.weight": GGML.Q8_0,
                       "blk.0.attn_v.weight": GGML.Q8_0})
    out = run("complete", "x", "--model", path, "--quantize", "int8")
    assert out.returncode == 2 and "--quantize" in out.stderr and "runs as they are" in out.stderr
