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
KIND_F32, KIND_BF16, KIND_INT8, KIND_INT4, KIND_NF4 = 0, 1, 2, 3, 4
# QLoRA's 4-bit NormalFloat: the quantiles of N(0, 1) scaled to [-1, 1], with an exact zero
NF4_VALUES = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
              -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
              0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
              0.7229568362236023, 1.0)


class NativeMatrix(ctypes.Structure):
    """One weight matrix (out_features rows of in_features) as the native step reads it: `data` in the
    kind's layout, `scales` (out, in / group) fp32 where the kind has them, `mins` (same shape) where it
    has an offset per group (int4 in min form)."""
    _fields_ = [("kind", ctypes.c_int32), ("group", ctypes.c_int32), ("data", ctypes.c_void_p),
                ("scales", ctypes.c_void_p), ("mins", ctypes.c_void_p)]


class QuantLinear(nn.Module):
    """What the quantized formats share: shapes, the group size (weights in groups of `group` inputs,
    one scale per group and output row) and the concat rule (rows of every buffer, views kept)."""

    format = ""
    kind = -1

    def __init__(self, in_features: int, out_features: int, group: int):
        super().__init__()
        if group <= 0 or in_features % group:
            raise UserError(f"{self.format}: in_features {in_features} is not a multiple of the group size {group}")
        self.in_features, self.out_features, self.group = in_features, out_features, group

    @classmethod
    def empty(cls, in_features: int, out_features: int, **options) -> QuantLinear:
        """The module a checkpoint in this format loads into (its buffers zero until then)."""
        return cls(in_features, out_features, **options)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantized().to(x.dtype))

    @classmethod
    def concat(cls, modules: list[QuantLinear]) -> QuantLinear:
        first = modules[0]
        fused = cls.empty(first.in_features, sum(m.out_features for m in modules), **first.options())
        fused = fused.to(next(first.buffers()).device)
        for name, _ in first.named_buffers():
            setattr(fused, name, torch.cat([getattr(m, name) for m in modules]))
        start = 0
        for m in modules:  # the separate modules hold views of the fused rows, as dense ones do
            for name, _ in m.named_buffers():
                setattr(m, name, getattr(fused, name)[start:start + m.out_features])
            start += m.out_features
        return fused

    def native(self) -> NativeMatrix:
        mins = getattr(self, "mins", None)
        return NativeMatrix(self.kind, self.group, pointer(self.weight, self.weight.dtype),
                            pointer(self.native_scales(), torch.float32),
                            pointer(mins, torch.float32) if mins is not None and mins.numel() else None)

    def native_scales(self) -> torch.Tensor:
        return self.scales

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, format={self.format}, " + \
            ", ".join(f"{k}={v}" for k, v in self.options().items())


