"""The architecture registry: unknown families get one error naming the supported ones, and a family
registered from outside the Llama code saves and loads through the generic checkpoint code."""

import json

import pytest
import torch

from codellm import arch
from codellm.arch import llama
from codellm.arch.registry import _REGISTRY, Architecture
from codellm.checkpoint import load_model, save_model
from codellm.config import ModelConfig
from codellm.errors import UserError
from codellm.model import Transformer


def test_llama_is_found_by_model_type_or_class_and_others_are_refused():
    assert arch.from_hf_config({"model_type": "llama"}) is llama.LLAMA
    assert arch.from_hf_config({"architectures": ["LlamaForCausalLM"]}) is llama.LLAMA
    with pytest.raises(UserError, match=r"model_type='gpt2'.*not an architecture codellm runs; supported: "
                                        r"llama \(LlamaForCausalLM\)"):
        arch.from_hf_config({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]})
    assert arch.of_model(Transformer(ModelConfig.from_preset("tiny"))) is llama.LLAMA


class Renamed(Transformer):
    """A stand-in second family: the same math under other tensor names and another model_type."""


def test_a_registered_family_round_trips_without_touching_the_llama_code(tmp_path):
    toy = arch.register(Architecture(
        name="toy", hf_classes=("ToyForCausalLM",),
        config_from_hf=lambda hf, source: llama.config_from_hf(hf["inner"], source),
        config_to_hf=lambda cfg, dtype: {"model_type": "toy", "inner": llama.config_to_hf(cfg, dtype)},
        build=Renamed, model_class=Renamed,
        to_ours=lambda key: key.removeprefix("net."), to_hf=lambda name: f"net.{name}"))
    try:
        model = Renamed(ModelConfig.from_preset("tiny")).init_weights(seed=1)
        saved = save_model(model, tmp_path / "toy")
        assert json.loads((saved / "config.json").read_text())["model_type"] == "toy"
        loaded = load_model(saved)
        assert type(loaded) is Renamed and arch.of_model(loaded) is toy
        for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
            assert torch.equal(a, b), name
    finally:
        _REGISTRY.pop("toy")
