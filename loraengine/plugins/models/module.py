"""The ``module`` family: any ``nn.Module`` called as ``model(x_t, t, cond)``, for the
programmatic API (``loraengine.train(config, model=...)``)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import torch
from pydantic import Field
from torch import nn

from loraengine.core.errors import ConfigError
from loraengine.core.model import LoadedModel, top_level_blocks
from loraengine.core.plugins.specs import ModelFamilySpec, PluginOptions
from loraengine.core.schedule import NoiseSchedule


class ScheduleOptions(PluginOptions):
    prediction_type: Literal["epsilon", "v_prediction", "flow"] = Field(
        "epsilon", description="What the model predicts.")
    num_train_timesteps: int = Field(1000, ge=1)
    beta_start: float = Field(0.00085, gt=0)
    beta_end: float = Field(0.012, gt=0)
    beta_schedule: Literal["scaled_linear", "linear"] = "scaled_linear"
    flow_shift: float = Field(1.0, gt=0, description="Timestep shift for flow models: "
                              "the one shift, used by training timesteps and sampling.")

    def schedule(self, prediction_type: str | None = None) -> NoiseSchedule:
        kind = prediction_type or self.prediction_type
        if kind == "flow":
            return NoiseSchedule.flow(self.flow_shift)
        return NoiseSchedule.ddpm(kind, self.num_train_timesteps,  # type: ignore[arg-type]
                                  self.beta_start, self.beta_end, self.beta_schedule)


def _predict(module: nn.Module, x_t: torch.Tensor, t: torch.Tensor,
             cond: Mapping[str, torch.Tensor]) -> torch.Tensor:
    arg: Any = cond["cond"] if set(cond) == {"cond"} else dict(cond)
    out = module(x_t, t, arg)
    return out.sample if hasattr(out, "sample") else out


def load(options: ScheduleOptions, context: Mapping[str, Any]) -> LoadedModel:
    module = context.get("module")
    if module is None:
        raise ConfigError("model.family: 'module' needs an nn.Module passed as "
                          "loraengine.train(config, model=...)")
    if not isinstance(module, nn.Module):
        raise ConfigError(f"model: expected a torch.nn.Module, got {type(module).__name__}")
    return LoadedModel(module=module, predict=_predict, schedule=options.schedule(),
                       blocks=top_level_blocks(module), family="module")


SPEC = ModelFamilySpec("module", load, ScheduleOptions,
                       "An in-memory nn.Module called as model(x_t, t, cond).")
