"""LoRA: ΔW = up · down · α/r (kohya keys ``lora_down.weight``, ``lora_up.weight``,
``alpha``). Convolutions keep their kernel in ``down`` and a 1×1 ``up``, saved 4-D.

Options: ``rs_lora`` (scale α/√r; the file stores α·√r so every reader, which divides
by r, gets the same scale) and ``weight_decompose`` (DoRA, ``dora_scale``)."""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from pydantic import Field
from torch import nn

from loraengine.core.adapter import layer_dims, layer_op, weight_of
from loraengine.core.plugins.specs import AdapterSpec
from loraengine.plugins.adapters.common import (
    copy_saved,
    has_keys,
    low_rank_bound,
    pointwise,
    saved_alpha,
)
from loraengine.plugins.adapters.dora import (
    AdditiveAdapter,
    DoRAOptions,
    dora_file_options,
    dora_metadata,
    load_dora,
    with_dora,
)
from loraengine.plugins.adapters.lora_fused import fusable, lora_forward


class LoRAOptions(DoRAOptions):
    rs_lora: bool = Field(False, description="Rank-stabilised scale α/√r instead of α/r.")


#: A saved module is LoRA when it has both factors.
owns_keys = has_keys("lora_down.weight", "lora_up.weight")


def _shapes(base: nn.Module, rank: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    w = weight_of(base)
    if w.ndim == 2:
        return (rank, w.shape[1]), (w.shape[0], rank)
    kernel = tuple(w.shape[2:])
    return (rank, w.shape[1], *kernel), (w.shape[0], rank, *([1] * len(kernel)))


class LoRALayer(AdditiveAdapter):
    """Low-rank update of one Linear/Conv layer."""

    algorithm = "lora"

    def __init__(self, base: nn.Module, rank: int, alpha: float, rs_lora: bool = False,
                 generator: torch.Generator | None = None):
        # rs_lora is folded into alpha: α/√r == (α·√r)/r, which is what the file says.
        super().__init__(base, rank, alpha * math.sqrt(rank) if rs_lora else alpha)
        self.rs_lora = rs_lora
        down_shape, up_shape = _shapes(base, rank)
        self.lora_down = nn.Parameter(torch.empty(down_shape, dtype=torch.float32))
        self.lora_up = nn.Parameter(torch.zeros(up_shape, dtype=torch.float32))
        nn.init.kaiming_uniform_(self.lora_down, a=math.sqrt(5), generator=generator)

    def raw_delta(self) -> torch.Tensor:
        dw = self.lora_up.flatten(1) @ self.lora_down.flatten(1)
        return dw.reshape(weight_of(self.base).shape) * self.scale

    def raw_bypass(self, x: torch.Tensor, gain: float = 1.0) -> torch.Tensor:
        dt = x.dtype
        down = self.lora_down.to(dt)
        up = (self.lora_up * (self.scale * gain)).to(dt)  # scale the small factor, not h
        h = layer_op(self.base, x, down, None)  # the base's stride/padding/dilation
        return pointwise(h, up)

    # Without DoRA, the factored path and bypass run as one fused autograd node per
    # layer (lora_fused.py) where the base layer allows; DoRA and other layers keep the
    # generic route above.
    def _fused(self) -> bool:
        return self.dora_scale is None and fusable(self.base)

    def bypass(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        if not self._fused():
            return super().bypass(x, base_out)
        return lora_forward(self.base, x.to(base_out.dtype), self.lora_down, self.lora_up,
                            self.scale * self.multiplier, base_out)

    def run_factored(self, x: torch.Tensor) -> torch.Tensor:
        if not self._fused():
            return super().run_factored(x)
        return lora_forward(self.base, x, self.lora_down, self.lora_up,
                            self.scale * self.multiplier)

    def factored_flops(self, x: torch.Tensor) -> float:
        n, fan_in, out = layer_dims(self.base, x)
        return 6.0 * n * self.rank * (fan_in + out)  # down and up; backward twice forward

    def build_flops(self) -> float:
        n_out, fan_in = self.lora_up.shape[0], self.lora_down[0].numel()
        return 6.0 * n_out * self.rank * fan_in

    def adapter_tensors(self) -> dict[str, torch.Tensor]:
        return {"lora_down.weight": self.lora_down, "lora_up.weight": self.lora_up,
                "alpha": torch.tensor(self.alpha)}


def create(base: nn.Module, rank: int, alpha: float, options: object,
           generator: torch.Generator | None) -> LoRALayer:
    rs_lora = bool(getattr(options, "rs_lora", False))
    return with_dora(LoRALayer(base, rank, alpha, rs_lora, generator), options)


def load(base: nn.Module, tensors: Mapping[str, torch.Tensor], options: object) -> LoRALayer:
    """Rebuild from saved tensors. The saved alpha already carries any rs_lora factor."""
    down, up = tensors["lora_down.weight"], tensors["lora_up.weight"]
    rank = int(down.shape[0])
    layer = LoRALayer(base, rank, saved_alpha(tensors, rank))
    mismatch = (f"LoRA shapes {list(down.shape)}/{list(up.shape)} do not fit a layer "
                f"with weight {list(weight_of(base).shape)}")
    copy_saved(layer.lora_down, down, mismatch)
    copy_saved(layer.lora_up, up, mismatch)
    return load_dora(layer, tensors, options)


SPEC = AdapterSpec(
    name="lora", create=create, load=load, owns_keys=owns_keys,
    file_metadata=dora_metadata, file_options=dora_file_options, config_model=LoRAOptions,
    full_rank=low_rank_bound, network_module="networks.lora", description="Low-rank adaptation (LoRA / LoCon), "
    "optionally rank-stabilised or weight-decomposed (DoRA).")
