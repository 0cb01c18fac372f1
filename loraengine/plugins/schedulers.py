"""Built-in learning-rate schedules."""

from __future__ import annotations

import torch

from loraengine.core.hookspecs import hookimpl
from loraengine.core.specs import LRSchedulerSpec, NoOptions


@hookimpl
def loraengine_lr_schedulers():
    return [
        LRSchedulerSpec("constant", lambda opt, total, o: torch.optim.lr_scheduler.LambdaLR(
            opt, lambda step: 1.0), NoOptions, "The learning rate never changes (the node's)."),
    ]
