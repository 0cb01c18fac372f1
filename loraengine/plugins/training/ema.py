"""An exponential moving average of the adapter weights, saved as
``<name>.ema.safetensors`` next to the LoRA (same key format and metadata).

After every ``every``-th optimizer step: ``θ̄ ← d·θ̄ + (1 − d)·θ`` over the trainable
adapter tensors, starting from their initial values, kept in fp32 (on the CPU with
``on_cpu``, which costs a copy per update but no accelerator memory). With ``warmup``
the decay of the n-th update (0-based) is ``min(d, (1 + n)/(10 + n))``, so early
averages do not stay stuck near the initial weights.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any

import torch
from pydantic import Field

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
        device = torch.device("cpu") if settings.on_cpu else None
        self.average = [p.detach().to(device=device or p.device, dtype=torch.float32,
                                      copy=True) for p in params]
        self.steps = 0    # optimizer steps seen
        self.updates = 0  # averages taken

    def decay(self) -> float:
        d = self.settings.decay
        if self.settings.warmup:
            d = min(d, (1 + self.updates) / (10 + self.updates))
        return d

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        self.steps += 1
        if self.steps % self.settings.every:
            return
        weight = 1.0 - self.decay()
        for avg, p in zip(self.average, self.params, strict=True):
            avg.lerp_(p.detach().to(device=avg.device, dtype=torch.float32), weight)
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


def _build(config: Any, pipe: Any) -> AdapterEMA:
    return AdapterEMA(pipe.trainable_parameters(), config.recipe.ema)


SPEC = RecipeSpec("ema", EMAOptions, enabled=lambda c: c.recipe.ema is not None, build=_build,
                  order=100, description="EMA of the adapter weights -> <name>.ema.safetensors.")
