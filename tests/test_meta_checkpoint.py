"""Meta's own download layout (params.json, consolidated.NN.pth model-parallel shards, tokenizer.model):
loaded directly and converted to the Hugging Face layout (`codellm convert`).

The reference is Meta's model itself, run as its model-parallel ranks run it (llama/model.py with fairscale's
layers): each rank embeds its slice of the embedding dimension, computes its own heads with interleaved
(complex) RoPE and its slice of the SwiGLU width, and the row-parallel outputs are summed. Nothing of
codellm's merge or permutation is used to compute it.
"""

import json
import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from transformers import AutoTokenizer, LlamaForCausalLM

from codellm.checkpoint import convert, load_config, load_model
from codellm.cli import main
from codellm.errors import UserError
from codellm.formats import infill_prompt
from codellm.tokenizer import load_tokenizer
from tests.tokenizer_fixtures import make_sentencepiece_dir

# Code Llama's params.json shape, scaled down: GQA (4 query heads, 2 kv heads), FFN width from multiple_of
PARAMS = {"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "multiple_of": 16, "ffn_dim_multiplier": 1.0,
          "norm_eps": 1e-5, "rope_theta": 1e6, "vocab_size": -1}
HIDDEN = 176  # Meta's FeedForward: 4*64 -> int(2*256/3) = 170 -> next multiple of 16
COLUMN = ("attention.wq", "attention.wk", "attention.wv", "feed_forward.w1", "feed_forward.w3")
ROW = ("attention.wo", "feed_forward.w2")
TOKENS = torch.tensor([[1, 5, 9, 33, 2, 17, 100, 7, 64, 3], [1, 250, 4, 4, 80, 12, 6, 300, 99, 41]])


