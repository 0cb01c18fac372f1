"""The shared base of the additive adapters (LoRA, LoHa, LoKr) and their DoRA option.

A subclass supplies ``raw_delta()`` — its ΔW with the algorithm's scale, without the
multiplier — and may supply ``raw_bypass(x, gain)``, the output of that delta layer
times ``gain``, computed from its factors (folding the gain into its smallest factor).
This class adds the multiplier and, with ``weight_decompose: true``,
DoRA: the adapted weight is ``m · (W+ΔW) / ‖W+ΔW‖`` with one norm per output channel
and a trained magnitude ``m`` (the file's ``dora_scale``, shape ``[out, 1, ...]``),
initialised to ‖W‖ so the adapter starts as the identity.

DoRA is written so that it is exactly zero at init and the three paths agree:
``ΔW_total = (s−1)·W + s·ΔW`` with ``s = m/‖W+ΔW‖``, and in bypass
``y = f(x) + (s−1)·(f(x) − b) + s·Δ(x)``. The norm reads the base weight, so DoRA is
the one case where bypass mode reads it. Files whose ``dora_scale`` is per input column
(``[1, in, ...]``, older LyCORIS) load too; their bypass builds ΔW.

``weight_decompose_norm: comfyui`` trains the variant ComfyUI (and Forge) compute when
they load a file (``weight_decompose`` in ``comfy/weight_adapter/base.py``): with the
magnitude per output channel they divide by ‖W‖ + ε, the norm of the *base* weight,
instead of ‖W+ΔW‖, and with it per input column by ‖W+ΔW‖ + ε; ε is float32's machine
epsilon (their patching runs in float32). The magnitude then starts at ‖W‖ + ε, so s is
exactly 1 at init. Since ‖W‖ does not depend on the factors, the output-axis case needs
no ΔW in bypass or on the factored path. The file records the norm in its metadata
(``loraengine.weight_decompose_norm``, ``dora_metadata``) and every reader builds its
layers with it (``AdapterSpec.file_options``: ``dora_file_options``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal, TypeVar, cast

import torch
from pydantic import Field
from torch import nn

from loraengine.core.adapter import AdapterLayer, bias_of, layer_dims, layer_op, weight_of
from loraengine.core.plugins.specs import PluginOptions

#: ``weight_decompose_norm``: what DoRA divides the magnitude by (see the module doc).
DoRANorm = Literal["standard", "comfyui"]
#: The metadata key a file records its DoRA norm under.
NORM_KEY = "loraengine.weight_decompose_norm"
#: float32's machine epsilon: what ComfyUI adds to the norm (its patching is in float32).
EPS = float(torch.finfo(torch.float32).eps)


class DoRAOptions(PluginOptions):
    """The options every additive algorithm has: its options model derives from this."""

    weight_decompose: bool = Field(False, description="DoRA: train a per-output-channel "
                                   "magnitude and the direction separately (dora_scale).")
    weight_decompose_norm: DoRANorm = Field(
        "standard", description="What DoRA divides the magnitude by. standard: the norm of "
        "W + ΔW per output channel (the DoRA paper, LyCORIS, PEFT). comfyui: the formula "
        "ComfyUI and Forge apply when they load a file, the norm of the base weight W plus "
        "float32's epsilon, so that they read the file exactly. Recorded in the file's "
        "metadata; every loraengine reader uses it.")


def dora_metadata(options: object) -> dict[str, str]:
    """The file metadata recording the DoRA norm (``AdapterSpec.file_metadata``): set
    when DoRA is on or the norm is not the standard one (a continued DoRA file)."""
    norm = str(getattr(options, "weight_decompose_norm", "standard"))
    if getattr(options, "weight_decompose", False) or norm != "standard":
        return {NORM_KEY: norm}
    return {}


def dora_file_options(metadata: Mapping[str, str]) -> dict[str, object]:
    """The norm a file's metadata records, as an option value (``AdapterSpec.file_options``):
    none recorded is the standard one (every other program's files)."""
    norm = metadata.get(NORM_KEY)
    if norm is None:
        return {}
    if norm not in ("standard", "comfyui"):
        raise ValueError(f"metadata {NORM_KEY}: expected standard or comfyui, got {norm!r}")
    return {"weight_decompose_norm": norm}


def norm_of(options: object) -> DoRANorm:
    """``options``' ``weight_decompose_norm`` (the standard norm where it has none)."""
    norm = getattr(options, "weight_decompose_norm", "standard")
    return cast(DoRANorm, norm if norm in ("standard", "comfyui") else "standard")


def f32(value: float) -> float:
    """``value`` rounded to float32, as it will read back from a file."""
    return float(torch.tensor(float(value), dtype=torch.float32))


def column_norms(weight: torch.Tensor, on_out: bool) -> torch.Tensor:
    """‖W‖ per output row (``[out, 1, ...]``) or per input column (``[1, in, ...]``)."""
    ones = [1] * (weight.ndim - 1)
    if on_out:
        return weight.reshape(weight.shape[0], -1).norm(dim=1).reshape(-1, *ones)
    w = weight.transpose(0, 1)
    return w.reshape(w.shape[0], -1).norm(dim=1).reshape(-1, *ones).transpose(0, 1)


def _channel_view(t: torch.Tensor, base: nn.Module, out: torch.Tensor) -> torch.Tensor:
    """Reshape a per-output-channel tensor to broadcast over ``base``'s output:
    channels last for Linear, at dim 1 for convolutions."""
    flat = t.reshape(-1)
    if isinstance(base, nn.Linear):
        return flat
    return flat.reshape(-1, *([1] * (out.ndim - 2)))


class AdditiveAdapter(AdapterLayer):
    """ΔW = multiplier · raw ΔW, or its DoRA form when ``dora_scale`` is set."""

    def __init__(self, base: nn.Module, rank: int, alpha: float):
        super().__init__(base, rank, f32(alpha))
        self.dora_scale: nn.Parameter | None = None
        self.dora_on_out = True
        #: ``weight_decompose_norm``: ``standard`` or ``comfyui`` (see the module doc).
        self.dora_norm: DoRANorm = "standard"

    # -- what subclasses provide ------------------------------------------------------
    def raw_delta(self) -> torch.Tensor:
        """ΔW with the algorithm's scale and without the multiplier or DoRA."""
        raise NotImplementedError

    def raw_bypass(self, x: torch.Tensor, gain: float = 1.0) -> torch.Tensor:
        """Output of the delta layer alone, times ``gain``. Default: the base op with
        ΔW."""
        dw = self.raw_delta()
        return layer_op(self.base, x, (dw if gain == 1 else dw * gain).to(x.dtype), None)

    def adapter_tensors(self) -> dict[str, torch.Tensor]:
        """The algorithm's own file tensors (``alpha`` included, ``dora_scale`` not)."""
        raise NotImplementedError

    # -- DoRA -------------------------------------------------------------------------
    def enable_dora(self, saved: torch.Tensor | None = None, norm: DoRANorm = "standard"
                    ) -> None:
        """Add the magnitude: from the base weight's norms (so that the adapter starts
        as the identity under ``norm``), or a saved ``dora_scale``."""
        w = weight_of(self.base)
        self.dora_norm = norm
        if saved is None:
            self.dora_on_out = True
            value = column_norms(w.detach().float(), True)
            if norm == "comfyui":
                value = value + EPS  # s = m / (‖W‖ + ε) is then exactly 1
        else:
            out_shape = (w.shape[0], *[1] * (w.ndim - 1))
            in_shape = (1, w.shape[1], *[1] * (w.ndim - 2))
            if saved.numel() == w.shape[0] and (saved.ndim == 1 or saved.shape[0] == w.shape[0]):
                self.dora_on_out, value = True, saved.reshape(out_shape)
            elif saved.numel() == w.shape[1]:
                self.dora_on_out, value = False, saved.reshape(in_shape)
            else:
                raise ValueError(f"dora_scale of shape {list(saved.shape)} fits neither the "
                                 f"output nor the input channels of weight {list(w.shape)}")
        self.dora_scale = nn.Parameter(value.detach().float().clone())
        self.forget_paths()  # DoRA's norm changes what each path costs

    @property
    def _norm_reads_delta(self) -> bool:
        """Whether the norm depends on ΔW: always but in ComfyUI's output-axis case."""
        return not (self.dora_norm == "comfyui" and self.dora_on_out)

    def _dora_factor(self, raw: torch.Tensor | None, magnitude: torch.Tensor) -> torch.Tensor:
        """s = m / ‖W + ΔW‖ (fp32), per output row or input column; with the ``comfyui``
        norm m / (‖W‖ + ε) per output row (``raw`` not needed), m / (‖W + ΔW‖ + ε) per
        input column."""
        w = weight_of(self.base).float()
        if self._norm_reads_delta:
            assert raw is not None
            w = w + raw.float()
        norms = column_norms(w, self.dora_on_out)
        if self.dora_norm == "comfyui":
            norms = norms + EPS
        return magnitude.float() / norms

    # -- the contract -----------------------------------------------------------------
    def delta_weight(self) -> torch.Tensor:
        raw = self.raw_delta()
        if self.dora_scale is None:
            return raw if self.multiplier == 1 else raw * self.multiplier
        s = self._dora_factor(raw, self.dora_scale)
        w = weight_of(self.base).float()
        # (s-1)·W + s·ΔW rather than s·(W+ΔW) − W: exactly zero when s is exactly 1.
        return ((s - 1) * w + s * raw.float()) * self.multiplier

    def bypass(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        dt = base_out.dtype
        if self.dora_scale is None:
            return base_out + self.raw_bypass(x.to(dt), self.multiplier)
        if not self.dora_on_out:
            return super().bypass(x, base_out)  # per-column norms: build ΔW
        raw = self.raw_delta() if self._norm_reads_delta else None
        s = _channel_view(self._dora_factor(raw, self.dora_scale), self.base, base_out)
        bias = bias_of(self.base)
        plain = base_out if bias is None else base_out - _channel_view(bias, self.base, base_out)
        h = self.raw_bypass(x.to(dt)).float()
        delta = (s - 1) * plain.float() + s * h
        return base_out + (delta * self.multiplier).to(dt)

    # -- the cost model ---------------------------------------------------------------
    def factored_flops(self, x: torch.Tensor) -> float | None:
        """FLOPs of ``raw_bypass`` on ``x``, forward+backward; ``None`` when it has no
        factored form (it then builds ΔW). Subclasses with a factored form override."""
        return None

    def build_flops(self) -> float:
        """FLOPs of building ``raw_delta()``, forward+backward (to its factors)."""
        return 3.0 * weight_of(self.base).numel()

    def path_flops(self, x: torch.Tensor) -> tuple[float, float] | None:
        factored = self.factored_flops(x)
        if factored is None or (self.dora_scale is not None and not self.dora_on_out):
            return None
        n, fan_in, out = layer_dims(self.base, x)
        build = self.build_flops()
        # Rebuild: ΔW built, and backward computes the full dL/dW (2·N·I·O) to reach it.
        # DoRA's norm builds ΔW on the factored path as well (not ComfyUI's ‖W‖).
        rebuild = build + 2.0 * n * fan_in * out
        norm_build = self.dora_scale is not None and self._norm_reads_delta
        return factored + (build if norm_build else 0.0), rebuild

    def file_tensors(self) -> dict[str, torch.Tensor]:
        out = self.adapter_tensors()
        if self.dora_scale is not None:
            out["dora_scale"] = self.dora_scale
        return out


Additive = TypeVar("Additive", bound=AdditiveAdapter)


def with_dora(layer: Additive, options: object) -> Additive:
    """``layer`` with DoRA switched on when ``options`` ask for it (``create``)."""
    if getattr(options, "weight_decompose", False):
        layer.enable_dora(norm=norm_of(options))
    return layer


def load_dora(layer: Additive, tensors: Mapping[str, torch.Tensor],
              options: object = None) -> Additive:
    """``layer`` with its ``dora_scale`` restored when the saved module has one
    (``load``), under the norm ``options`` name (the file's, ``dora_file_options``)."""
    if "dora_scale" in tensors:
        layer.enable_dora(tensors["dora_scale"], norm_of(options))
    return layer
