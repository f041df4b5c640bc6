"""One set of prompt-fitting rules: the eval harness and the server cut an over-long prompt the same way."""

import pytest

from codellm.eval.generators import LocalGenerator, PromptSpec
from codellm.prompt_rules import fit_completion, fit_infill
from codellm.sampling import SamplingParams
from codellm.server.prompts import infill_with_context
from tests.conftest import tiny_model

LINES = "".join(f"value_{i} = compute({i}, scale={i % 7})\n" for i in range(200))


def test_fit_completion_keeps_bos_and_the_end(tok):
    ids, truncated = fit_completion(tok, LINES, 40)
    full = tok.encode(LINES, bos=True)
    assert truncated and len(ids) == 40 and ids[0] == tok.bos_id and ids[1:] == full[-39:]
    assert fit_completion(tok, "x = 1\n", 40) == (tok.encode("x = 1\n", bos=True), False)


@pytest.mark.parametrize("order", ["psm", "spm"])
def test_eval_and_server_fit_an_infilling_prompt_alike(sp, order):
    model = tiny_model(sp.vocab_size)  # 256 positions: these prompts do not fit
    params = SamplingParams(max_new_tokens=64)
    prefix, suffix = LINES, LINES.replace("value", "other")
    generator = LocalGenerator(model, sp)
    ids = generator._ids(PromptSpec(prefix, suffix, order), params)
    budget = model.cfg.max_seq_len - 64
    assert ids == infill_with_context(sp, prefix, suffix, order, [], budget)[0] == fit_infill(
        sp, prefix, suffix, order, budget)[0]
    assert len(ids) <= budget and generator.truncated_prompts == 1
    # the text next to the gap survives: the prefix's last line and the suffix's first
    text = sp.decode(ids)
    assert "value_199 = compute(199, scale=3)" in text and "other_0 = compute(0, scale=0)" in text
