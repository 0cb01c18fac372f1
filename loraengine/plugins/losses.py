"""Built-in losses: elementwise, reduced by the engine."""

from __future__ import annotations

import torch.nn.functional as F
from pydantic import Field

from loraengine.core.hookspecs import hookimpl
from loraengine.core.specs import LossSpec, NoOptions, PluginOptions


class HuberOptions(PluginOptions):
    delta: float = Field(1.0, gt=0, description="Where the loss turns from quadratic to linear.")


class SmoothL1Options(PluginOptions):
    beta: float = Field(1.0, gt=0, description="Width of the quadratic region.")


@hookimpl
def loraengine_losses():
    return [
        LossSpec("mse", lambda o: lambda p, t: F.mse_loss(p, t, reduction="none"), NoOptions,
                 "Mean squared error."),
        LossSpec("l1", lambda o: lambda p, t: F.l1_loss(p, t, reduction="none"), NoOptions,
                 "Mean absolute error."),
        LossSpec("huber", lambda o: lambda p, t: F.huber_loss(
            p, t, reduction="none", delta=o.delta), HuberOptions, "Huber loss."),
        LossSpec("smooth_l1", lambda o: lambda p, t: F.smooth_l1_loss(
            p, t, reduction="none", beta=o.beta), SmoothL1Options, "Smooth L1 loss."),
    ]
