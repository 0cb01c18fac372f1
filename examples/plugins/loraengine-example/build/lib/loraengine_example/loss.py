"""The log-cosh loss: ``δ²·log(cosh(d/δ))`` of the prediction error ``d``, elementwise.

About ``d²/2`` for errors well below ``δ`` and ``δ·|d| − δ²·log 2`` well above it: a
smooth Huber loss with a gradient that never jumps. ``log(cosh(u))`` is computed as
``|u| + log1p(exp(−2|u|)) − log 2``, which neither overflows for large ``u`` nor
loses small ones.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field

from loraengine import LossSpec, PluginOptions

__all__ = ["LogCoshOptions", "SPEC", "log_cosh"]


class LogCoshOptions(PluginOptions):
    delta: float = Field(1.0, gt=0, description="Scale of the error where the loss turns "
                         "from quadratic to linear.")


def log_cosh(pred: torch.Tensor, target: torch.Tensor, delta: float = 1.0) -> torch.Tensor:
    u = (pred - target) / delta
    a = u.abs()
    # log1p(exp(-2a)) == softplus(-2a): the stable form.
    return (a + F.softplus(-2.0 * a) - math.log(2.0)) * (delta * delta)


def make(o: Any) -> Any:
    return lambda pred, target: log_cosh(pred, target, o.delta)


SPEC = LossSpec("log_cosh", make, LogCoshOptions,
                "log(cosh) of the error: quadratic when small, linear when large.")
