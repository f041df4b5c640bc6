"""T5 / CodeT5+ (codellm/arch/t5.py) against transformers on tiny random configs saved to disk: relative
position buckets, encoder states, teacher-forced seq2seq logits (fp32, default tolerances) for ReLU and
gated-GELU, tied and untied heads, the embedding model (T5EncoderModel + a Linear), saving back to HF."""

import json

import pytest
import torch
from safetensors.torch import save_file

from codellm import arch
from codellm.arch import t5
from codellm.checkpoint import load_model, save_model
from codellm.errors import UserError

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")  # tiny matmuls: threads only contend


def hf_config(**overrides):
    base = dict(vocab_size=96, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_decoder_layers=3, num_heads=4,
                relative_attention_num_buckets=8, relative_attention_max_distance=20, dropout_rate=0.0,
                decoder_start_token_id=0, pad_token_id=0, eos_token_id=2, initializer_factor=3.0)
    return transformers.T5Config(**{**base, **overrides})


def hf_seq2seq(tmp_path, seed=0, **overrides):
    torch.manual_seed(seed)
    model = transformers.T5ForConditionalGeneration(hf_config(**overrides)).eval()
    model.save_pretrained(tmp_path / "hf")
    return model, load_model(tmp_path / "hf")


def batch(seed=1, rows=3, length=30, vocab=96):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (rows, length), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, length - 7:] = 0  # a padded row
    return ids.masked_fill(mask == 0, 0), mask


def test_relative_buckets_match_transformers():
    rel = torch.arange(-300, 300)[None, :]
    for bidirectional in (True, False):
        for buckets, distance in ((32, 128), (8, 20)):
            ours = t5.relative_bucket(rel, bidirectional, buckets, distance)
            theirs = transformers.models.t5.modeling_t5.T5Attention._relative_position_bucket(
                rel, bidirectional=bidirectional, num_buckets=buckets, max_distance=distance)
            assert torch.equal(ours, theirs)


