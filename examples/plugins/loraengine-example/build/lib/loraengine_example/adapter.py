"""LoRA-FA: low-rank adaptation with a frozen, randomly initialised down projection
(Zhang et al. 2023, "LoRA-FA: Memory-efficient Low-rank Adaptation").

ΔW = up · down · α/r, as in LoRA, but only ``up`` (zero at init) is trained. The frozen
``down`` is a buffer: it is saved with the file and never gets a gradient, so the
optimizer keeps state for half the parameters, and the backward pass needs no
gradient for it.

The file uses kohya's LoRA keys (``lora_down.weight``, ``lora_up.weight``, ``alpha``),
so anything that reads a LoRA reads a LoRA-FA file; convolutions keep their kernel in
``down`` and a 1×1 ``up``, saved 4-D.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from loraengine import AdapterSpec, PluginOptions
from loraengine.core.adapter import AdapterLayer, layer_op

__all__ = ["LoRAFALayer", "LoRAFAOptions", "SPEC"]


class LoRAFAOptions(PluginOptions):
    train_down: bool = Field(False, description="Train the down projection as well (plain "
                             "LoRA); by default it stays at its random init.")


def _shapes(weight: torch.Tensor, rank: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(down, up) shapes for a Linear ``[out, in]`` or conv ``[out, in, *kernel]``."""
    kernel = tuple(weight.shape[2:])
    return ((rank, weight.shape[1], *kernel),
            (weight.shape[0], rank, *([1] * len(kernel))))


class LoRAFALayer(AdapterLayer):
    """One adapted Linear/Conv layer."""

    algorithm = "lora_fa"

    def __init__(self, base: nn.Module, rank: int, alpha: float, train_down: bool = False):
        super().__init__(base, rank, alpha)
        down_shape, up_shape = _shapes(base.weight, rank)
        self.lora_up = nn.Parameter(torch.zeros(up_shape))
        down = torch.empty(down_shape)
        if train_down:
            self.lora_down = nn.Parameter(down)
        else:
            self.register_buffer("lora_down", down)

    def delta_weight(self) -> torch.Tensor:
        up = self.lora_up.flatten(1)
        down = self.lora_down.flatten(1).to(up.dtype)
        dw = (up @ down).reshape(self.base.weight.shape)
        return dw * (self.scale * self.multiplier)

    def bypass(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        # x → down (the base's own stride/padding) → up (pointwise): ΔW is never built.
        dt = base_out.dtype
        x = x.to(dt)
        h = layer_op(self.base, x, self.lora_down.to(dt), None)
        up = self.lora_up.to(dt)
        if up.ndim == 2:
            h = F.linear(h, up)
        else:
            h = {3: F.conv1d, 4: F.conv2d, 5: F.conv3d}[up.ndim](h, up)
        return base_out + h * (self.scale * self.multiplier)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Weight mode calls this in place of the base layer's forward. The factored path
        # is cheaper than rebuilding W+ΔW at a low rank; the base op runs through
        # ``layer_op`` because ``self.base(x)`` would come back here.
        base = self.base
        return self.bypass(x, layer_op(base, x, base.weight, base.bias))

    def file_tensors(self) -> dict[str, torch.Tensor]:
        return {"lora_down.weight": self.lora_down, "lora_up.weight": self.lora_up,
                "alpha": torch.tensor(self.alpha)}


def create(base: nn.Module, rank: int, alpha: float, options: Any,
           generator: torch.Generator | None) -> LoRAFALayer:
    layer = LoRAFALayer(base, rank, alpha, bool(getattr(options, "train_down", False)))
    with torch.no_grad():
        # The frozen projection must keep the signal's scale: N(0, 1/fan_in).
        fan_in = math.prod(layer.lora_down.shape[1:])
        layer.lora_down.copy_(torch.randn(layer.lora_down.shape, generator=generator)
                              / math.sqrt(fan_in))
    return layer


def load(base: nn.Module, tensors: dict[str, torch.Tensor], options: Any) -> LoRAFALayer:
    """Rebuild from saved tensors; the rank comes from ``lora_down``'s first dimension."""
    down, up = tensors["lora_down.weight"], tensors["lora_up.weight"]
    rank = int(down.shape[0])
    alpha = float(tensors["alpha"]) if "alpha" in tensors else float(rank)
    layer = LoRAFALayer(base, rank, alpha, bool(getattr(options, "train_down", False)))
    down_shape, up_shape = _shapes(base.weight, rank)
    if down.numel() != math.prod(down_shape) or up.numel() != math.prod(up_shape):
        raise ValueError(f"LoRA-FA tensors {list(down.shape)}/{list(up.shape)} do not fit a "
                         f"layer with weight {list(base.weight.shape)}")
    with torch.no_grad():
        layer.lora_down.copy_(down.reshape(down_shape).float())
        layer.lora_up.copy_(up.reshape(up_shape).float())
    return layer


def owns_keys(keys: set[str]) -> bool:
    return {"lora_down.weight", "lora_up.weight"} <= keys and not any(
        k.startswith("dora_scale") for k in keys)


SPEC = AdapterSpec(
    name="lora_fa", create=create, load=load, owns_keys=owns_keys,
    config_model=LoRAFAOptions, network_module="networks.lora",
    layer_types=(nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d),
    description="LoRA-FA: LoRA with a frozen random down projection; only up is trained.")
