"""AdaBelief (Zhuang et al. 2020, "AdaBelief Optimizer: Adapting Stepsizes by the Belief
in Observed Gradients"): Adam whose second moment tracks how far each gradient strays
from its running mean, ``(g − m)²``, instead of ``g²``. Steps are large where the
gradient is predictable and small where it is noisy.

Per parameter, with step count k::

    m ← β1·m + (1 − β1)·g
    s ← β2·s + (1 − β2)·(g − m)² + ε
    θ ← θ·(1 − lr·λ) − lr · (m / (1 − β1ᵏ)) / (√(s / (1 − β2ᵏ)) + ε)

Weight decay λ is decoupled (AdamW style). All state lives in ``self.state``, so a
checkpoint restores it exactly.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from pydantic import Field

from loraengine import OptimizerSpec, PluginOptions

__all__ = ["AdaBelief", "AdaBeliefOptions", "SPEC"]


class AdaBeliefOptions(PluginOptions):
    betas: tuple[float, float] = Field((0.9, 0.999), description="Decay rates of the "
                                       "gradient mean and of the belief (its variance).")
    eps: float = Field(1e-16, gt=0, description="Added to the belief each step and to "
                       "the denominator.")
    weight_decay: float = Field(0.0, ge=0, description="Decoupled weight decay.")


class AdaBelief(torch.optim.Optimizer):
    """The update above, for any parameters."""

    def __init__(self, params: Iterable[torch.nn.Parameter], lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-16,
                 weight_decay: float = 0.0):
        if not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"AdaBelief betas must be in [0, 1), got {betas}")
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "eps": eps,
                                  "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_belief"] = torch.zeros_like(p)
                state["step"] += 1
                k = state["step"]
                m, s = state["exp_avg"], state["exp_belief"]
                m.mul_(beta1).add_(g, alpha=1.0 - beta1)
                diff = g - m
                s.mul_(beta2).addcmul_(diff, diff, value=1.0 - beta2).add_(eps)
                if wd:
                    p.mul_(1.0 - lr * wd)
                denom = (s / (1.0 - beta2**k)).sqrt_().add_(eps)
                p.addcdiv_(m, denom, value=-lr / (1.0 - beta1**k))
        return loss


def make(params: Iterable[torch.nn.Parameter], lr: float, o: Any) -> AdaBelief:
    return AdaBelief(params, lr=lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay)


SPEC = OptimizerSpec("adabelief", make, AdaBeliefOptions,
                     "AdaBelief: Adam with the variance of the gradient around its mean.")