@pytest.mark.parametrize("ff,tied", [("relu", True), ("relu", False), ("gated-gelu", True), ("gated-gelu", False)])
def test_seq2seq_logits_and_encoder_states_match_transformers(tmp_path, ff, tied):
    hf, ours = hf_seq2seq(tmp_path, feed_forward_proj=ff, tie_word_embeddings=tied)
    assert isinstance(ours, t5.T5) and ours.cfg.tied is tied and ours.cfg.feed_forward == ff
    ids, mask = batch()
    labels = torch.randint(3, 96, (3, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = hf(input_ids=ids, attention_mask=mask, labels=labels)
        enc = hf.encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        torch.testing.assert_close(ours.encode(ids, mask), enc)
        logits = ours(ids, ours.shift_right(labels), mask)
    torch.testing.assert_close(logits, expected.logits)
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten())
    torch.testing.assert_close(loss, expected.loss)


def test_cached_decoding_equals_one_pass(tmp_path):
    """Feeding the decoder one token at a time through the cache gives the teacher-forced logits (in
    float64: the random model amplifies fp32 rounding of the differently shaped matmuls past 1e-5)."""
    _, ours = hf_seq2seq(tmp_path)
    ours = ours.double()
    ids, mask = batch()
    dec = torch.randint(3, 96, (3, 10), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = ours(ids, dec, mask)
        cache = t5.DecoderCache(ours, ours.encode(ids, mask), mask)
        steps = [ours.logits(ours.decode(dec[:, :4], cache))]  # a chunk, then single tokens
        steps += [ours.logits(ours.decode(dec[:, i:i + 1], cache)) for i in range(4, 10)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full)


def test_saved_model_loads_in_transformers(tmp_path):
    _, ours = hf_seq2seq(tmp_path, feed_forward_proj="gated-gelu", tie_word_embeddings=False)
    save_model(ours, tmp_path / "ours")
    config = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert config["architectures"] == ["T5ForConditionalGeneration"] and config["tie_word_embeddings"] is False
    back = transformers.T5ForConditionalGeneration.from_pretrained(tmp_path / "ours").eval()
    ids, mask = batch()
    dec = torch.randint(3, 96, (3, 5), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids, dec, mask), back(input_ids=ids, attention_mask=mask,
                                                              decoder_input_ids=dec).logits)
    again = load_model(tmp_path / "ours")
    for (name, a), (_, b) in zip(ours.state_dict().items(), again.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def codet5p_embedding_dir(path, seed=0, **config):
    """A folder laid out as Salesforce/codet5p-110m-embedding: a T5 encoder + `proj`, model_type
    codet5p_embedding; returns the transformers pieces it was made from."""
    torch.manual_seed(seed)
    encoder = transformers.T5EncoderModel(hf_config(**config)).eval()
    proj = torch.nn.Linear(32, 16)
    path.mkdir()
    tensors = {k: v.contiguous() for k, v in encoder.state_dict().items() if k != "encoder.embed_tokens.weight"}
    tensors |= {"proj.weight": proj.weight.detach(), "proj.bias": proj.bias.detach()}
    save_file(tensors, str(path / "model.safetensors"))
    config = hf_config(**config).to_dict() | {
        "architectures": ["CodeT5pEmbeddingModel"], "model_type": "codet5p_embedding", "embed_dim": 16,
        "auto_map": {"AutoModel": "modeling_codet5p_embedding.CodeT5pEmbeddingModel"}}
    (path / "config.json").write_text(json.dumps(config))
    return encoder, proj


def test_embedding_model_matches_t5_encoder_plus_projection(tmp_path):
    encoder, proj = codet5p_embedding_dir(tmp_path / "embed")
    ours = load_model(tmp_path / "embed")
    assert ours.cfg.kind == "embedding" and ours.cfg.embed_dim == 16
    ids, mask = batch()
    with torch.no_grad():
        states = encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        expected = torch.nn.functional.normalize(proj(states[:, 0]), dim=-1)
        got = ours.embed(ids, mask)
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(got.norm(dim=-1), torch.ones(3))
    # saved back in the same layout, it still loads in transformers' T5EncoderModel plus its projection
    save_model(ours, tmp_path / "again")
    config = json.loads((tmp_path / "again" / "config.json").read_text())
    assert config["model_type"] == "codet5p_embedding" and config["embed_dim"] == 16
    back = transformers.T5EncoderModel.from_pretrained(tmp_path / "again").eval()
    with torch.no_grad():
        torch.testing.assert_close(back(input_ids=ids, attention_mask=mask).last_hidden_state, states)


def test_t5_encoder_model_loads_and_refuses_to_decode(tmp_path):
    torch.manual_seed(0)
    transformers.T5EncoderModel(hf_config(feed_forward_proj="gated-gelu")).save_pretrained(tmp_path / "enc")
    ours = load_model(tmp_path / "enc")
    assert ours.cfg.kind == "encoder" and not hasattr(ours, "decoder")
    ids, _ = batch()
    assert ours.embed(ids).shape == (3, 32)
    with pytest.raises(UserError, match="no decoder"):
        ours.decode(ids, None)


def test_registry_and_config_errors():
    assert arch.from_hf_config({"model_type": "t5"}) is t5.T5_ARCH
    assert arch.from_hf_config({"model_type": "codet5p_embedding",
                                "architectures": ["CodeT5pEmbeddingModel"]}) is t5.T5_ARCH
    good = hf_config().to_dict()
    with pytest.raises(UserError, match=r"config.json: invalid T5 config: feed_forward='gated-swish'"):
        t5.config_from_hf(good | {"feed_forward_proj": "gated-swish"})
    with pytest.raises(UserError, match="needs 'd_kv'"):
        t5.config_from_hf({k: v for k, v in good.items() if k != "d_kv"})
    with pytest.raises(UserError, match="not a T5 kind"):
        t5.config_from_hf(good | {"architectures": ["T5ForQuestionAnswering"]})


def test_a_checkpoint_with_only_a_stack_copy_of_the_embedding_loads(tmp_path):
    """Older saves carry `encoder.embed_tokens.weight` (a tie of `shared`) and may lack `shared.weight`, and
    carry the decoder's unused cross-attention position table; transformers loads them, so do we."""
    from safetensors.torch import load_file

    hf, _ = hf_seq2seq(tmp_path)
    tensors = load_file(str(tmp_path / "hf" / "model.safetensors"))
    tensors["encoder.embed_tokens.weight"] = tensors.pop("shared.weight")
    tensors["decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight"] = torch.zeros(8, 4)
    save_file(tensors, str(tmp_path / "hf" / "model.safetensors"))
    ours = load_model(tmp_path / "hf")
    assert torch.equal(ours.shared.weight, hf.shared.weight)
