"""OpenAI's presence/frequency penalties and typical-p sampling: the rules on known logits, typical-p against
transformers' TypicalLogitsWarper, and the engine drawing the same tokens as the reference generator."""

from __future__ import annotations

import pytest
import torch

from codellm.engine import Engine
from codellm.errors import UserError
from codellm.generate import generate_tokens
from codellm.sampling import SamplingParams, penalise, sample_next, typical
from tests.conftest import tiny_model

VOCAB = 512
pytestmark = pytest.mark.usefixtures("one_thread")


def test_presence_and_frequency_count_the_generated_tokens_only():
    logits = torch.zeros(6)
    context = torch.tensor([1, 2, 3, 3, 3, 4])  # prompt [1, 2], generated [3, 3, 3, 4]
    params = SamplingParams(presence_penalty=0.5, frequency_penalty=0.25)
    out = penalise(logits, params, context, n_prompt=2)
    assert out.tolist() == [0.0, 0.0, 0.0, -(0.75 + 0.5), -(0.25 + 0.5), 0.0]
    # negative values reward repeats; greedy follows the penalised logits
    logits = torch.tensor([0.0, 1.0, 0.9])
    assert sample_next(logits, SamplingParams(), context=torch.tensor([1, 2, 1]), n_prompt=1) == 1
    assert sample_next(logits, SamplingParams(frequency_penalty=0.2), context=torch.tensor([1, 1]), n_prompt=1) == 2
    assert sample_next(logits, SamplingParams(presence_penalty=-1.0), context=torch.tensor([0, 2]), n_prompt=1) == 2
    # nothing generated yet: the prompt does not count
    assert sample_next(logits, SamplingParams(presence_penalty=2.0), context=torch.tensor([1, 1]), n_prompt=2) == 1


@pytest.mark.parametrize("field", ["presence_penalty", "frequency_penalty", "typical_p"])
def test_out_of_range_values_name_the_field(field):
    with pytest.raises(UserError, match=field):
        SamplingParams(**{field: 2.5})


@pytest.mark.parametrize("mass", [0.2, 0.5, 0.9, 0.99])
def test_typical_keeps_what_transformers_keeps(mass):
    from transformers.generation.logits_process import TypicalLogitsWarper

    gen = torch.Generator().manual_seed(int(mass * 100))
    for _ in range(20):
        logits = torch.randn(200, generator=gen) * 3
        want = TypicalLogitsWarper(mass)(None, logits[None].clone())[0] > float("-inf")
        got = typical(torch.softmax(logits, -1), mass) > 0
        assert torch.equal(got, want)
        assert 0 < int(got.sum()) < 200 or mass > 0.95


def test_typical_sampling_draws_only_kept_tokens():
    logits = torch.tensor([4.0, 3.9, 0.0, -1.0, -8.0])
    kept = typical(torch.softmax(logits, -1), 0.5) > 0
    params = SamplingParams(temperature=1.0, typical_p=0.5)
    gen = torch.Generator().manual_seed(0)
    drawn = {sample_next(logits, params, gen) for _ in range(300)}
    assert drawn == set(kept.nonzero()[:, 0].tolist()) and len(drawn) < 5


@pytest.fixture(scope="module")
def model():
    return tiny_model(VOCAB)


def random_prompt(n: int, seed: int) -> list[int]:
    return [1] + torch.randint(3, VOCAB, (n - 1,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.mark.parametrize("params", [
    SamplingParams(max_new_tokens=24, frequency_penalty=-2.0, presence_penalty=0.5),  # greedy: repeats rewarded
    SamplingParams(max_new_tokens=24, temperature=1.0, frequency_penalty=-2.0, seed=5),
    SamplingParams(max_new_tokens=24, temperature=1.2, typical_p=0.6, seed=6),
    SamplingParams(max_new_tokens=24, temperature=0.9, top_p=0.95, typical_p=0.8, presence_penalty=1.0,
                   repetition_penalty=1.1, seed=7),
])
def test_engine_matches_the_reference_with_penalties_and_typical_p(model, params):
    prompt = random_prompt(20, 11)
    expected = list(generate_tokens(model, prompt, params, {model.cfg.eos_id}))
    noise = SamplingParams(max_new_tokens=30, temperature=1.0, seed=9)
    engine = Engine(model, max_batch=3, token_budget=16)
    got = engine.generate([random_prompt(7, 1), prompt, random_prompt(33, 2)], [noise, params, noise])[1].token_ids
    assert got == expected
    plain = SamplingParams(max_new_tokens=24, temperature=params.temperature, seed=params.seed, top_p=params.top_p)
    # the parameters change what is drawn (so the test cannot pass with them ignored)
    assert expected != list(generate_tokens(model, prompt, plain, {model.cfg.eos_id}))
