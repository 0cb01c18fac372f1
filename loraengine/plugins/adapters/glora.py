"""GLoRA (generalised LoRA): a low-rank map on the layer's input channels plus a LoRA,
ΔW = γ·(W·A + B) with A = a1·a2 (``[in, in]``, rank r) and B = b1·b2, γ = α/r.

Keys (LyCORIS): ``a1.weight`` ``[in, r(,1…)]``, ``a2.weight`` ``[r, in(,1…)]``,
``b1.weight`` ``[out, r(,1…)]``, ``b2.weight`` ``[r, in, *kernel]``, ``alpha``. The A
factors act pointwise on the input channels, B carries the base's kernel. a2 and b2
start at zero, so ΔW = 0.

Bypass runs the base layer on x + γ·A(x) and adds γ·B(x): the scale is applied once to
each term (LyCORIS once applied it twice in bypass).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import nn

from loraengine.core.adapter import AdapterLayer, layer_op, weight_of
from loraengine.core.plugins.specs import AdapterSpec
from loraengine.plugins.adapters.common import (
    base_forward,
    copy_saved,
    has_keys,
    low_rank_bound,
    pointwise,
    saved_alpha,
)


def glora_shapes(base: nn.Module, rank: int) -> dict[str, tuple[int, ...]]:
    w = weight_of(base)
    out_dim, in_dim, kernel = int(w.shape[0]), int(w.shape[1]), tuple(w.shape[2:])
    ones = (1,) * len(kernel)
    return {"a1": (in_dim, rank, *ones), "a2": (rank, in_dim, *ones),
            "b1": (out_dim, rank, *ones), "b2": (rank, in_dim, *kernel)}


class GLoRALayer(AdapterLayer):
    """W·(I + γ·a1a2) + γ·b1b2 on one Linear/Conv layer."""

    algorithm = "glora"

    def __init__(self, base: nn.Module, rank: int, alpha: float,
                 generator: torch.Generator | None = None):
        super().__init__(base, rank, alpha)
        shapes = glora_shapes(base, rank)
        self.a1 = nn.Parameter(torch.empty(shapes["a1"], dtype=torch.float32))
        self.a2 = nn.Parameter(torch.zeros(shapes["a2"], dtype=torch.float32))
        self.b1 = nn.Parameter(torch.empty(shapes["b1"], dtype=torch.float32))
        self.b2 = nn.Parameter(torch.zeros(shapes["b2"], dtype=torch.float32))
        nn.init.kaiming_uniform_(self.a1, a=math.sqrt(5), generator=generator)
        nn.init.kaiming_uniform_(self.b1, a=math.sqrt(5), generator=generator)

    def input_map(self) -> torch.Tensor:
        """A = a1·a2 as an ``[in, in]`` matrix."""
        return self.a1.flatten(1) @ self.a2.flatten(1)

    def delta_weight(self) -> torch.Tensor:
        w = weight_of(self.base).detach().float()
        wa = torch.einsum("oi...,ij->oj...", w, self.input_map().float())
        b = (self.b1.flatten(1) @ self.b2.flatten(1)).reshape(w.shape).float()
        return (wa + b) * (self.scale * self.multiplier)

    def bypass(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        dt = base_out.dtype
        x = x.to(dt)
        gamma = self.scale * self.multiplier
        shifted = x + pointwise(pointwise(x, self.a2.to(dt)), self.a1.to(dt)) * gamma
        # W·A needs the base operation on a shifted input; running it on x + γ·A(x)
        # costs the same as on γ·A(x) and is exact for the bias (counted once).
        b_path = layer_op(self.base, x, self.b2.to(dt), None)  # the base's kernel/stride
        return base_forward(self.base, shifted) + pointwise(b_path, self.b1.to(dt)) * gamma

    def file_tensors(self) -> dict[str, torch.Tensor]:
        return {"a1.weight": self.a1, "a2.weight": self.a2, "b1.weight": self.b1,
                "b2.weight": self.b2, "alpha": torch.tensor(self.alpha)}


def create(base: nn.Module, rank: int, alpha: float, options: object,
           generator: torch.Generator | None) -> GLoRALayer:
    return GLoRALayer(base, rank, alpha, generator)


KEYS = ("a1.weight", "a2.weight", "b1.weight", "b2.weight")


def load(base: nn.Module, tensors: Mapping[str, torch.Tensor], options: object) -> GLoRALayer:
    if "bm.weight" in tensors:
        raise ValueError("GLoRA with a Tucker core (bm.weight) is not supported")
    rank = int(tensors["a2.weight"].shape[0])
    # LyCORIS reads alpha 0 as "no scaling"
    layer = GLoRALayer(base, rank, saved_alpha(tensors, rank) or float(rank))
    want = glora_shapes(base, rank)
    for key in KEYS:
        name = key.split(".")[0]
        t = tensors[key]
        copy_saved(getattr(layer, name), t,
                   f"{key} has shape {list(t.shape)}, a layer with weight "
                   f"{list(weight_of(base).shape)} needs {list(want[name])}")
    return layer


owns_keys = has_keys(*KEYS)


SPEC = AdapterSpec(
    name="glora", create=create, load=load, owns_keys=owns_keys, full_rank=low_rank_bound,
    network_module="lycoris.kohya",
    description="Generalised LoRA: a low-rank map of the input plus a LoRA.")
