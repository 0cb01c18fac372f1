"""Full deltas: ΔW and Δb stored whole (keys ``diff`` and ``diff_b``, as ComfyUI and
LyCORIS write them; no alpha, rank is ignored). Both start at zero.

The most expressive and the largest "adapter": a fine-tune of the selected layers
kept as a difference from the base, so it can still be applied at any strength.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from loraengine.core.adapter import AdapterLayer, weight_of
from loraengine.core.plugins.specs import AdapterSpec
from loraengine.plugins.adapters.common import has_keys


class FullLayer(AdapterLayer):
    """ΔW (and Δb when the base has a bias) as parameters of the base's shapes."""

    algorithm = "full"

    def __init__(self, base: nn.Module, with_bias: bool | None = None):
        super().__init__(base, 1, 1.0)
        w = weight_of(base)
        self.diff = nn.Parameter(torch.zeros(w.shape))
        if with_bias is None:
            with_bias = getattr(base, "bias", None) is not None
        self.diff_b = nn.Parameter(torch.zeros(w.shape[0])) if with_bias else None

    @property
    def scale(self) -> float:
        return 1.0

    def delta_weight(self) -> torch.Tensor:
        return self.diff if self.multiplier == 1 else self.diff * self.multiplier

    def delta_bias(self) -> torch.Tensor | None:
        if self.diff_b is None or self.multiplier == 1:
            return self.diff_b
        return self.diff_b * self.multiplier

    def file_tensors(self) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {"diff": self.diff}
        if self.diff_b is not None:
            out["diff_b"] = self.diff_b
        return out


def create(base: nn.Module, rank: int, alpha: float, options: object,
           generator: torch.Generator | None) -> FullLayer:
    return FullLayer(base)


def load(base: nn.Module, tensors: Mapping[str, torch.Tensor], options: object) -> FullLayer:
    diff = tensors["diff"]
    w = weight_of(base)
    if diff.numel() != w.numel():
        raise ValueError(f"diff of shape {list(diff.shape)} does not fit weight {list(w.shape)}")
    layer = FullLayer(base, with_bias="diff_b" in tensors)
    with torch.no_grad():
        layer.diff.copy_(diff.reshape(w.shape).float())
        if layer.diff_b is not None:
            diff_b = tensors["diff_b"]
            if diff_b.numel() != w.shape[0]:
                raise ValueError(f"diff_b of shape {list(diff_b.shape)} does not fit "
                                 f"{w.shape[0]} output channels")
            layer.diff_b.copy_(diff_b.reshape(-1).float())
    return layer


owns_keys = has_keys("diff")


SPEC = AdapterSpec(
    name="full", create=create, load=load, owns_keys=owns_keys,
    network_module="lycoris.kohya", description="Full weight and bias deltas (diff, diff_b).")
