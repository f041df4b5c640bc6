"""The architecture registry (see codellm/arch/__init__.py)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from codellm.errors import UserError


@dataclass(frozen=True)
class Architecture:
    name: str  # HF model_type, e.g. "llama"
    hf_classes: tuple[str, ...]  # HF `architectures` entries that mean this family
    config_from_hf: Callable[[dict, str], object]  # (config.json dict, where it came from) -> our config
    config_to_hf: Callable[[object, object], dict]  # (our config, dtype) -> config.json dict
    build: Callable[[object], nn.Module]  # our config -> the model (on the current default device)
    model_class: type[nn.Module]
    to_ours: Callable[[str], str]  # checkpoint tensor name -> our parameter name
    to_hf: Callable[[str], str]  # and back
    ignored: tuple[str, ...] = ()  # suffixes of checkpoint tensors that are recomputed, never loaded
    tied: tuple[str, str] | None = None  # (output head, embedding): the head may be absent when tied


_REGISTRY: dict[str, Architecture] = {}


def register(arch: Architecture) -> Architecture:
    _REGISTRY[arch.name] = arch
    return arch


def supported() -> list[str]:
    return sorted(f"{a.name} ({', '.join(a.hf_classes)})" for a in _REGISTRY.values())


def from_hf_config(hf: dict, source: str = "config.json") -> Architecture:
    """The family a config.json belongs to: its model_type, else one of its `architectures`."""
    if (arch := _REGISTRY.get(hf.get("model_type"))) is not None:
        return arch
    classes = hf.get("architectures") or []
    for arch in _REGISTRY.values():
        if any(c in arch.hf_classes for c in classes):
            return arch
    raise UserError(f"{source}: model_type={hf.get('model_type')!r} architectures={classes} is not an "
                    f"architecture codellm runs; supported: {'; '.join(supported())}")


def of_model(model: nn.Module) -> Architecture:
    """The family of a built model (for saving it)."""
    exact = [a for a in _REGISTRY.values() if type(model) is a.model_class]
    for arch in exact or [a for a in _REGISTRY.values() if isinstance(model, a.model_class)]:
        return arch
    raise UserError(f"{type(model).__name__} is not a model of a registered architecture ({', '.join(_REGISTRY)})")
