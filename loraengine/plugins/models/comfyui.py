"""The ``comfyui`` family: ComfyUI's own diffusion model (a ``comfy.model_base.BaseModel``,
what a ComfyUI ``MODEL`` holds as ``patcher.model``), trained in memory through
ComfyUI's model call.

Nothing here imports ComfyUI: the model object is duck-typed. It needs

- ``diffusion_model``: the network adapters go on (its module paths are ComfyUI's own,
  ``input_blocks.1.1.proj_in`` for a UNet, so the ``comfyui`` exporter writes
  ``diffusion_model.<path>`` as ComfyUI's trainer does);
- ``model_sampling``: ComfyUI's sampling object (``sigmas``, ``noise_scaling``,
  ``calculate_denoised``; ``shift``/``multiplier`` for flow models);
- ``apply_model(x, sigma, c_crossattn=..., **extra)``: ComfyUI's model call, which
  scales the input, runs the network and returns the denoised latent.

The engine's noise schedule is read from ``model_sampling``: for a discrete schedule
ᾱ = 1 / (1 + σ²) per timestep, with the prediction type told by ComfyUI's own
``calculate_denoised``; a flow model keeps σ ∈ (0, 1] with ComfyUI's shift. Each
prediction is made by ComfyUI's call on ComfyUI's noisy input (``x0 + σ·n`` for a
discrete schedule, which is the engine's ``x_t`` times √(1 + σ²)) and turned back into
the model's native output by inverting ``calculate_denoised`` (it is affine in the
output), so the losses, targets and weightings of the engine apply unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from loraengine.core.errors import ConfigError
from loraengine.core.model import LoadedModel, checked_prediction, top_level_blocks
from loraengine.core.plugins.specs import ModelFamilySpec, NoOptions
from loraengine.core.schedule import NoiseSchedule

#: what the engine's data calls the cross-attention conditioning; ComfyUI's keyword
CROSS_ATTN = ("cond", "c_crossattn")


def _affine(fn: Any, sigma: torch.Tensor, shape: tuple[int, ...]
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) with fn(σ, u, v) = A·u + B·v per sample, ``fn`` being one of ComfyUI's
    affine sampling maps (probed on ones and zeros, shaped ``[N, 1, ...]``)."""
    ones, zeros = torch.ones(shape), torch.zeros(shape)
    a = fn(sigma, ones, zeros)
    b = fn(sigma, zeros, ones)
    return a, b


def _sampling_kind(ms: Any) -> str:
    """``epsilon``, ``v_prediction`` or ``flow``, told by ComfyUI's own maps."""
    sigma = torch.tensor([0.5])
    shape = (1, 1, 1, 1)
    # noise_scaling(σ, noise, latent) = c_n·noise + c_x·latent
    c_n, c_x = _affine(lambda s, n, x: ms.noise_scaling(s, n.clone(), x), sigma, shape)
    # calculate_denoised(σ, output, input) = c_o·output + c_i·input
    c_o, c_i = _affine(ms.calculate_denoised, sigma, shape)
    n_, x_, o_, i_ = (float(v.reshape(-1)[0]) for v in (c_n, c_x, c_o, c_i))
    s = 0.5

    def near(u: float, v: float) -> bool:
        return abs(u - v) < 1e-6

    if near(n_, s) and near(x_, 1.0):  # x0 + σ·n (variance exploding form)
        if near(o_, -s) and near(i_, 1.0):
            return "epsilon"
        if near(o_, -s / (1 + s * s) ** 0.5) and near(i_, 1 / (1 + s * s)):
            return "v_prediction"
    if near(n_, s) and near(x_, 1.0 - s) and near(o_, -s) and near(i_, 1.0):
        return "flow"
    raise ConfigError(f"model: ComfyUI's model sampling {type(ms).__name__} is none of "
                      f"eps, v-prediction or flow (CONST); the comfyui family cannot "
                      f"train it")


