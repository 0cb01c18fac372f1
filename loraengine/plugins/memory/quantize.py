"""Quantized frozen base: ``model.quantize: fp8 | int8``.

Every ``nn.Linear`` of the denoiser keeps its weight as fp8 (e4m3) or int8 values
with one fp32 scale per output channel (``W ≈ scale[:, None] · Q``); the full-precision
weight is rebuilt only for the duration of one forward matmul and never saved for the
backward pass, which keeps ``Q`` and the scales instead.

The adapters must run in bypass mode (``memory.bypass_mode: true``): in weight mode an
adapter rebuilds ``W + ΔW`` from the base weight, which a quantized layer no longer
holds. Convolutions stay as they are.

``memory.quantized_backward`` computes the input gradient ``dX = dY · W`` with the
quantized matmul instead of dequantizing ``W``: ``dY`` is multiplied by the weight
scales (they sit on the contraction axis), quantized per row to the base's format and
multiplied with ``Q`` by ``torch._scaled_mm`` (fp8) or ``torch._int_mm`` (int8), both of
which run on the CPU as well as on CUDA. As in the node it applies only with
``training.dtype: none`` on a quantized model.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal, cast

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from loraengine.core.plugins.assembly import BuildContext, StrategyResult
from loraengine.core.plugins.specs import MemoryStrategySpec, PluginOptions

FP8 = torch.float8_e4m3fn
#: format -> (largest representable magnitude, dtype of the values)
FORMATS: dict[str, tuple[float, torch.dtype]] = {
    "fp8": (float(torch.finfo(FP8).max), FP8),
    "int8": (127.0, torch.int8),
}


class QuantizedBackwardOptions(PluginOptions):
    quantized_backward: bool = Field(False, description="Compute the input gradient with "
                                     "the quantized matmul (torch._scaled_mm for fp8, "
                                     "torch._int_mm for int8) instead of dequantizing; "
                                     "quantized models with training.dtype none only.")


# -- the number format ------------------------------------------------------------------

def _row_scale(absmax: torch.Tensor, qmax: float) -> torch.Tensor:
    # An all-zero row gets scale 1 so that dividing by it is harmless.
    return torch.where(absmax > 0, absmax / qmax, torch.ones_like(absmax))


#: elements of a block of rows quantized at a time: the fp32 temporaries of quantizing
#: stay this size (4 MiB each) whatever the layer's size
BLOCK = 1 << 20


def quantize_rows(x: torch.Tensor, fmt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize a 2-D tensor with one scale per row: ``x ≈ scale[:, None] · q``.
    fp8 values are returned as a ``uint8`` view so that a later ``module.to(dtype)``
    cannot cast them; ``values()`` views them back. Rows are taken a block at a time
    (each row's values depend on that row alone), so quantizing a weight holds it,
    its one-byte values and temporaries of at most ``BLOCK`` elements."""
    qmax, dtype = FORMATS[fmt]
    q = torch.empty(x.shape, dtype=torch.int8 if fmt == "int8" else torch.uint8,
                    device=x.device)
    scale = torch.empty(x.shape[0], dtype=torch.float32, device=x.device)
    rows = max(1, BLOCK // max(1, x.shape[1]))
    starts = range(0, x.shape[0], rows)
    if x.device.type == "meta":
        # no values to compute (a dry run of ``plan``): the second block allocates
        # what each later one does while the one before is still held (the peak of
        # quantizing), so the blocks after it would only repeat it
        starts = starts[:2]
    for first in starts:
        part = x[first:first + rows].float()
        row_scale = _row_scale(part.abs().amax(dim=1), qmax)
        scaled = part / row_scale[:, None]
        if fmt == "int8":
            q[first:first + rows] = scaled.round().clamp(-qmax, qmax).to(torch.int8)
        else:
            q[first:first + rows] = scaled.clamp(-qmax, qmax).to(dtype).view(torch.uint8)
        scale[first:first + rows] = row_scale
    return q, scale


def values(q: torch.Tensor, fmt: str) -> torch.Tensor:
    """The stored values in their own dtype (fp8 or int8)."""
    return q.view(FP8) if fmt == "fp8" else q


def dequantize(q: torch.Tensor, scale: torch.Tensor, fmt: str, dtype: torch.dtype
               ) -> torch.Tensor:
    """``scale[:, None] · Q`` in ``dtype`` (computed in fp32 for fp32, else in ``dtype``)."""
    work = torch.float32 if dtype == torch.float32 else dtype
    return (values(q, fmt).to(work) * scale.to(work)[:, None]).to(dtype)


# -- the quantized matmul for the input gradient -----------------------------------------

def _pad2(t: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Zero-pad a 2-D tensor to at least ``rows`` × ``cols``. fp8 is padded through its
    uint8 view (byte 0 is +0.0 in e4m3)."""
    r, c = t.shape
    if r >= rows and c >= cols:
        return t
    raw = t.view(torch.uint8) if t.dtype == FP8 else t
    out = torch.zeros((max(r, rows), max(c, cols)), dtype=raw.dtype, device=t.device)
    out[:r, :c] = raw
    return out.view(FP8) if t.dtype == FP8 else out


def _up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def quantized_input_grad(grad_out: torch.Tensor, q: torch.Tensor, scale: torch.Tensor,
                         fmt: str) -> torch.Tensor:
    """``dX = dY · (scale[:, None] · Q)`` for ``dY`` ``[M, out]`` and ``Q`` ``[out, in]``,
    with the product taken in the quantized format.

    Shapes are zero-padded to the alignment the CUDA kernels (and the fp8 meta kernel)
    ask for: the contraction and output sides to multiples of 16, and more than 16 rows
    for ``_int_mm``; padding with zeros leaves the product unchanged.
    """
    m, k = grad_out.shape
    n = q.shape[1]
    qmax, _ = FORMATS[fmt]
    folded = grad_out.float() * scale.float()[None, :]  # weight scales live on the k axis
    g_q, g_scale = quantize_rows(folded, fmt)
    g_vals, w_vals = values(g_q, fmt), values(q, fmt)
    kp, np_ = _up(k, 16), _up(n, 16)
    if fmt == "int8":
        a = _pad2(g_vals, 17, kp)
        b = _pad2(w_vals, kp, np_)
        acc = torch._int_mm(a, b)[:m, :n]
        out = acc.float() * g_scale[:, None]
    else:
        a = _pad2(g_vals, m, kp)
        b = _pad2(w_vals, kp, np_)
        if b.device.type != "cpu":
            b = b.t().contiguous().t()  # CUDA (and meta) want the second operand column-major
        ones = torch.ones((1, b.shape[1]), dtype=torch.float32, device=b.device)
        out = torch._scaled_mm(a, b, scale_a=g_scale[:, None].contiguous(), scale_b=ones,
                               out_dtype=torch.float32)[:m, :n]
    return out.to(grad_out.dtype)


class _QuantizedLinearFn(torch.autograd.Function):
    """``y = x · (s·Q)ᵀ + b`` that saves only ``Q`` and ``s`` for the backward pass."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor,
                bias: torch.Tensor | None, fmt: str, quantized_backward: bool) -> torch.Tensor:
        weight = dequantize(q, scale, fmt, x.dtype)
        ctx.save_for_backward(q, scale)
        ctx.fmt, ctx.quantized_backward = fmt, quantized_backward
        return F.linear(x, weight, None if bias is None else bias.to(x.dtype))

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[Any, ...]:
        q, scale = ctx.saved_tensors
        grad_x = grad_b = None
        flat = grad_out.reshape(-1, grad_out.shape[-1])
        if ctx.needs_input_grad[0]:
            if ctx.quantized_backward:
                gx = quantized_input_grad(flat, q, scale, ctx.fmt)
            else:
                gx = flat @ dequantize(q, scale, ctx.fmt, flat.dtype)
            grad_x = gx.reshape(*grad_out.shape[:-1], q.shape[1])
        if ctx.needs_input_grad[3]:
            grad_b = flat.sum(dim=0)
        return grad_x, None, None, grad_b, None, None


class QuantizedLinear(nn.Linear):
    """An ``nn.Linear`` whose weight is stored quantized (buffers ``qweight`` and
    ``weight_scale``). Layers are converted in place, so adapters that hold a reference
    to them keep working. ``weight`` reads back the dequantized weight (no gradient).
    Moving the layer (``.to(device)``) moves the scales; a dtype conversion of the
    module (``.to(bf16)``) leaves them in fp32, so a layer quantized while loading
    keeps its values through the engine's later conversion."""

    quant_format: str
    quantized_backward: bool
    weight_dtype: torch.dtype
    original_class: type[nn.Linear]
    qweight: torch.Tensor
    weight_scale: torch.Tensor

    @property
    def weight(self) -> torch.Tensor:  # type: ignore[override]
        return dequantize(self.qweight, self.weight_scale, self.quant_format,
                          self.weight_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _QuantizedLinearFn.apply(x, self.qweight, self.weight_scale, self.bias,
                                        self.quant_format, self.quantized_backward)

    def _apply(self, fn: Any, recurse: bool = True) -> QuantizedLinear:
        scale = cast(torch.Tensor, self._buffers.pop("weight_scale"))
        try:
            super()._apply(fn, recurse)
            # where ``fn`` puts a tensor of the scales' dtype, without converting them
            probe = fn(torch.empty(0, dtype=scale.dtype, device=scale.device))
            scale = scale.to(device=probe.device)
        finally:
            self._buffers["weight_scale"] = scale
        return self

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, quantize={self.quant_format}"


def quantize_linear(layer: nn.Linear, fmt: str, quantized_backward: bool = False
                    ) -> Callable[[], None]:
    """Convert ``layer`` to a ``QuantizedLinear`` in place, freeing its full-precision
    weight; return a callable that turns it back into its original class with the
    *dequantized* weight (quantizing is lossy)."""
    original_cls = type(layer)
    weight = layer.weight.detach()
    q, scale = quantize_rows(weight, fmt)
    del layer._parameters["weight"]
    layer.__class__ = type(f"Quantized{original_cls.__name__}",
                           (QuantizedLinear, original_cls), {}) \
        if original_cls is not nn.Linear else QuantizedLinear
    layer.register_buffer("qweight", q.to(weight.device))
    layer.register_buffer("weight_scale", scale.to(weight.device))
    quantized = cast(QuantizedLinear, layer)
    quantized.quant_format = fmt
    quantized.quantized_backward = quantized_backward
    quantized.weight_dtype = weight.dtype
    quantized.original_class = original_cls
    return lambda: restore_linear(quantized)


def restore_linear(layer: QuantizedLinear) -> None:
    """Turn a quantized layer back into its original class, with the dequantized
    weight as a frozen parameter."""
    restored = layer.weight
    del layer._buffers["qweight"], layer._buffers["weight_scale"]
    plain: nn.Module = layer
    plain.__class__ = layer.original_class
    plain.weight = nn.Parameter(restored, requires_grad=False)


def _quantizable(mod: nn.Module) -> bool:
    return isinstance(mod, nn.Linear) and not isinstance(mod, QuantizedLinear) \
        and isinstance(mod._parameters.get("weight"), nn.Parameter)


def quantize_model(model: nn.Module, fmt: str, quantized_backward: bool = False
                   ) -> Callable[[], None]:
    """Quantize every frozen ``nn.Linear`` of ``model``; return the undo callable."""
    undos = [quantize_linear(cast(nn.Linear, mod), fmt, quantized_backward)
             for mod in model.modules()
             if _quantizable(mod) and not cast(nn.Linear, mod).weight.requires_grad]

    def undo_all() -> None:
        for undo in reversed(undos):
            undo()

    return undo_all


def prepare_base(config: Any) -> Callable[[str, nn.Module], None]:
    """The per-module transform applied to the frozen base on the host while it loads
    (``MemoryStrategySpec.prepare_base``): each ``nn.Linear`` is quantized as soon as
    its weight is read, so the full-precision weight of one layer at a time is
    resident, never the whole full-precision model (nor on the device)."""
    fmt, backward = _format(config), bool(config.memory.quantized_backward)

    def prepare(path: str, module: nn.Module) -> None:
        weight = module._parameters.get("weight") if _quantizable(module) else None
        if weight is not None and weight.device.type != "meta":
            quantize_linear(cast(nn.Linear, module), fmt, backward)

    return prepare


# -- the strategy -----------------------------------------------------------------------

class QuantizeOptions(PluginOptions):
    """``model.quantize``: a key of the model section that this strategy adds to every
    model family (it is the only reader)."""

    quantize: Literal["none", "fp8", "int8"] = Field(
        default="none", description="Store the frozen base's Linear weights quantized "
        "(per-output-channel scales).")


def _format(config: Any) -> str:
    """The configured storage format of the base (``none`` when off)."""
    return str(getattr(config.model, "quantize", "none"))


def validate(config: Any) -> list[str]:
    problems = []
    fmt = _format(config)
    if fmt != "none" and not config.memory.bypass_mode:
        problems.append(f"model.quantize: {fmt} needs memory.bypass_mode: true (in weight "
                        f"mode adapters rebuild W+ΔW from the base weight, which a "
                        f"quantized layer does not keep)")
    if config.memory.quantized_backward:
        if fmt == "none":
            problems.append("memory.quantized_backward: needs a quantized base "
                            "(model.quantize: fp8 or int8)")
        if config.training.dtype != "none":
            problems.append(f"memory.quantized_backward: needs training.dtype: none "
                            f"(got {config.training.dtype})")
    return problems


def apply(ctx: BuildContext, memory: Any) -> StrategyResult:
    """The layers are quantized already (``prepare_base``, while loading or on the host
    before the move to the device); what is left is the undo: every quantized layer
    of the model back to its class, with the dequantized weight."""
    fmt = _format(ctx.config)
    rest = quantize_model(ctx.model, fmt, bool(memory.quantized_backward))
    layers = [m for m in ctx.model.modules() if isinstance(m, QuantizedLinear)]

    def undo() -> None:
        rest()
        for layer in reversed(layers):
            if isinstance(layer, QuantizedLinear):
                restore_linear(layer)

    return StrategyResult(undo=undo)


def describe(config: Any) -> str:
    backward = ", quantized backward" if config.memory.quantized_backward else ""
    return f"quantized_base({_format(config)}{backward})"


SPEC = MemoryStrategySpec(
    "quantized_base", QuantizedBackwardOptions,
    enabled=lambda c: _format(c) != "none", apply=apply, order=5, validate=validate,
    describe=describe, prepare_base=prepare_base, extends={"model": QuantizeOptions},
    description="Linear weights of the frozen base stored fp8/int8 (model.quantize); "
                "optional quantized input-gradient matmul.")
