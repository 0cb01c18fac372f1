"""IA3: a learned per-channel scale of the weight, W′ = W·(1 + w) on the output rows
(default) or on the input columns (``on_input``). ΔW = W ⊙ w, w starts at zero.

Keys (LyCORIS): ``weight`` (``[C]`` for Linear, ``[1, C, 1, …]`` for convolutions) and
``on_input`` (0/1). There is no rank and no scale.

Bypass scales the weight-only part of the output, y + w ⊙ (y − b), so the bias keeps
its value as in the merged layer; on the input side it runs the base on x ⊙ (1 + w).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping

import torch
from pydantic import Field
from torch import nn

from loraengine.core.adapter import AdapterLayer, bias_of, weight_of
from loraengine.core.plugins.specs import AdapterSpec, PluginOptions
from loraengine.plugins.adapters.common import base_forward


class IA3Options(PluginOptions):
    on_input: bool = Field(False, description="Scale the input channels instead of the "
                           "output channels (LyCORIS `train_on_input`).")


def _vector_shape(base: nn.Module, channels: int) -> tuple[int, ...]:
    if isinstance(base, nn.Linear):
        return (channels,)
    return (1, channels, *([1] * (weight_of(base).ndim - 2)))


class IA3Layer(AdapterLayer):
    """Per-channel scaling of one Linear/Conv layer."""

    algorithm = "ia3"

    def __init__(self, base: nn.Module, on_input: bool = False):
        super().__init__(base, 1, 1.0)
        self.on_input = bool(on_input)
        w = weight_of(base)
        channels = int(w.shape[1] if on_input else w.shape[0])
        self.weight = nn.Parameter(torch.zeros(_vector_shape(base, channels),
                                               dtype=torch.float32))

    def delta_weight(self) -> torch.Tensor:
        w = weight_of(self.base).detach().float()
        shape = [1] * w.ndim
        shape[1 if self.on_input else 0] = -1
        return w * self.weight.reshape(shape).float() * self.multiplier

    def bypass(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        dt = base_out.dtype
        scale = self.weight.to(dt) * self.multiplier  # broadcasts on the channel axis
        if self.on_input:
            return base_forward(self.base, x.to(dt) * (1 + scale))
        weight_part = base_out
        bias = bias_of(self.base)
        if bias is not None:
            weight_part = base_out - bias.detach().to(dt).reshape(scale.shape)
        return base_out + weight_part * scale

    def file_tensors(self) -> dict[str, torch.Tensor]:
        return {"weight": self.weight, "on_input": torch.tensor(int(self.on_input))}


def create(base: nn.Module, rank: int, alpha: float, options: object,
           generator: torch.Generator | None) -> IA3Layer:
    return IA3Layer(base, bool(getattr(options, "on_input", False)))


def load(base: nn.Module, tensors: Mapping[str, torch.Tensor], options: object) -> IA3Layer:
    vec = tensors["weight"]
    out_dim, in_dim = int(weight_of(base).shape[0]), int(weight_of(base).shape[1])
    if "on_input" in tensors:
        on_input = bool(int(tensors["on_input"]))
    elif vec.numel() in (out_dim, in_dim):
        on_input = vec.numel() != out_dim
    else:
        on_input = False
    want = in_dim if on_input else out_dim
    if vec.numel() != want:
        side = "input" if on_input else "output"
        raise ValueError(f"IA3 weight has {vec.numel()} values, the layer has {want} "
                         f"{side} channels")
    layer = IA3Layer(base, on_input)
    with torch.no_grad():
        layer.weight.copy_(vec.float().reshape(layer.weight.shape))
    return layer


def owns_keys(keys: Collection[str]) -> bool:
    """An IA3 module: a ``weight`` vector (and ``on_input``). Asked with the tensors, it
    also checks that ``weight`` is one vector (unit dimensions aside), so a model's own weights are not IA3."""
    names = set(keys)
    if not ("weight" in names and names <= {"weight", "on_input"}):
        return False
    if isinstance(keys, Mapping):
        weight = keys["weight"]
        # a vector, possibly saved with unit dimensions (a conv's [1, c, 1, 1])
        return isinstance(weight, torch.Tensor) and weight.numel() == max(weight.shape,
                                                                          default=1)
    return True


SPEC = AdapterSpec(
    name="ia3", create=create, load=load, owns_keys=owns_keys, config_model=IA3Options,
    network_module="lycoris.kohya", description="IA3: learned per-channel scaling.")
