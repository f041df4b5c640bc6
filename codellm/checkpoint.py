"""Hugging Face-layout checkpoints: read real (Code) Llama directories, write ours the same way.

Which model a directory holds, how its config reads and how its tensors are named is its architecture's
business (codellm/arch: Llama today); this module only moves files and tensors.

A checkpoint directory holds `config.json`, `model.safetensors` (or shards + `model.safetensors.index.json`)
and the tokenizer files. Loading builds the model on the meta device and assigns memory-mapped tensors,
so no random model is ever materialised; saving writes into a temporary directory and renames it, so a
crash never leaves a half-written checkpoint. What we write loads in `transformers`, vLLM and llama.cpp's
`convert_hf_to_gguf.py` unchanged.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from codellm import arch, weights
from codellm.arch import meta
from codellm.config import ModelConfig
from codellm.errors import UserError
from codellm.model import Transformer

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}
MODEL_INPUT_NAMES = ("input_ids", "attention_mask")  # what a causal LM takes (no token_type_ids)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json")


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise UserError(f"--dtype {name!r} is not supported; use one of {', '.join(DTYPES)}")
    return DTYPES[name]


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not valid JSON: {e}") from None


def load_config(path: str | Path) -> ModelConfig:
    """The model config of a checkpoint directory, read by its architecture (codellm/arch)."""
    path = _checkpoint_dir(path)
    hf, source = _hf_config(path)
    return arch.from_hf_config(hf, source).config_from_hf(hf, source)


def _checkpoint_dir(path: str | Path) -> Path:
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"model directory {path} does not exist")
    if not (path / "config.json").is_file() and not meta.is_meta_dir(path):
        raise UserError(f"{path} has no config.json (Hugging Face layout) nor {meta.PARAMS} (Meta's layout): "
                        f"not a model directory")
    return path


def _hf_config(path: Path) -> tuple[dict, str]:
    """The directory's config.json, or the one Meta's params.json implies (arch/meta.py); and its source."""
    if meta.is_meta_dir(path):
        return meta.hf_config(path), str(path / meta.PARAMS)
    return _read_json(path / "config.json"), str(path / "config.json")


def _tensors(path: Path, hf: dict) -> Iterator[tuple[str, str, Callable[[], torch.Tensor]]]:
    """(file name, HF tensor name, loader) of every stored tensor; safetensors load only when asked."""
    if meta.is_meta_dir(path):
        for file, key, tensor in meta.hf_tensors(path, hf):
            yield file, key, lambda tensor=tensor: tensor
        return
    for file in _weight_files(path):
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for key in f.keys():
                yield file.name, key, lambda f=f, key=key: f.get_tensor(key)


def _weight_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(_read_json(index)["weight_map"].values()))
        missing = [n for n in names if not (path / n).is_file()]
        if missing:
            raise UserError(f"{path}: shards listed in {index.name} are missing: {', '.join(missing)}")
        return [path / n for n in names]
    if (path / "model.safetensors").is_file():
        return [path / "model.safetensors"]
    found = sorted(path.glob("*.safetensors"))
    if found:
        return found
    hint = " (only PyTorch .bin weights found: convert them to safetensors)" if any(path.glob("*.bin")) else ""
    raise UserError(f"{path}: no *.safetensors weights{hint}")


def load_model(path: str | Path, device: str = "cpu", dtype: str | torch.dtype = "float32") -> Transformer:
    """Load an HF directory of a registered architecture (codellm/arch), or a Llama in Meta's own layout
    (params.json + consolidated.NN.pth, arch/meta.py), into our model, in `dtype` on `device`, in eval mode."""
    path, dtype = _checkpoint_dir(path), parse_dtype(dtype)
    hf, source = _hf_config(path)
    family = arch.from_hf_config(hf, source)
    cfg = family.config_from_hf(hf, source)
    with torch.device("meta"):
        model = weights.apply_quantization_config(family.build(cfg), hf.get("quantization_config"), source)
    expected = {name: p.shape for name, p in model.state_dict().items()}
    stored_as = {name: b.dtype for name, b in model.named_buffers()}  # quantized weights keep their dtypes
    state = {}
    for file, key, get in _tensors(path, hf):
        if family.ignored and key.endswith(family.ignored):
            continue
        name = family.to_ours(key)
        if name not in expected:
            raise UserError(f"{file}: unexpected tensor {key!r} for a {family.name} model")
        tensor = get()
        if tensor.shape != expected[name]:
            raise UserError(f"{file}: tensor {key!r} has shape {tuple(tensor.shape)}, "
                            f"{Path(source).name} implies {tuple(expected[name])}")
        state[name] = tensor.to(device=device, dtype=stored_as.get(name, dtype))
    if family.tied and hf.get("tie_word_embeddings"):
        head, embedding = family.tied
        if head not in state and embedding in state:
            state[head] = state[embedding]
    missing = sorted(set(expected) - set(state))
    if missing:
        shown = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
        raise UserError(f"{path}: missing tensors: {shown}")
    model.load_state_dict(state, assign=True, strict=True)
    return model.eval()


def convert(src: str | Path, out: str | Path, dtype: str | torch.dtype | None = None) -> Path:
    """Write a model directory load_model reads (Meta's layout included) in the Hugging Face layout, with its
    tokenizer; weights keep their stored dtype unless `dtype` is given. Returns `out`."""
    src = _checkpoint_dir(src)
    if Path(out).resolve() == src.resolve():
        raise UserError(f"--out {out} is the source directory; write the converted model elsewhere")
    if dtype is None:
        dtype = meta.stored_dtype(src) if meta.is_meta_dir(src) else \
            parse_dtype(_hf_config(src)[0].get("torch_dtype") or "float32")
    model = load_model(src, dtype=dtype)
    extra = meta.tokenizer_files(src) if meta.is_meta_dir(src) and (src / "tokenizer.model").is_file() else None
    return save_model(model, out, tokenizer_dir=src, dtype=dtype, extra_files=extra)


def save_model(model: Transformer, out_dir: str | Path, tokenizer_dir: str | Path | None = None,
               dtype: str | torch.dtype | None = None, max_shard_bytes: int = 4 << 30,
               extra_files: dict[str, str] | None = None) -> Path:
    """Write `model` as an HF checkpoint of its architecture (+ tokenizer files) atomically; returns out_dir."""
    out_dir = Path(out_dir)
    dtype = parse_dtype(dtype) if dtype is not None else next(model.parameters()).dtype
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        family = arch.of_model(model)
        buffers = dict(model.named_buffers())  # quantized weights: stored in their own dtypes
        tensors = {family.to_hf(n): t.detach().to("cpu", buffers[n].dtype if n in buffers else dtype).contiguous()
                   for n, t in model.state_dict().items()}
        _write_safetensors(tensors, tmp, max_shard_bytes)
        config = family.config_to_hf(model.cfg, dtype)
        if (quantization := weights.quantization_config(model)) is not None:
            config["quantization_config"] = quantization
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        (tmp / "generation_config.json").write_text(json.dumps(
            {"bos_token_id": model.cfg.bos_id, "eos_token_id": model.cfg.eos_id}, indent=2) + "\n")
        if tokenizer_dir is not None:
            for name in TOKENIZER_FILES:
                if (Path(tokenizer_dir) / name).is_file():
                    shutil.copy2(Path(tokenizer_dir) / name, tmp / name)
            write_input_names(tmp)
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
        _umask_permissions(tmp)
        _replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def write_input_names(folder: Path):
    """Name the model's inputs in tokenizer_config.json (input_ids, attention_mask), as Llama's tokenizer
    classes do: transformers' generic `PreTrainedTokenizerFast` otherwise also returns `token_type_ids`,
    which `LlamaForCausalLM.generate(**tokenizer(text, return_tensors="pt"))` refuses."""
    path = folder / "tokenizer_config.json"
    if not path.is_file() and not (folder / "tokenizer.json").is_file() and not (folder / "tokenizer.model").is_file():
        return
    config = _read_json(path) if path.is_file() else {}
    if "model_input_names" not in config:
        config["model_input_names"] = list(MODEL_INPUT_NAMES)
        path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")


def _write_safetensors(tensors: dict[str, torch.Tensor], out: Path, max_shard_bytes: int):
    shards, current, size = [], {}, 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name], size = t, size + nbytes
    shards.append(current)
    if len(shards) == 1:
        save_file(shards[0], str(out / "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map, total = {}, 0
    for i, shard in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out / fname), metadata={"format": "pt"})
        weight_map.update({name: fname for name in shard})
        total += sum(t.numel() * t.element_size() for t in shard.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def _umask_permissions(folder: Path):
    """What a plain mkdir/open would give: mkdtemp makes the folder 0700 and safetensors writes 0600, so a
    model saved for a server or a colleague would be unreadable to them."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for path in folder.iterdir():
        path.chmod(0o666 & ~umask)


def _replace_dir(tmp: Path, out_dir: Path):
    """Move a finished directory into place; an existing one is swapped out, then removed."""
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
        os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out_dir)
