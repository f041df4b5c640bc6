"""The reference generator: parity with transformers.generate, sampling rules, stops, streaming."""

from pathlib import Path

import pytest
import torch
from transformers import LlamaForCausalLM

from codellm import generate
from codellm.checkpoint import load_model
from codellm.errors import UserError
from codellm.generate import generate_tokens
from codellm.sampling import SamplingParams, heal_prompt, sample_next
from codellm.streaming import Event, StopMatcher
from codellm.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def model_and_tok(tiny_model_dir):
    return load_model(tiny_model_dir), load_tokenizer(tiny_model_dir)


def test_greedy_matches_transformers_generate(tiny_model_dir, model_and_tok):
    model, tok = model_and_tok
    hf = LlamaForCausalLM.from_pretrained(tiny_model_dir).eval()
    prompt = tok.encode("def fibonacci(n):\n    ", bos=True)
    ours = list(generate_tokens(model, prompt, SamplingParams(max_new_tokens=40), stop_ids=set()))
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=40, min_new_tokens=40, do_sample=False,
                          eos_token_id=None, pad_token_id=0)
    assert len(ours) == 40
    assert ours == out[0, len(prompt):].tolist()


def test_seeded_sampling_is_reproducible_and_seed_dependent(model_and_tok):
    model, tok = model_and_tok
    prompt = tok.encode("import os", bos=True)

    def run(seed):
        params = SamplingParams(max_new_tokens=24, temperature=1.0, top_p=0.9, top_k=50, seed=seed)
        return list(generate_tokens(model, prompt, params, stop_ids=set()))

    assert run(1) == run(1)
    assert run(1) != run(2)


def test_top_p_follows_llama_rule():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log()
    # mass before token 2 is 0.8 >= 0.8 -> dropped; tokens 0 and 1 remain
    params = SamplingParams(temperature=1.0, top_p=0.8)
    gen = torch.Generator().manual_seed(0)
    picks = {sample_next(logits, params, gen) for _ in range(300)}
    assert picks == {0, 1}
    assert {sample_next(logits, SamplingParams(temperature=1.0, top_k=1), gen) for _ in range(50)} == {0}


def test_repetition_penalty_discourages_seen_tokens():
    logits = torch.tensor([2.0, 1.9, -1.0])
    context = torch.tensor([0])
    assert sample_next(logits, SamplingParams(), context=context) == 0
    assert sample_next(logits, SamplingParams(repetition_penalty=1.2), context=context) == 1


@pytest.mark.parametrize("bad, field", [
    (dict(temperature=-0.1), "temperature"), (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"),
    (dict(top_k=-1), "top_k"), (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(repetition_penalty=0), "repetition_penalty"), (dict(stop=("",)), "stop"),
])
def test_sampling_params_validation(bad, field):
    with pytest.raises(UserError, match=field):
        SamplingParams(**bad)


def test_prompt_longer_than_context_names_both_numbers(model_and_tok):
    model, tok = model_and_tok
    too_long = [tok.bos_id] + [5] * model.cfg.max_seq_len
    with pytest.raises(UserError, match=rf"{len(too_long)} tokens.*context is {model.cfg.max_seq_len}"):
        list(generate_tokens(model, too_long, SamplingParams(), set()))


def test_stop_string_spanning_two_tokens(model_and_tok):
    model, tok = model_and_tok
    prompt = "def add(a, b):"
    events = list(generate.complete(model, tok, prompt, SamplingParams(max_new_tokens=40)))
    steps = [e.text for e in events if e.text]
    full = "".join(steps)
    # a stop string made of the end of one step's text and the start of the next
    i = next(i for i in range(1, len(steps)) if steps[i - 1] and steps[i])
    stop = steps[i - 1][-1] + steps[i][0]
    expected = full[: full.index(stop)]
    stopped = list(generate.complete(model, tok, prompt, SamplingParams(max_new_tokens=40, stop=(stop,))))
    assert "".join(e.text for e in stopped) == expected
    assert stopped[-1].finished and stopped[-1].reason == "stop" and stopped[-1].stop == stop


def test_stop_matcher_holds_back_partial_stops():
    m = StopMatcher(("\ndef ", "###"))
    shown = [m.push(d) for d in ["x = 1", "\n", "de", "f foo"]]
    assert shown == ["x = 1", "", "", ""]
    assert m.matched == "\ndef "
    m = StopMatcher(("\ndef ",))
    assert [m.push(d) for d in ["a\n", "dx"]] == ["a", "\ndx"]
    assert m.flush() == ""


class ScriptedModel(torch.nn.Module):
    """Emits a fixed token script, whatever the input: for testing what happens to given tokens."""

    def __init__(self, cfg, script):
        super().__init__()
        self.cfg, self.script, self.step = cfg, script, 0
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, tokens, positions=None, cache=None, last_only=False):
        logits = torch.full((1, 1, self.cfg.vocab_size), -1e9)
        logits[0, 0, self.script[min(self.step, len(self.script) - 1)]] = 0.0
        self.step += 1
        return logits


