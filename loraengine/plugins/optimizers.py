"""Built-in optimizers: the four of the node, with their real options."""

from __future__ import annotations

from pydantic import Field

from loraengine.core.hookspecs import hookimpl
from loraengine.core.specs import OptimizerSpec, PluginOptions

import torch


class AdamWOptions(PluginOptions):
    betas: tuple[float, float] = Field((0.9, 0.999), description="Moment decay rates.")
    eps: float = Field(1e-8, gt=0, description="Denominator term.")
    weight_decay: float = Field(0.01, ge=0, description="Decoupled weight decay.")
    amsgrad: bool = False


class AdamOptions(PluginOptions):
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(1e-8, gt=0)
    weight_decay: float = Field(0.0, ge=0, description="L2 penalty.")
    amsgrad: bool = False


class SGDOptions(PluginOptions):
    momentum: float = Field(0.0, ge=0)
    dampening: float = Field(0.0, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    nesterov: bool = False


class RMSpropOptions(PluginOptions):
    alpha: float = Field(0.99, gt=0, lt=1, description="Smoothing constant.")
    eps: float = Field(1e-8, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    momentum: float = Field(0.0, ge=0)
    centered: bool = False


def _options(o: PluginOptions, model: type[PluginOptions]) -> dict:
    return {k: getattr(o, k) for k in model.model_fields}


@hookimpl
def loraengine_optimizers():
    return [
        OptimizerSpec("adamw", lambda p, lr, o: torch.optim.AdamW(
            p, lr=lr, **_options(o, AdamWOptions)), AdamWOptions, "AdamW (decoupled decay)."),
        OptimizerSpec("adam", lambda p, lr, o: torch.optim.Adam(
            p, lr=lr, **_options(o, AdamOptions)), AdamOptions, "Adam."),
        OptimizerSpec("sgd", lambda p, lr, o: torch.optim.SGD(
            p, lr=lr, **_options(o, SGDOptions)), SGDOptions, "SGD with optional momentum."),
        OptimizerSpec("rmsprop", lambda p, lr, o: torch.optim.RMSprop(
            p, lr=lr, **_options(o, RMSpropOptions)), RMSpropOptions, "RMSprop."),
    ]
