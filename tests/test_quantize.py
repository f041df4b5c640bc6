"""Quantized models as a user holds them: saved and loaded without re-quantizing (config.json's
quantization_config), `--quantize` on the commands that load a model, `codellm quantize`, and `info`."""

import json

import pytest
import torch

from codellm import weights
from codellm.checkpoint import load_model, save_model
from codellm.errors import UserError
from tests.conftest import needs_cxx, tiny_model
from tests.test_cli import run

WIDE = dict(hidden_dim=192)


@pytest.mark.parametrize(("fmt", "options"), [("int8", {}), ("int4", {"group": 64, "symmetric": False}),
                                              ("nf4", {"double_quant": True})])
def test_a_saved_quantized_model_loads_as_it_was(tmp_path, fmt, options):
    model = weights.quantize(tiny_model(512, **WIDE), fmt, **options)
    out = save_model(model, tmp_path / "q", dtype=torch.bfloat16)
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    stored_options = weights.get_format(fmt).empty(64, 64, **options).options()
    assert config == {"quant_method": "codellm", "format": fmt, **stored_options, "modules_to_not_convert": ["lm_head"]}
    loaded = load_model(out, dtype=torch.bfloat16)
    want = dict(model.state_dict())
    for name, tensor in loaded.state_dict().items():  # quantized buffers exact, the dense rest in bf16
        expected = want[name] if tensor.dtype in (torch.int8, torch.uint8) or "scale" in name or "mins" in name \
            or "absmax" in name else want[name].to(torch.bfloat16)
        assert torch.equal(tensor, expected), name
    tokens = torch.randint(0, 512, (1, 8))
    for p in model.parameters():  # the reference: the same quantized buffers, the dense rest in bf16
        p.data = p.data.to(torch.bfloat16)
    torch.testing.assert_close(loaded(tokens), model(tokens))


def test_unknown_quant_methods_are_refused(tmp_path):
    out = save_model(tiny_model(512), tmp_path / "m")
    config = json.loads((out / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="quant_method='bitsandbytes' is not supported"):
        load_model(out)


@needs_cxx
def test_quantize_flag_and_quantized_folder_print_the_same(tiny_model_dir, tmp_path):
    """`complete --quantize int8` (quantized at load, native step implied) prints what the folder written
    by `codellm quantize` prints, and the folder's weights are int8 on disk."""
    args = ("complete", "def add(a, b):", "--max-new-tokens", "12", "--dtype", "bfloat16")
    flag = run(*args, "--model", tiny_model_dir, "--quantize", "int8")
    assert flag.returncode == 0, flag.stderr
    made = run("quantize", tiny_model_dir, "int8", "--out", tmp_path / "q8")
    assert made.returncode == 0 and "wrote int8 weights" in made.stdout, made.stderr
    folder = run(*args, "--model", tmp_path / "q8")
    assert folder.returncode == 0 and folder.stdout == flag.stdout and flag.stdout.strip()
    again = run("quantize", tmp_path / "q8", "int8", "--out", tmp_path / "q8b")
    assert again.returncode == 2 and "already quantized" in again.stderr


def test_bad_quantize_options_are_one_line_errors(tiny_model_dir):
    cases = [(("--quantize", "int3"), "'int3' is not supported; choose one of: int8, int4, nf4"),
             (("--group-size", "32"), "--group-size needs --quantize"),
             (("--quantize", "int4"),
              "--quantize int4: layers.0.mlp.down_proj: in_features 176 is not a multiple of the group size 32"),
             (("--quantize", "int4", "--group-size", "48"), "in_features 64 is not a multiple of the group size 48")]
    for extra, message in cases:
        out = run("complete", "x", "--model", tiny_model_dir, "--max-new-tokens", "2", *extra)
        assert out.returncode == 2 and message in out.stderr and "Traceback" not in out.stderr, (extra, out.stderr)


def test_info_shows_the_memory_of_each_format():
    out = run("info", "--preset", "codellama-34b", "--dtype", "bfloat16")
    assert out.returncode == 0, out.stderr
    sizes = {line.split("  ")[0].strip(): line.split()[-2] for line in out.stdout.splitlines() if "GiB" in line}
    bf16, int8 = float(sizes["weights in bfloat16"]), float(sizes["weights, --quantize int8"])
    int4 = float(sizes["weights, --quantize int4 --group-size 32"])
    assert 0.45 < int8 / bf16 < 0.55 and 0.25 < int4 / bf16 < 0.35
