"""The weights seam: how a model holds the matrices it multiplies by, in one place for every forward path.

Every projection of a model is a *linear module* in one of the formats registered here. The dense format
(fp32, bf16, fp16) is `nn.Linear` itself; another format is a module class with the same `forward(x)` and
four more members:

- `from_linear(linear, **options)` quantizes dense weights; `empty(in_features, out_features, **options)`
  is the module a checkpoint in that format loads into. `swap_linears` puts either in place of a model's
  `nn.Linear`s (gpt-fast's order: swap the modules, then `load_state_dict`), so the model code never
  names a format;
- `concat(modules)`: one module holding the output rows of several. Inference runs q/k/v and gate/up as
  one matmul each (`fuse`); the fused layout is decided here, for every format;
- `native()`: a `NativeMatrix`, the description the native CPU step reads (kind, group size, pointers),
  so a new format is a class here plus one kernel in native_decode.cpp's `matmul`.

`int8` is the first such format: symmetric, one scale per output row (weight-only; activations stay in
the model's dtype).
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from codellm.errors import UserError

# kind codes shared with native_decode.cpp (`enum Kind`)
KIND_F32, KIND_BF16, KIND_INT8 = 0, 1, 2


class NativeMatrix(ctypes.Structure):
    """One weight matrix (out_features rows of in_features) as the native step reads it."""
    _fields_ = [("kind", ctypes.c_int32), ("group", ctypes.c_int32),
                ("data", ctypes.c_void_p), ("scales", ctypes.c_void_p)]


class Int8Linear(nn.Module):
    """y = (x @ q^T) * scales: q int8 (out, in) with one fp32 scale per output row, max |w| -> 127."""

    format = "int8"

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("scales", torch.ones(out_features, dtype=torch.float32))

    @classmethod
    def empty(cls, in_features: int, out_features: int) -> Int8Linear:
        return cls(in_features, out_features)

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear) -> Int8Linear:
        w = linear.weight.detach().float()
        scales = w.abs().amax(dim=1) / 127
        scales[scales == 0] = 1.0  # an all-zero row: any scale represents it exactly
        module = cls(linear.in_features, linear.out_features).to(w.device)
        module.weight.copy_(torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8))
        module.scales.copy_(scales)
        return module

    def dequantized(self) -> torch.Tensor:
        return self.weight.float() * self.scales[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight.to(x.dtype)) * self.scales.to(x.dtype)

    @classmethod
    def concat(cls, modules: list[Int8Linear]) -> Int8Linear:
        fused = cls(modules[0].in_features, sum(m.out_features for m in modules)).to(modules[0].weight.device)
        fused.weight = torch.cat([m.weight for m in modules])
        fused.scales = torch.cat([m.scales for m in modules])
        start = 0
        for m in modules:  # the separate modules hold views of the fused rows, as dense ones do
            m.weight, m.scales = fused.weight[start:start + m.out_features], fused.scales[start:start + m.out_features]
            start += m.out_features
        return fused

    def native(self) -> NativeMatrix:
        return NativeMatrix(KIND_INT8, self.in_features, pointer(self.weight, torch.int8),
                            pointer(self.scales, torch.float32))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, format=int8"


FORMATS: dict[str, type[nn.Module]] = {"int8": Int8Linear}


def format_of(module: nn.Module) -> str:
    """"dense" for an nn.Linear, else the registered format's name."""
    if isinstance(module, nn.Linear):
        return "dense"
    name = getattr(module, "format", None)
    if name not in FORMATS:
        raise UserError(f"{type(module).__name__} is not a linear module of a known weight format "
                        f"(dense or {', '.join(FORMATS)})")
    return name


def get_format(name: str) -> type[nn.Module]:
    if name not in FORMATS:
        raise UserError(f"weight format {name!r} is not supported; choose one of: {', '.join(FORMATS)}")
    return FORMATS[name]


def swap_linears(model: nn.Module, make: Callable[[str, nn.Linear], nn.Module | None]) -> nn.Module:
    """Replace each `nn.Linear` of the model by `make(qualified_name, linear)` where that returns a module
    (None keeps the linear). Before `load_state_dict` (`make` returns `empty(...)` modules) a checkpoint
    in that format loads straight in; after it (`from_linear`) the model is quantized in place."""
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.Linear):
                replacement = make(f"{name}.{child_name}" if name else child_name, child)
                if replacement is not None:
                    setattr(module, child_name, replacement)
    return model


def quantize(model: nn.Module, fmt: str, skip: Iterable[str] = ("lm_head",)) -> nn.Module:
    """Quantize every dense projection of a loaded model to `fmt`, except modules whose name ends with
    one of `skip` (by default the output head, whose precision the logits feel most)."""
    cls, skip = get_format(fmt), tuple(skip)
    return swap_linears(model, lambda name, lin: None if name.endswith(skip) else cls.from_linear(lin))


@torch.no_grad()
def fuse(*modules: nn.Module) -> nn.Module:
    """One linear module computing the concatenated outputs of `modules` (same format, same inputs). The
    separate modules then hold views of the fused weights: names, state_dict and memory stay as they were.
    Frozen (the fused weights take no gradients)."""
    formats = {format_of(m) for m in modules}
    if len(formats) != 1:
        raise UserError(f"cannot fuse linear modules of different weight formats ({', '.join(sorted(formats))})")
    if formats == {"dense"}:
        weight = torch.cat([m.weight for m in modules])
        fused = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
        fused.weight = nn.Parameter(weight, requires_grad=False)
        start = 0
        for m in modules:
            n = m.weight.shape[0]
            m.weight = nn.Parameter(weight[start:start + n], requires_grad=False)
            start += n
        return fused
    return FORMATS[formats.pop()].concat(list(modules))


def native_matrix(module: nn.Module) -> NativeMatrix:
    """What the native step reads for this module (dense weights: fp32 or bf16)."""
    if format_of(module) != "dense":
        return module.native()
    kind = {torch.float32: KIND_F32, torch.bfloat16: KIND_BF16}.get(module.weight.dtype)
    if kind is None:
        raise UserError(f"the native decode step reads fp32 or bf16 dense weights (got {module.weight.dtype})")
    return NativeMatrix(kind, 0, pointer(module.weight, module.weight.dtype), None)


def matrix_bytes(module: nn.Module) -> int:
    """Bytes the module's weights take (what a decode step streams from memory)."""
    return sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))


def pointer(t: torch.Tensor, dtype: torch.dtype) -> int:
    """The address of a tensor the native side reads as `dtype`, refusing what it would misread."""
    if t.dtype != dtype or not t.is_contiguous() or t.device.type != "cpu":
        raise UserError(f"the native decode step needs contiguous {dtype} tensors on the CPU (got {t.dtype}, "
                        f"contiguous={t.is_contiguous()}, {t.device.type})")
    return t.data_ptr()