def schedule_of(ms: Any) -> NoiseSchedule:
    """The engine's noise schedule for ComfyUI's ``model_sampling``."""
    kind = _sampling_kind(ms)
    if kind == "flow":
        return NoiseSchedule.flow(float(getattr(ms, "shift", 1.0)),
                                  timestep_scale=float(getattr(ms, "multiplier", 1000.0)))
    sigmas = getattr(ms, "sigmas", None)
    if not isinstance(sigmas, torch.Tensor) or sigmas.ndim != 1:
        raise ConfigError(f"model: ComfyUI's model sampling {type(ms).__name__} has no "
                          f"discrete sigmas; the comfyui family trains discrete schedules")
    sigmas = sigmas.detach().double().cpu()
    return NoiseSchedule(kind, alphas_cumprod=1.0 / (1.0 + sigmas * sigmas))  # type: ignore[arg-type]


class ComfyCall:
    """``predict`` for a ComfyUI model: the engine's ``(x_t, t)`` in, ComfyUI's
    ``apply_model`` on its own noisy input, the native prediction out."""

    def __init__(self, base: Any, schedule: NoiseSchedule):
        self.base, self.schedule = base, schedule
        self.ms = base.model_sampling

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        if self.schedule.is_flow:
            return t.float() / self.schedule.timestep_scale
        return self.ms.sigmas.to(t.device)[t.long()].float()

    def __call__(self, module: nn.Module, x_t: torch.Tensor, t: torch.Tensor,
                 cond: Mapping[str, torch.Tensor]) -> torch.Tensor:
        sigma = self.sigma(t).to(x_t.device)
        per = sigma.reshape(-1, *([1] * (x_t.ndim - 1)))
        # ComfyUI's noisy latent: x0 + σ·n = x_t·√(1+σ²) (discrete), x_t itself (flow)
        x = x_t if self.schedule.is_flow else x_t * (1.0 + per.to(x_t.dtype) ** 2).sqrt()
        kwargs: dict[str, Any] = {}
        for key, value in cond.items():
            kwargs["c_crossattn" if key in CROSS_ATTN else key] = value
        net = self.base.diffusion_model
        # ComfyUI casts the input to the network's recorded dtype: keep it the dtype the
        # engine put the weights in for this run
        param = next(net.parameters(), None)
        had = getattr(net, "dtype", None)
        if param is not None and had is not None and had != param.dtype:
            net.dtype = param.dtype
        try:
            denoised = checked_prediction(self.base.apply_model(x, sigma, **kwargs), x,
                                          "the ComfyUI model's apply_model").float()
        finally:
            if had is not None:
                net.dtype = had
        # calculate_denoised(σ, out, x) = c_o·out + c_i·x  ->  out = (d − c_i·x) / c_o
        shape = (x.shape[0], *([1] * (x.ndim - 1)))
        c_o, c_i = _affine(lambda s, o, i: self.ms.calculate_denoised(s, o, i),
                           sigma.float().cpu(), shape)
        c_o, c_i = c_o.to(x.device), c_i.to(x.device)
        return (denoised - c_i * x.float()) / c_o


def load(options: NoOptions, context: Mapping[str, Any]) -> LoadedModel:
    base = context.get("module")
    if base is None:
        raise ConfigError("model.family: 'comfyui' needs ComfyUI's model passed as "
                          "loraengine.train(config, model=patcher.model)")
    missing = [a for a in ("diffusion_model", "model_sampling", "apply_model")
               if not hasattr(base, a)]
    if missing or not isinstance(base, nn.Module):
        raise ConfigError(f"model: expected ComfyUI's model (comfy.model_base.BaseModel, "
                          f"a MODEL's .model), got {type(base).__name__} without "
                          f"{', '.join(missing) or 'nn.Module'}")
    schedule = schedule_of(base.model_sampling)
    net = base.diffusion_model
    if not isinstance(net, nn.Module):
        raise ConfigError(f"model: ComfyUI's model has a diffusion_model that is a "
                          f"{type(net).__name__}, not an nn.Module")
    return LoadedModel(module=net, predict=ComfyCall(base, schedule), schedule=schedule,
                       blocks=top_level_blocks(net), family="comfyui",
                       default_exporter="comfyui", latent_ndim=None)


SPEC = ModelFamilySpec("comfyui", load, NoOptions,
                       "ComfyUI's own diffusion model in memory (a MODEL's .model), "
                       "called through ComfyUI's apply_model and model sampling; for "
                       "the ComfyUI node pack (integrations/comfyui).")
