"""A third-party plugin package used by the tests: one optimizer and one loss,
published through the ``loraengine`` entry-point group."""

from __future__ import annotations

import torch
from pydantic import Field

from loraengine import LossSpec, OptimizerSpec, PluginOptions, hookimpl


class SignSGDOptions(PluginOptions):
    momentum: float = Field(0.0, ge=0, lt=1)


class SignSGD(torch.optim.Optimizer):
    """Steps by the sign of the (momentum-averaged) gradient."""

    def __init__(self, params, lr: float, momentum: float = 0.0):
        super().__init__(params, {"lr": lr, "momentum": momentum})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                buf = self.state[p].setdefault("buf", torch.zeros_like(p))
                buf.mul_(group["momentum"]).add_(p.grad)
                p.add_(buf.sign(), alpha=-group["lr"])


class CharbonnierOptions(PluginOptions):
    eps: float = Field(1e-3, gt=0)


@hookimpl
def loraengine_optimizers():
    return [OptimizerSpec("signsgd", lambda params, lr, o: SignSGD(params, lr, o.momentum),
                          SignSGDOptions)]


@hookimpl
def loraengine_losses():
    return [LossSpec("charbonnier",
                     lambda o: lambda p, t: torch.sqrt((p - t) ** 2 + o.eps**2),
                     CharbonnierOptions)]
