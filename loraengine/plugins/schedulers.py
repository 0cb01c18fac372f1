"""Built-in learning-rate schedules: constant, linear, cosine, cosine with restarts and
polynomial decay, each with an optional linear warmup.

Every schedule is a multiplier ``m(s)`` of the configured ``optimizer.lr`` for the
0-based optimizer step ``s`` of ``T = training.steps``:

- warmup of ``W`` steps: ``m(s) = (s + 1) / W`` for ``s < W`` (the first step already
  moves, the W-th uses the full rate);
- after it, with progress ``p = (s - W) / (T - W)`` in ``[0, 1)`` and floor
  ``f = min_lr_ratio``: linear ``f + (1 - f)(1 - p)``; cosine
  ``f + (1 - f)·½(1 + cos πp)``; cosine with ``n`` hard restarts
  ``f + (1 - f)·½(1 + cos(π·frac(n·p)))``; polynomial ``f + (1 - f)(1 - p)^power``.

``W`` is ``warmup_steps`` or ``ceil(warmup_ratio · T)``; the two are exclusive.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TypeVar

import torch
from pydantic import Field, model_validator

from loraengine.core.plugins.hookspecs import hookimpl
from loraengine.core.plugins.specs import LRSchedulerSpec, PluginOptions

Multiplier = Callable[[float], float]


class WarmupOptions(PluginOptions):
    warmup_steps: int = Field(0, ge=0, description="Linear warmup over this many steps.")
    warmup_ratio: float = Field(0.0, ge=0.0, lt=1.0, description="Warmup as a fraction "
                                "of training.steps (rounded up); exclusive with "
                                "warmup_steps.")

    @model_validator(mode="after")
    def _one_warmup(self) -> WarmupOptions:
        if self.warmup_steps and self.warmup_ratio:
            raise ValueError("give warmup_steps or warmup_ratio, not both")
        return self

    def warmup_for(self, total_steps: int) -> int:
        if self.warmup_ratio:
            return math.ceil(self.warmup_ratio * total_steps)
        return self.warmup_steps


class DecayOptions(WarmupOptions):
    min_lr_ratio: float = Field(0.0, ge=0.0, le=1.0, description="The rate decays to this "
                                "fraction of optimizer.lr instead of 0.")


class RestartOptions(DecayOptions):
    cycles: int = Field(1, ge=1, le=1000, description="Number of cosine cycles; each "
                        "restarts at the full rate.")


class PolynomialOptions(DecayOptions):
    power: float = Field(1.0, gt=0.0, description="Exponent of the decay (1 is linear).")


def multiplier(decay: Multiplier, warmup: int, total: int, floor: float = 0.0
               ) -> Callable[[int], float]:
    """The LR multiplier at a 0-based step: warmup, then ``decay(progress)`` lifted onto
    ``[floor, 1]``."""
    span = max(total - warmup, 1)

    def at(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min((step - warmup) / span, 1.0)
        return floor + (1.0 - floor) * decay(progress)

    return at


def _constant(p: float) -> float:
    return 1.0


def _linear(p: float) -> float:
    return 1.0 - p


def _cosine(p: float) -> float:
    return 0.5 * (1.0 + math.cos(math.pi * p))


def _restarts(cycles: int) -> Multiplier:
    def decay(p: float) -> float:
        if p >= 1.0:
            return 0.0
        return 0.5 * (1.0 + math.cos(math.pi * ((cycles * p) % 1.0)))

    return decay


def _polynomial(power: float) -> Multiplier:
    return lambda p: (1.0 - p) ** power


def _fixed(decay: Multiplier) -> Callable[[WarmupOptions], Multiplier]:
    """A decay that does not depend on the options."""
    return lambda o: decay


def _restarts_of(o: RestartOptions) -> Multiplier:
    return _restarts(o.cycles)


def _polynomial_of(o: PolynomialOptions) -> Multiplier:
    return _polynomial(o.power)


Options = TypeVar("Options", bound=WarmupOptions)


def _scheduler(make_decay: Callable[[Options], Multiplier]
               ) -> Callable[[torch.optim.Optimizer, int, Options],
                             torch.optim.lr_scheduler.LRScheduler]:
    def factory(optimizer: torch.optim.Optimizer, total: int, o: Options
                ) -> torch.optim.lr_scheduler.LRScheduler:
        floor = o.min_lr_ratio if isinstance(o, DecayOptions) else 0.0
        at = multiplier(make_decay(o), o.warmup_for(total), total, floor)
        return torch.optim.lr_scheduler.LambdaLR(optimizer, at)

    return factory


@hookimpl
def loraengine_lr_schedulers() -> list[LRSchedulerSpec]:
    return [
        LRSchedulerSpec("constant", _scheduler(_fixed(_constant)), WarmupOptions,
                        "The rate never changes (the node's), after an optional warmup."),
        LRSchedulerSpec("linear", _scheduler(_fixed(_linear)), DecayOptions,
                        "Linear decay to min_lr_ratio."),
        LRSchedulerSpec("cosine", _scheduler(_fixed(_cosine)), DecayOptions,
                        "Half-cosine decay to min_lr_ratio."),
        LRSchedulerSpec("cosine_with_restarts", _scheduler(_restarts_of), RestartOptions,
                        "Cosine decay restarted `cycles` times."),
        LRSchedulerSpec("polynomial", _scheduler(_polynomial_of), PolynomialOptions,
                        "Decay by (1 - progress)^power."),
    ]