def test_utf8_character_split_over_tokens_streams_whole(model_and_tok):
    model, tok = model_and_tok
    text = "x = '日本 é 🦙'"
    ids = tok.encode_nospace(text)
    assert len(tok.encode_nospace("🦙")) == 4  # not in the vocabulary: four byte-fallback tokens
    scripted = ScriptedModel(model.cfg, ids + [tok.eos_id])
    events = list(generate.stream_text(scripted, tok, [tok.bos_id], SamplingParams(max_new_tokens=50)))
    assert "".join(e.text for e in events) == text
    assert all("\ufffd" not in e.text for e in events)
    assert events[-1].reason == "eos"


def test_infill_stops_at_eot_and_returns_only_the_middle(model_and_tok):
    model, tok = model_and_tok
    middle = " return a + b"
    script = tok.encode_nospace(middle) + [tok.eot_id] + tok.encode_nospace(" junk")
    scripted = ScriptedModel(model.cfg, script)
    events = list(generate.infill(scripted, tok, "def add(a, b):\n   ", "\n", SamplingParams(max_new_tokens=50)))
    assert "".join(e.text for e in events) == middle
    assert events[-1] == Event(tok.eot_id, "", True, "eot")


@pytest.fixture(scope="module")
def shipped_tok():
    """The shipped default tokenizer: byte-level BPE that merges a newline with the next line's indent."""
    return load_tokenizer(Path(__file__).resolve().parent.parent / "models" / "default")


def test_token_healing_backs_off_a_token_that_longer_tokens_extend(shipped_tok):
    tok = shipped_tok
    ids = tok.encode('def f(x):\n    """Double x."""\n', bos=True)
    healed, healing = heal_prompt(tok, ids)
    assert healed == ids[:-1] and healing.text == "\n"
    texts = [tok.decode_continuation([i]) for i in healing.allowed]
    assert all(t.startswith("\n") for t in texts) and "\n   " in texts  # newline + indent: one token
    assert heal_prompt(tok, [tok.bos_id]) == ([tok.bos_id], None)  # nothing to back off
    eot = tok.encode("x", bos=True) + [tok.eot_id]
    assert heal_prompt(tok, eot) == (eot, None)  # special tokens stay


@pytest.mark.usefixtures("one_thread")
def test_healed_generation_engine_equals_reference_and_never_repeats_the_prompt(shipped_tok):
    from codellm.engine import Engine
    from tests.conftest import tiny_model

    tok, model = shipped_tok, tiny_model(shipped_tok.vocab_size)
    prompts = ["def f(x):\n", "import os\n\n", "x = [1, 2,"]
    for prompt in prompts:
        ids = tok.encode(prompt, bos=True)
        for params in (SamplingParams(max_new_tokens=6, heal=True),
                       SamplingParams(max_new_tokens=6, heal=True, temperature=0.9, seed=3)):
            events = list(generate.stream_text(model, tok, ids, params))
            ref_ids = [e.token_id for e in events if e.token_id is not None]
            ref_text = "".join(e.text for e in events)
            engine = Engine(model, tok, max_batch=2)
            got = engine.generate([ids, tok.encode("y = 2", bos=True)], [params, SamplingParams(max_new_tokens=3)])
            assert got[0].token_ids == ref_ids and got[0].text == ref_text
            healed, healing = heal_prompt(tok, ids)
            if healing is not None:  # the first token starts with the backed-off text, which is not output
                assert ref_ids[0] in healing.allowed
                full = tok.decode_continuation(ref_ids)
                assert full.startswith(healing.text) and ref_text == full[len(healing.text):]