def full_weights(vocab: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights of the whole model, in Meta's names and (interleaved-RoPE) layout."""
    g = torch.Generator().manual_seed(seed)
    dim, kv = PARAMS["dim"], PARAMS["n_kv_heads"] * PARAMS["dim"] // PARAMS["n_heads"]
    rnd = lambda *shape: torch.randn(*shape, generator=g) * 0.3
    norm = lambda: 1 + 0.2 * torch.randn(dim, generator=g)  # not all ones: a swapped norm shows
    w = {"tok_embeddings.weight": rnd(vocab, dim), "norm.weight": norm(), "output.weight": rnd(vocab, dim)}
    for i in range(PARAMS["n_layers"]):
        p = f"layers.{i}."
        w.update({p + "attention.wq.weight": rnd(dim, dim), p + "attention.wk.weight": rnd(kv, dim),
                  p + "attention.wv.weight": rnd(kv, dim), p + "attention.wo.weight": rnd(dim, dim),
                  p + "feed_forward.w1.weight": rnd(HIDDEN, dim), p + "feed_forward.w2.weight": rnd(dim, HIDDEN),
                  p + "feed_forward.w3.weight": rnd(HIDDEN, dim),
                  p + "attention_norm.weight": norm(), p + "ffn_norm.weight": norm()})
    return w


def split_like_fairscale(weights: dict[str, torch.Tensor], ranks: int) -> list[dict[str, torch.Tensor]]:
    """Each rank's state dict: ColumnParallelLinear keeps output rows, RowParallelLinear input columns,
    ParallelEmbedding a slice of the embedding dimension; norms are replicated (and Llama 2 files carry
    the rope.freqs buffer)."""
    shards = [{} for _ in range(ranks)]
    for name, t in weights.items():
        if name == "output.weight" or name.endswith(tuple(f"{c}.weight" for c in COLUMN)):
            parts = t.chunk(ranks, dim=0)
        elif name == "tok_embeddings.weight" or name.endswith(tuple(f"{r}.weight" for r in ROW)):
            parts = t.chunk(ranks, dim=1)
        else:
            parts = [t] * ranks
        for shard, part in zip(shards, parts, strict=True):
            shard[name] = part.clone()
    hd = PARAMS["dim"] // PARAMS["n_heads"]
    for shard in shards:
        shard["rope.freqs"] = 1.0 / (PARAMS["rope_theta"] ** (torch.arange(0, hd, 2).float() / hd))
    return shards


def meta_forward(shards: list[dict[str, torch.Tensor]], tokens: torch.Tensor) -> torch.Tensor:
    """Meta's Transformer.forward (llama/model.py), every rank's part computed and gathered/reduced."""
    ranks, dim, n_heads, n_kv = len(shards), PARAMS["dim"], PARAMS["n_heads"], PARAMS["n_kv_heads"]
    hd, local_heads, local_kv = dim // n_heads, n_heads // ranks, n_kv // ranks
    B, T = tokens.shape
    freqs = 1.0 / (PARAMS["rope_theta"] ** (torch.arange(0, hd, 2)[: hd // 2].float() / hd))
    freqs_cis = torch.polar(torch.ones(T, hd // 2), torch.outer(torch.arange(T).float(), freqs))

    def rope(x):  # apply_rotary_emb: adjacent pairs of each head as complex numbers
        xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
        return torch.view_as_real(xc * freqs_cis[None, :, None, :]).flatten(3)

    def rms(x, weight):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + PARAMS["norm_eps"]) * weight

    mask = torch.full((T, T), float("-inf")).triu(1)
    h = torch.cat([s["tok_embeddings.weight"][tokens] for s in shards], dim=-1)  # gathered embedding slices
    for i in range(PARAMS["n_layers"]):
        p = f"layers.{i}."
        x, attn = rms(h, shards[0][p + "attention_norm.weight"]), 0
        for s in shards:
            q = rope((x @ s[p + "attention.wq.weight"].T).view(B, T, local_heads, hd))
            k = rope((x @ s[p + "attention.wk.weight"].T).view(B, T, local_kv, hd))
            v = (x @ s[p + "attention.wv.weight"].T).view(B, T, local_kv, hd)
            k, v = (t.repeat_interleave(local_heads // local_kv, dim=2) for t in (k, v))  # repeat_kv
            scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(hd) + mask
            out = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v).reshape(B, T, local_heads * hd)
            attn = attn + out @ s[p + "attention.wo.weight"].T  # row-parallel: all-reduce (sum)
        h = h + attn
        x = rms(h, shards[0][p + "ffn_norm.weight"])
        h = h + sum((F.silu(x @ s[p + "feed_forward.w1.weight"].T) * (x @ s[p + "feed_forward.w3.weight"].T))
                    @ s[p + "feed_forward.w2.weight"].T for s in shards)
    h = rms(h, shards[0]["norm.weight"])
    return torch.cat([h @ s["output.weight"].T for s in shards], dim=-1)  # column-parallel: gather


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    return make_sentencepiece_dir(tmp_path_factory.mktemp("sp"))


@pytest.fixture(scope="module")
def weights(tokenizer_dir):
    vocab = load_tokenizer(tokenizer_dir).vocab_size
    return full_weights(vocab + vocab % 2)  # output rows split evenly over 2 ranks


def write_meta_dir(path, weights, ranks, tokenizer_dir, dtype=torch.float32, **params):
    """A folder as Meta's download.sh leaves it."""
    path.mkdir(parents=True, exist_ok=True)
    for rank, shard in enumerate(split_like_fairscale(weights, ranks)):
        torch.save({k: v.to(dtype) for k, v in shard.items()}, path / f"consolidated.{rank:02d}.pth")
    (path / "params.json").write_text(json.dumps({**PARAMS, **params}))
    (path / "tokenizer.model").write_bytes((tokenizer_dir / "tokenizer.model").read_bytes())
    return path


def logits(model, tokens=TOKENS):
    with torch.no_grad():
        return model(tokens)


@pytest.mark.parametrize("ranks", [1, 2])
def test_meta_layout_loads_with_metas_logits(tmp_path, weights, tokenizer_dir, ranks):
    meta_dir = write_meta_dir(tmp_path / "meta", weights, ranks, tokenizer_dir)
    cfg = load_config(meta_dir)
    assert (cfg.hidden_dim, cfg.n_kv_heads, cfg.rope_theta, cfg.max_seq_len) == (HIDDEN, 2, 1e6, 16384)
    assert cfg.vocab_size == weights["tok_embeddings.weight"].shape[0]
    expected = meta_forward(split_like_fairscale(weights, ranks), TOKENS)
    torch.testing.assert_close(logits(load_model(meta_dir)), expected)
    if ranks == 2:  # and Meta's model gives the same logits whatever the number of ranks
        torch.testing.assert_close(expected, meta_forward(split_like_fairscale(weights, 1), TOKENS))


@pytest.mark.parametrize("ranks", [1, 2])
def test_convert_writes_the_hf_layout(tmp_path, weights, tokenizer_dir, ranks):
    meta_dir = write_meta_dir(tmp_path / "meta", weights, ranks, tokenizer_dir)
    out = tmp_path / "hf"
    if ranks == 2:  # the command as a user runs it
        run = subprocess.run([sys.executable, "-m", "codellm", "convert", str(meta_dir), "--out", str(out)],
                             capture_output=True, text=True, timeout=120)
        assert run.returncode == 0, run.stderr
        assert str(out) in run.stdout
    else:
        convert(meta_dir, out)
    assert {"config.json", "model.safetensors", "tokenizer.model", "tokenizer_config.json"} <= \
        {p.name for p in out.iterdir()}
    ours = logits(load_model(meta_dir))
    torch.testing.assert_close(logits(load_model(out)), ours, rtol=0, atol=0)
    hf = LlamaForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(TOKENS).logits, ours)
    torch.testing.assert_close(hf(TOKENS).logits, meta_forward(split_like_fairscale(weights, ranks), TOKENS))


def test_converted_tokenizer_infills_as_the_meta_folder_and_transformers(tmp_path, weights, tokenizer_dir):
    meta_dir = write_meta_dir(tmp_path / "meta", weights, 1, tokenizer_dir)
    out = convert(meta_dir, tmp_path / "hf")
    direct, converted = load_tokenizer(meta_dir), load_tokenizer(out)
    hf = AutoTokenizer.from_pretrained(out)  # CodeLlamaTokenizerFast, built from tokenizer.model
    assert type(hf).__name__ == "CodeLlamaTokenizerFast"
    assert (hf.prefix_id, hf.suffix_id, hf.middle_id, hf.eot_id) == \
        (direct.prefix_id, direct.suffix_id, direct.middle_id, direct.eot_id) != (None,) * 4
    for prefix, suffix in [("def f(x):\n    ", "\n    return y\n"), (" a", "b "), ("x = '日本'", "  # 🙂")]:
        ids = hf(prefix, suffix=suffix)["input_ids"]
        assert infill_prompt(direct, prefix, suffix) == infill_prompt(converted, prefix, suffix) == ids
    assert hf("def add(a, b):", return_tensors="pt").keys() == {"input_ids", "attention_mask"}


def test_meta_folder_runs_directly_from_the_cli(tmp_path, weights, tokenizer_dir):
    meta_dir = write_meta_dir(tmp_path / "meta", weights, 2, tokenizer_dir)
    run = subprocess.run([sys.executable, "-m", "codellm", "infill", "--model", str(meta_dir), "--prefix",
                          "def f(x):\n    ", "--suffix", "\n    return y\n", "--max-new-tokens", "4"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr


def test_bfloat16_weights_stay_bfloat16(tmp_path, weights, tokenizer_dir):
    meta_dir = write_meta_dir(tmp_path / "meta", weights, 2, tokenizer_dir, dtype=torch.bfloat16)
    out = convert(meta_dir, tmp_path / "hf")
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        q = f.get_tensor("model.layers.0.self_attn.q_proj.weight")
    assert q.dtype == torch.bfloat16
    torch.testing.assert_close(logits(load_model(out)), logits(load_model(meta_dir)), rtol=0, atol=0)


def test_llama2_params_without_rope_theta(tmp_path, weights, tokenizer_dir):
    """Llama 2's params.json has no rope_theta: 10000, and the context is Llama 2's 4096."""
    params = {k: v for k, v in PARAMS.items() if k != "rope_theta"}
    meta_dir = tmp_path / "meta"
    write_meta_dir(meta_dir, weights, 1, tokenizer_dir)
    (meta_dir / "params.json").write_text(json.dumps(params))
    cfg = load_config(meta_dir)
    assert (cfg.rope_theta, cfg.max_seq_len) == (10_000.0, 4096)


def test_bad_meta_folders_are_clear_errors(tmp_path, weights, tokenizer_dir, capsys):
    meta_dir = write_meta_dir(tmp_path / "meta", weights, 2, tokenizer_dir)
    (meta_dir / "consolidated.00.pth").rename(tmp_path / "moved.pth")
    with pytest.raises(UserError, match=r"shards are missing: consolidated\.00\.pth \(found 1 of 2\)"):
        load_model(meta_dir)
    (tmp_path / "moved.pth").rename(meta_dir / "consolidated.00.pth")

    (meta_dir / "params.json").write_text(json.dumps({**PARAMS, "dim": 96}))
    with pytest.raises(UserError, match=r"k_proj.weight' has shape \(32, 64\), params.json implies \(48, 96\)"):
        load_model(meta_dir)
    (meta_dir / "params.json").write_text(json.dumps({**PARAMS, "n_heads": "four"}))
    with pytest.raises(UserError, match="n_heads must be a positive integer"):
        load_config(meta_dir)
    (meta_dir / "params.json").write_text("{")
    with pytest.raises(UserError, match="params.json is not valid JSON"):
        load_config(meta_dir)
    (meta_dir / "params.json").write_text(json.dumps(PARAMS))

    for f in meta_dir.glob("consolidated.*.pth"):
        shard = torch.load(f)
        shard["layers.0.attention.wz.weight"] = torch.zeros(2)
        torch.save(shard, f)
    with pytest.raises(UserError, match="unexpected tensor 'layers.0.attention.wz.weight'"):
        load_model(meta_dir)

    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match=r"no config.json \(Hugging Face layout\) nor params.json"):
        load_model(tmp_path / "empty")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    assert main(["convert", str(meta_dir), "--out", str(tmp_path / "taken")]) == 2
    assert "--out" in capsys.readouterr().err and (tmp_path / "taken" / "keep.txt").read_text() == "mine"
