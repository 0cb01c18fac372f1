"""Per-sample loss weights by timestep.

Every weighting here is stated for the ε-prediction (noise) loss as a function of the
signal-to-noise ratio SNR = a²/b² (``x_t = a·x0 + b·ε``), then carried over to the loss
actually taken: a sample's native loss is ``k`` times its ε-equivalent, so its weight is
``w·k`` with ``k = 1`` for ε-prediction, ``k = a²`` for v-prediction and flow
(v: SNR/(SNR + 1)), and ``k = SNR`` when ``loss.target`` is x0.

- ``none``: w = 1 (the default; unchanged behaviour).
- ``min_snr``: w = min(SNR, γ)/SNR (Hang et al. 2023, "Min-SNR weighting strategy"):
  on a v-prediction loss this is min(SNR, γ)/(SNR + 1), on an x0 loss min(SNR, γ).
- ``debiased``: w = 1/√min(SNR, max_snr) ("debiased estimation", Yu et al. 2024).
- ``noise_pred_scale``: w = 1 on the ε-equivalent: a v-prediction loss is scaled by
  SNR/(SNR + 1), like a noise-prediction loss ("scale v-pred loss like noise pred").
- ``v_pred_like``: w = 1 + λ·(S + 1)/S with S = min(SNR, max_snr): adds λ times a
  v-prediction-like loss to an ε-prediction loss.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from pydantic import Field

from loraengine.core.plugins.specs import LossWeightingSpec, NoOptions, PluginOptions
from loraengine.core.schedule import NoiseSchedule

Weights = Callable[[torch.Tensor], torch.Tensor]
EpsWeight = Callable[[torch.Tensor], torch.Tensor]  # SNR (float64) -> ε-loss weight

#: Keeps SNR away from 0 (pure noise in flow models) where a weight divides by it.
SNR_FLOOR = 1e-12


class MinSNROptions(PluginOptions):
    gamma: float = Field(5.0, gt=0, description="SNR above which weights fall (the "
                         "paper recommends 5).")


class CappedSNROptions(PluginOptions):
    max_snr: float = Field(1000.0, gt=0, description="SNR is capped here (the cleanest "
                           "DDPM timestep has SNR ≈ 1175).")


class VPredLikeOptions(CappedSNROptions):
    strength: float = Field(..., gt=0, description="λ: weight of the added "
                            "v-prediction-like loss.")


def to_native(schedule: NoiseSchedule, target: str, t: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """(SNR, k) in float64 for timesteps ``t``: k converts the native loss into its
    ε-prediction equivalent."""
    a, b = schedule.coefficients(t)
    snr = (a * a) / (b * b).clamp_min(1e-20)
    if target == "x0":
        k = snr
    elif schedule.prediction_type == "epsilon":
        k = torch.ones_like(snr)
    else:  # v-prediction and flow: the target's error is 1/b² times the x0 error
        k = a * a
    return snr, k


def weighting(eps_weight: Callable[[PluginOptions], EpsWeight]
              ) -> Callable[[PluginOptions, NoiseSchedule, str], Weights]:
    def factory(o: PluginOptions, schedule: NoiseSchedule, target: str) -> Weights:
        w_eps = eps_weight(o)

        def weights(t: torch.Tensor) -> torch.Tensor:
            snr, k = to_native(schedule, target, t)
            return (w_eps(snr.clamp_min(SNR_FLOOR)) * k).float()

        return weights

    return factory


def _min_snr(o: MinSNROptions) -> EpsWeight:
    return lambda snr: (o.gamma / snr).clamp(max=1.0)  # = min(SNR, γ)/SNR


def _debiased(o: CappedSNROptions) -> EpsWeight:
    return lambda snr: snr.clamp(max=o.max_snr).rsqrt()


def _v_pred_like(o: VPredLikeOptions) -> EpsWeight:
    def w(snr: torch.Tensor) -> torch.Tensor:
        s = snr.clamp(max=o.max_snr)
        return 1.0 + o.strength * (s + 1.0) / s

    return w


def _ones(t: torch.Tensor) -> torch.Tensor:
    return torch.ones(t.shape[0], device=t.device)


SPECS = [
    LossWeightingSpec("none", lambda o, schedule, target: _ones, NoOptions,
                      "Every sample weighs the same (default)."),
    LossWeightingSpec("min_snr", weighting(_min_snr), MinSNROptions,  # type: ignore[arg-type]
                      "Min-SNR-γ: clamps the weight of low-noise timesteps."),
    LossWeightingSpec("debiased", weighting(_debiased), CappedSNROptions,  # type: ignore[arg-type]
                      "Debiased estimation: weight 1/sqrt(SNR) on the noise loss."),
    LossWeightingSpec("noise_pred_scale", weighting(lambda o: torch.ones_like), NoOptions,
                      "Scale a v-prediction or flow loss like a noise-prediction loss."),
    LossWeightingSpec("v_pred_like", weighting(_v_pred_like),  # type: ignore[arg-type]
                      VPredLikeOptions, "Add strength × a v-prediction-like loss."),
]
