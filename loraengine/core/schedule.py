"""Noise schedules: how a clean latent becomes ``x_t`` and what the model must predict.

Three kinds cover the families: ``epsilon`` and ``v_prediction`` on a discrete DDPM
schedule, and ``flow`` (rectified flow, as SD3 and Flux train).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import torch

from loraengine.core.errors import ConfigError

PredictionType = Literal["epsilon", "v_prediction", "flow"]
#: Draws a restricted timestep sampler makes before it gives up.
_MAX_REJECTIONS = 10_000


def shift_sigma(sigma: torch.Tensor, shift: float) -> torch.Tensor:
    """The flow-matching timestep shift σ' = s·σ / (1 + (s−1)·σ): ``shift`` > 1 moves
    σ toward the noisy end (SD3's 3.0), 1 leaves it unchanged."""
    return shift * sigma / (1 + (shift - 1) * sigma)


def _bcast(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.reshape(-1, *([1] * (like.ndim - 1))).to(device=like.device, dtype=like.dtype)


@dataclass
class NoiseSchedule:
    """A training noise schedule.

    For DDPM kinds ``alphas_cumprod`` holds ᾱ per integer timestep; for ``flow`` the
    "timestep" is σ ∈ (0, 1] and the model sees ``σ · timestep_scale``.
    """

    prediction_type: PredictionType
    alphas_cumprod: torch.Tensor | None = None
    shift: float = 1.0
    timestep_scale: float = 1000.0
    sampling: Literal["uniform", "logit_normal"] = "uniform"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    #: The part of the schedule training draws from, ``[low, high)`` in the units
    #: ``sample_timestep`` returns (flow: σ after the shift; DDPM: the step index);
    #: ``None`` is all of it. A model expert that serves only part of the noise levels
    #: (Wan 2.2's high- and low-noise experts) sets it.
    timestep_range: tuple[float, float] | None = None
    #: The shift for a latent of this shape (one sample, ``(C, ...)``), for a model whose
    #: pipeline shifts by resolution: each batch then trains with its own size's shift
    #: and ``shift`` is only the value used where no latent is at hand. ``None``:
    #: ``shift`` for every size.
    shift_by_shape: Callable[[tuple[int, ...]], float] | None = None

    @classmethod
    def ddpm(cls, prediction_type: PredictionType = "epsilon", num_train_timesteps: int = 1000,
             beta_start: float = 0.00085, beta_end: float = 0.012,
             beta_schedule: str = "scaled_linear", rescale_zero_terminal_snr: bool = False
             ) -> NoiseSchedule:
        """The DDPM schedule as diffusers builds it (``scaled_linear`` for SD). With
        ``rescale_zero_terminal_snr`` (diffusers' ``rescale_betas_zero_snr``), √ᾱ is
        shifted and scaled so that the last step is pure noise and the first unchanged."""
        if beta_schedule == "scaled_linear":
            betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps,
                                   dtype=torch.float64) ** 2
        elif beta_schedule == "linear":
            betas = torch.linspace(beta_start, beta_end, num_train_timesteps,
                                   dtype=torch.float64)
        else:
            raise ConfigError(f"model: the scheduler's beta_schedule {beta_schedule!r} is "
                              f"not supported (scaled_linear, linear)")
        alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        if rescale_zero_terminal_snr:
            root = alphas_cumprod.sqrt()
            first, last = root[0].clone(), root[-1].clone()
            root = (root - last) * (first / (first - last))
            alphas_cumprod = root**2
        return cls(prediction_type, alphas_cumprod=alphas_cumprod)

    @classmethod
    def flow(cls, shift: float = 1.0, sampling: str = "uniform", timestep_scale: float =
             1000.0) -> NoiseSchedule:
        return cls("flow", shift=shift, sampling=sampling,  # type: ignore[arg-type]
                   timestep_scale=timestep_scale)

    @property
    def is_flow(self) -> bool:
        return self.prediction_type == "flow"

    @property
    def num_timesteps(self) -> int:
        return 0 if self.alphas_cumprod is None else int(self.alphas_cumprod.shape[0])

    # -- sampling -----------------------------------------------------------------
    def sample_timestep(self, generator: torch.Generator) -> torch.Tensor:
        """One timestep (0-dim tensor) drawn from the schedule's distribution."""
        if not self.is_flow:
            return torch.randint(0, self.num_timesteps, (), generator=generator)
        if self.sampling == "logit_normal":
            z = torch.randn((), generator=generator, dtype=torch.float64)
            sigma = torch.sigmoid(z * self.logit_std + self.logit_mean)
        else:
            sigma = torch.rand((), generator=generator, dtype=torch.float64)
        return self.shift_sigma(sigma)

    def restrict(self, draw: Callable[[torch.Generator], torch.Tensor]
                 ) -> Callable[[torch.Generator], torch.Tensor]:
        """``draw`` conditioned on ``timestep_range``: draws outside it are rejected and
        drawn again, so within the range the distribution keeps its shape."""
        if self.timestep_range is None:
            return draw
        low, high = self.timestep_range
        if not low < high:
            raise ConfigError(f"model: empty timestep range [{low:g}, {high:g})")

        def restricted(generator: torch.Generator) -> torch.Tensor:
            for _ in range(_MAX_REJECTIONS):
                t = draw(generator)
                if low <= float(t) < high or (high >= self.range_end and float(t) == high):
                    return t
            raise ConfigError(f"model: the timestep sampler drew nothing inside "
                              f"[{low:g}, {high:g}) in {_MAX_REJECTIONS} tries; choose "
                              f"a timestep_sampler that covers this expert's range")

        return restricted

    @property
    def range_end(self) -> float:
        """The largest timestep of the schedule (flow: σ = 1)."""
        return 1.0 if self.is_flow else float(self.num_timesteps - 1)

    def shift_sigma(self, sigma: torch.Tensor) -> torch.Tensor:
        """``sigma`` shifted by this schedule's ``shift``."""
        return shift_sigma(sigma, self.shift)

    def shift_for(self, shape: tuple[int, ...] | torch.Size) -> float:
        """The shift of a latent of ``shape`` (one sample, ``(C, ...)``)."""
        if self.shift_by_shape is None:
            return self.shift
        return float(self.shift_by_shape(tuple(int(n) for n in shape)))

    @contextmanager
    def shifted_for(self, shape: tuple[int, ...] | torch.Size) -> Iterator[NoiseSchedule]:
        """Within the block ``shift`` is that of latents of ``shape``, for everything
        holding this schedule (the timestep samplers built on it); restored after."""
        if self.shift_by_shape is None:
            yield self
            return
        saved = self.shift
        self.shift = self.shift_for(shape)
        try:
            yield self
        finally:
            self.shift = saved

    def model_timesteps(self, t: torch.Tensor) -> torch.Tensor:
        """What the denoiser is given as its timestep input."""
        if self.is_flow:
            return (t * self.timestep_scale).float()
        return t.long()

    # -- the forward process ----------------------------------------------------------
    def coefficients(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(a, b) with x_t = a·x0 + b·noise, in float64."""
        if self.is_flow:
            sigma = t.double()
            return 1.0 - sigma, sigma
        assert self.alphas_cumprod is not None
        ac = self.alphas_cumprod.to(t.device)[t.long()]
        return ac.sqrt(), (1.0 - ac).sqrt()

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a, b = self.coefficients(t)
        return _bcast(a, x0) * x0 + _bcast(b, x0) * noise

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The model's native training target."""
        if self.prediction_type == "epsilon":
            return noise
        if self.prediction_type == "flow":
            return noise - x0
        a, b = self.coefficients(t)  # v = sqrt(ᾱ)·ε − sqrt(1−ᾱ)·x0
        return _bcast(a, x0) * noise - _bcast(b, x0) * x0

    def predicted_x0(self, pred: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor
                     ) -> torch.Tensor:
        """The clean latent implied by a model output."""
        a, b = self.coefficients(t)
        a, b = _bcast(a, x_t), _bcast(b, x_t)
        if self.prediction_type == "epsilon":
            return (x_t - b * pred) / a.clamp_min(1e-8)
        if self.prediction_type == "flow":
            return x_t - b * pred  # x_t = x0 + σ(n − x0)
        return a * x_t - b * pred

    def snr(self, t: torch.Tensor) -> torch.Tensor:
        a, b = self.coefficients(t)
        return (a * a) / (b * b).clamp_min(1e-20)

