"""CodeT5+ objectives (codellm/train/t5_objectives.py): the transforms produce what the recipe says, and
each objective's loss falls when a tiny T5 trains on a learnable toy task."""

import random

import pytest
import torch

from codellm.arch.t5 import T5, T5Config
from codellm.train import t5_objectives as obj

pytestmark = pytest.mark.usefixtures("one_thread")
VOCAB, EOS, CLM, MATCH = 64, 1, 60, 61
SENTINELS = list(range(59, 49, -1))


def tiny(seed=0):
    cfg = T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, n_layers=2, n_decoder_layers=2, n_heads=4,
                   num_buckets=8, max_distance=16, eos_id=EOS)
    return T5(cfg).init_weights(seed=seed)


def counting(rng, n=24):
    """Toy "code": runs counting up from a random start, learnable from any part of itself."""
    start = rng.randrange(2, 30)
    return [start + i % 20 for i in range(n)]


def test_span_corruption_hides_about_15_percent_in_sentinel_spans():
    rng = random.Random(0)
    ids = [2 + i % 48 for i in range(100)]  # no sentinel ids among them
    source, target = obj.span_corrupt(ids, rng, SENTINELS, EOS)
    used = [s for s in SENTINELS if s in source]
    assert used == SENTINELS[:len(used)] and len(used) >= 3 and source[-1] == EOS and target[-1] == EOS
    assert len(target) - 1 - len(used) == 15  # the hidden tokens
    rebuilt, spans = [], {}
    parts = target[:-1]
    for k, s in enumerate(used):  # putting the spans back gives the original
        end = parts.index(used[k + 1]) if k + 1 < len(used) else len(parts)
        spans[s] = parts[parts.index(s) + 1:end]
    for t in source[:-1]:
        rebuilt += spans.get(t, [t])
    assert rebuilt == ids


def test_clm_transforms():
    rng = random.Random(1)
    ids = list(range(2, 42))
    for _ in range(20):
        source, target = obj.seq2seq_clm(ids, rng, CLM, EOS)
        assert source[0] == CLM and source[1:] + target[:-1] == ids and 4 <= len(source) - 1 <= 36
    assert obj.decoder_clm(ids, CLM, EOS) == ([CLM], ids + [EOS])


def train(model, params, loss_fn, steps=40, lr=3e-3):
    opt = torch.optim.AdamW(params, lr=lr)
    losses = []
    for step in range(steps):
        loss = loss_fn(step)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return sum(losses[:5]) / 5, sum(losses[-5:]) / 5


@pytest.mark.parametrize("objective", ["span", "seq2seq_clm", "decoder_clm"])
def test_stage1_losses_fall(objective):
    torch.manual_seed(0)
    model = tiny()
    rng = random.Random(2)

    def transform(ids):
        if objective == "span":
            return obj.span_corrupt(ids, rng, SENTINELS, EOS)
        if objective == "seq2seq_clm":
            return obj.seq2seq_clm(ids, rng, CLM, EOS)
        return obj.decoder_clm(ids, CLM, EOS)

    first, last = train(model, model.parameters(),
                        lambda step: obj.seq2seq_loss(model, [transform(counting(rng)) for _ in range(8)]))
    assert last < 0.6 * first, (first, last)


def pairs(rng, n=8):
    """Toy bimodal pairs: the "text" names a class, the "code" is that class's counting run."""
    classes = rng.sample(range(8), n)
    text = torch.tensor([[2, 40 + c, 3] for c in classes])
    code = torch.tensor([[2] + [10 + 3 * c + i for i in range(6)] for c in classes])
    return text, code


def test_stage2_contrastive_and_matching_losses_fall():
    torch.manual_seed(0)
    model, heads = tiny(), obj.BimodalHeads(32, embed_dim=16)
    rng = random.Random(3)
    params = [*model.parameters(), *heads.parameters()]
    first, last = train(model, params, lambda step: heads.contrastive_loss(model, *pairs(rng)))
    assert last < 0.5 * first, (first, last)
    gen = torch.Generator().manual_seed(0)
    first, last = train(model, params, lambda step: heads.matching_loss(model, *pairs(rng), MATCH, gen), steps=60)
    assert last < 0.7 * first, (first, last)