class Int8Linear(QuantLinear):
    """int8 weights, symmetric (max |w| -> 127), one fp32 scale per `group` inputs of a row; the default
    group is the whole row (one scale per output channel). GGUF's Q8_0 is group 32."""

    format, kind = "int8", KIND_INT8

    def __init__(self, in_features: int, out_features: int, group: int | None = None):
        super().__init__(in_features, out_features, group or in_features)
        self.per_row = group is None  # the option as given: rows of different widths share it
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("scales", torch.ones(out_features, in_features // self.group))

    def options(self) -> dict:
        return {"group": None if self.per_row else self.group}

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear, group: int | None = None) -> Int8Linear:
        module = cls(linear.in_features, linear.out_features, group).to(linear.weight.device)
        w = _grouped(linear.weight, module.group)
        scales = w.abs().amax(-1) / 127
        scales[scales == 0] = 1.0  # an all-zero group: any scale represents it exactly
        module.weight.copy_(torch.round(w / scales[..., None]).clamp(-127, 127).flatten(1).to(torch.int8))
        module.scales.copy_(scales)
        return module

    def dequantized(self) -> torch.Tensor:
        return (_grouped(self.weight, self.group) * self.scales[..., None]).flatten(1)


class Int4Linear(QuantLinear):
    """4-bit weights in groups, two to a byte. Symmetric: w = (q - 8) * scale, the group's largest
    magnitude mapped to -8 (GGUF's Q4_0 rule); with zero points (`symmetric=False`): w = q * scale + min,
    the group's range spread over 0..15 (GGUF's Q4_1). Packing as GGUF's: in each 32 inputs, byte i holds
    input i in its low half and input i + 16 in its high half."""

    format, kind = "int4", KIND_INT4

    def __init__(self, in_features: int, out_features: int, group: int = 32, symmetric: bool = True):
        super().__init__(in_features, out_features, group)
        if group % 32:
            raise UserError(f"int4: the group size must be a multiple of 32 (got {group})")
        self.symmetric = symmetric
        n_groups = in_features // group
        self.register_buffer("weight", torch.zeros(out_features, in_features // 2, dtype=torch.uint8))
        self.register_buffer("scales", torch.ones(out_features, n_groups))
        self.register_buffer("mins", torch.zeros(out_features, 0 if symmetric else n_groups))

    def options(self) -> dict:
        return {"group": self.group, "symmetric": self.symmetric}

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear, group: int = 32, symmetric: bool = True) -> Int4Linear:
        module = cls(linear.in_features, linear.out_features, group, symmetric).to(linear.weight.device)
        w = _grouped(linear.weight, group)
        if symmetric:
            peak = w.gather(-1, w.abs().argmax(-1, keepdim=True))[..., 0]  # signed: it becomes -8 exactly
            scales = -peak / 8
            inverse = torch.where(scales == 0, 0.0, 1 / scales)
            q = torch.floor(w * inverse[..., None] + 8.5).clamp(0, 15)
        else:
            low, high = w.amin(-1), w.amax(-1)
            scales = (high - low) / 15
            inverse = torch.where(scales == 0, 0.0, 1 / scales)
            q = torch.floor((w - low[..., None]) * inverse[..., None] + 0.5).clamp(0, 15)
            module.mins.copy_(low)
        module.scales.copy_(scales)
        module.weight.copy_(pack4(q.flatten(1).to(torch.uint8)))
        return module

    def dequantized(self) -> torch.Tensor:
        q = _grouped(unpack4(self.weight), self.group)
        if self.symmetric:
            return ((q - 8) * self.scales[..., None]).flatten(1)
        return (q * self.scales[..., None] + self.mins[..., None]).flatten(1)


class NF4Linear(QuantLinear):
    """QLoRA's NF4: 4-bit codes into `NF4_VALUES`, times each group's absolute maximum (group 64 as
    bitsandbytes). `double_quant` stores those maxima as uint8 codes with one fp32 scale and offset per
    row (~0.5 bit less per weight at rest; the native step widens them back to fp32 when it is built)."""

    format, kind = "nf4", KIND_NF4

    def __init__(self, in_features: int, out_features: int, group: int = 64, double_quant: bool = False):
        super().__init__(in_features, out_features, group)
        if group % 32:
            raise UserError(f"nf4: the group size must be a multiple of 32 (got {group})")
        self.double_quant = double_quant
        n_groups = in_features // group
        self.register_buffer("weight", torch.zeros(out_features, in_features // 2, dtype=torch.uint8))
        if double_quant:
            self.register_buffer("absmax_codes", torch.zeros(out_features, n_groups, dtype=torch.uint8))
            self.register_buffer("absmax_scale", torch.ones(out_features, 1))
            self.register_buffer("absmax_offset", torch.zeros(out_features, 1))
        else:
            self.register_buffer("scales", torch.ones(out_features, n_groups))

    def options(self) -> dict:
        return {"group": self.group, "double_quant": self.double_quant}

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear, group: int = 64, double_quant: bool = False) -> NF4Linear:
        module = cls(linear.in_features, linear.out_features, group, double_quant).to(linear.weight.device)
        w = _grouped(linear.weight, group)
        absmax = w.abs().amax(-1)
        absmax[absmax == 0] = 1.0
        table = torch.tensor(NF4_VALUES, device=w.device)
        q = (w / absmax[..., None])[..., None].sub(table).abs().argmin(-1)  # the nearest code
        module.weight.copy_(pack4(q.flatten(1).to(torch.uint8)))
        if double_quant:
            low, high = absmax.amin(-1, keepdim=True), absmax.amax(-1, keepdim=True)
            scale = torch.where(high > low, (high - low) / 255, torch.ones_like(low))
            module.absmax_codes.copy_(torch.round((absmax - low) / scale).clamp(0, 255).to(torch.uint8))
            module.absmax_scale.copy_(scale)
            module.absmax_offset.copy_(low)
        else:
            module.scales.copy_(absmax)
        return module

    def absmax(self) -> torch.Tensor:
        if self.double_quant:
            return self.absmax_codes.float() * self.absmax_scale + self.absmax_offset
        return self.scales

    def dequantized(self) -> torch.Tensor:
        table = torch.tensor(NF4_VALUES, device=self.weight.device)
        return (_grouped(table[unpack4(self.weight).long()], self.group) * self.absmax()[..., None]).flatten(1)

    def native_scales(self) -> torch.Tensor:
        if not self.double_quant:
            return self.scales
        if getattr(self, "_widened", None) is None or self._widened.shape != self.absmax_codes.shape:
            self._widened = self.absmax().contiguous()  # kept: the native side reads its memory
        return self._widened


def pack4(q: torch.Tensor) -> torch.Tensor:
    """(rows, n) codes 0..15, n a multiple of 32 -> (rows, n / 2) bytes, GGUF's order within each 32."""
    blocks = q.reshape(q.shape[0], -1, 2, 16)
    return (blocks[:, :, 0] | (blocks[:, :, 1] << 4)).flatten(1)


def unpack4(packed: torch.Tensor) -> torch.Tensor:
    blocks = packed.reshape(packed.shape[0], -1, 16)
    return torch.stack([blocks & 0xF, blocks >> 4], 2).flatten(1)


def _grouped(w: torch.Tensor, group: int) -> torch.Tensor:
    """(rows, n) -> (rows, n / group, group) as fp32."""
    return w.float().reshape(w.shape[0], -1, group)


FORMATS: dict[str, type[QuantLinear]] = {"int8": Int8Linear, "int4": Int4Linear, "nf4": NF4Linear}


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


def quantize(model: nn.Module, fmt: str, skip: Iterable[str] = ("lm_head",), **options) -> nn.Module:
    """Quantize every dense projection of a loaded model to `fmt` (options: the format's, e.g. group),
    except modules whose name ends with one of `skip` (by default the output head, whose precision the
    logits feel most). Embeddings and norms are not linears: they keep their precision."""
    cls, skip = get_format(fmt), tuple(skip)

    def make(name: str, linear: nn.Linear) -> nn.Module | None:
        if name.endswith(skip):
            return None
        try:
            return cls.from_linear(linear, **options)
        except UserError as e:
            raise UserError(f"--quantize {fmt}: {name}: {str(e).removeprefix(f'{fmt}: ')}") from None

    return swap_linears(model, make)


def quantization_config(model: nn.Module) -> dict | None:
    """The config.json entry describing a model's quantized modules (None when all are dense), in the
    shape transformers gives its own (`quant_method` + settings), so a saved model loads without
    re-quantizing: {"quant_method": "codellm", "format": ..., options..., "modules_to_not_convert": [...]}."""
    linears = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear | QuantLinear)}
    quantized = {name: m for name, m in linears.items() if isinstance(m, QuantLinear)}
    if not quantized:
        return None
    kinds = {(m.format, tuple(m.options().items())) for m in quantized.values()}
    if len(kinds) > 1:
        raise UserError("saving a model whose modules use different weight formats is not supported")
    fmt, options = kinds.pop()
    return {"quant_method": "codellm", "format": fmt, **dict(options),
            "modules_to_not_convert": sorted(name for name in linears if name not in quantized)}


def apply_quantization_config(model: nn.Module, config: dict | None, source: str = "config.json") -> nn.Module:
    """Before `load_state_dict`: swap in empty modules of the format a saved model's config names."""
    if not config:
        return model
    if config.get("quant_method") != "codellm":
        raise UserError(f"{source}: quantization_config quant_method={config.get('quant_method')!r} is not "
                        f"supported (codellm reads its own 'codellm' method; quantize with --quantize instead)")
    options = {k: v for k, v in config.items() if k not in ("quant_method", "format", "modules_to_not_convert")}
    cls, keep = get_format(config.get("format")), set(config.get("modules_to_not_convert", ()))
    return swap_linears(model, lambda name, lin: None if name in keep
                        else cls.empty(lin.in_features, lin.out_features, **options))


def format_bytes(fmt: str, in_features: int, out_features: int, dense_bytes: int = 2, **options) -> int:
    """Bytes a (out, in) matrix takes in `fmt` ("dense": `dense_bytes` per weight), without building it."""
    if fmt == "dense":
        return in_features * out_features * dense_bytes
    with torch.device("meta"):
        module = get_format(fmt).empty(in_features, out_features, **options)
    return matrix_bytes(module)


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
