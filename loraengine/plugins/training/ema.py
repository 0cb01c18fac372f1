"""An exponential moving average of the adapter weights, saved as
``<name>.ema.safetensors`` next to the LoRA (same key format and metadata).

After every ``every``-th optimizer step: ``θ̄ ← d·θ̄ + (1 − d)·θ`` over the trainable
adapter tensors, starting from their initial values, kept in fp32 (on the CPU with
``on_cpu``, which costs a copy per update but no accelerator memory). With ``warmup``
the decay of the n-th update (0-based) is ``min(d, (1 + n)/(10 + n))``, so early
averages do not stay stuck near the initial weights.

The average is a ``torch.optim.swa_utils.AveragedModel`` updated by
``get_ema_multi_avg_fn`` (its copy, device placement and fused per-device lerp). What
stays here is what neither it nor ``diffusers.training_utils.EMAModel`` does as this
recipe is pinned: the average starts from the initial weights (AveragedModel's first
update would replace them with the weights after step 1, so it is given θ0 as that
first update); the decay may change per update (the warmup; ``get_ema_multi_avg_fn``
fixes it when made, so one is made per update); ``every``; and a checkpoint state of
plain tensors and counts. ``EMAModel`` does not fit: its first update always copies
the weights (decay 0) and its decay always ramps as ``(1 + n)/(10 + n)`` or
``1 − (1 + n/γ)^−p``, so neither a constant decay from θ0 nor this warmup is possible.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from typing import Any

import torch
from pydantic import Field
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from loraengine.core.plugins.specs import PluginOptions, RecipeSpec
from loraengine.core.recipe import Recipe


class EMASettings(PluginOptions):
    decay: float = Field(0.999, gt=0.0, lt=1.0, description="Weight of the old average.")
    every: int = Field(1, ge=1, le=100000, description="Update every N optimizer steps.")
    on_cpu: bool = Field(False, description="Keep the average in CPU memory.")
    warmup: bool = Field(False, description="Decay min(decay, (1+n)/(10+n)) at update n.")


class EMAOptions(PluginOptions):
    ema: EMASettings | None = Field(None, description="Average the adapter weights "
                                    "(off when absent).")


class AdapterEMA(Recipe):
    name = "ema"

    def __init__(self, params: list[torch.nn.Parameter], settings: EMASettings):
        self.params = params
        self.settings = settings
        self._live = torch.nn.ParameterList(params)  # a view for update_parameters
        # AveragedModel copies the module it is given and then moves the copy. For a
        # CPU average (or weights not in fp32) it is given fp32 copies already in place,
        # so a large adapter is never doubled on the accelerator on its way to the CPU.
        device = torch.device("cpu") if settings.on_cpu else None
        if device is None and all(p.dtype == torch.float32 for p in params):
            seed: torch.nn.Module = self._live
        else:
            seed = torch.nn.ParameterList(
                torch.nn.Parameter(p.detach().to(device=device or p.device,
                                                 dtype=torch.float32, copy=True))
                for p in params)
        self._averaged = AveragedModel(seed, device=device, multi_avg_fn=self._lerp)
        self._averaged.requires_grad_(False)
        self._averaged.update_parameters(self._live)  # θ̄ = θ0 (AveragedModel copies)
        self.steps = 0    # optimizer steps seen
        self.updates = 0  # averages taken

    @property
    def average(self) -> list[torch.Tensor]:
        """The averaged tensors, in the order of ``params``."""
        return list(self._averaged.module.parameters())

    def decay(self) -> float:
        d = self.settings.decay
        if self.settings.warmup:
            d = min(d, (1 + self.updates) / (10 + self.updates))
        return d

    def _lerp(self, average: Sequence[torch.Tensor], current: Sequence[torch.Tensor],
              _: Any) -> None:
        # AveragedModel groups by the average's device and dtype; the weights come
        # in their own dtype (fp32 for every built-in adapter, then this is a no-op)
        current = [c.to(a.dtype) for a, c in zip(average, current, strict=True)]
        get_ema_multi_avg_fn(self.decay())(list(average), current, None)

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        self.steps += 1
        if self.steps % self.settings.every:
            return
        self._averaged.update_parameters(self._live)
        self.updates += 1

    @contextmanager
    def swapped(self) -> Iterator[None]:
        """The adapter holds the averaged weights inside this block."""
        saved = [p.detach().clone() for p in self.params]
        try:
            with torch.no_grad():
                for p, avg in zip(self.params, self.average, strict=True):
                    p.copy_(avg.to(device=p.device, dtype=p.dtype))
            yield
        finally:
            with torch.no_grad():
                for p, old in zip(self.params, saved, strict=True):
                    p.copy_(old)

    def variants(self) -> dict[str, Callable[[], AbstractContextManager[None]]]:
        return {"ema": self.swapped}

    def state_dict(self) -> dict[str, Any]:
        return {"average": [a.clone() for a in self.average], "steps": self.steps,
                "updates": self.updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        with torch.no_grad():
            for avg, saved in zip(self.average, state["average"], strict=True):
                avg.copy_(saved)
        self.steps, self.updates = int(state["steps"]), int(state["updates"])
        self._averaged.n_averaged.fill_(self.updates + 1)  # θ0 counts as the first


def _build(config: Any, pipe: Any) -> AdapterEMA:
    return AdapterEMA(pipe.trainable_parameters(), config.recipe.ema)


SPEC = RecipeSpec("ema", EMAOptions, enabled=lambda c: c.recipe.ema is not None, build=_build,
                  order=100, description="EMA of the adapter weights -> <name>.ema.safetensors.")
