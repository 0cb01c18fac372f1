"""Built-in optimizers: the node's four, torch's Adafactor, Lion, and three that need an
optional package (prodigy, schedule_free_adamw, adamw8bit).

An optimizer whose package is missing is a config error naming the extra that installs
it (``pip install 'loraengine[prodigy]'``), raised when the config is validated, so
``loraengine validate`` already says so.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable, Iterable
from types import ModuleType
from typing import Any, ClassVar, overload

import torch
from pydantic import Field, model_validator
from pydantic_core import PydanticCustomError

from loraengine.core.errors import ConfigError
from loraengine.core.plugins.hookspecs import hookimpl
from loraengine.core.plugins.specs import OptimizerSpec, PluginOptions

Params = Iterable[torch.nn.Parameter]


# The options several optimizers share are declared once here, with their type, default
# and range; an optimizer states only what is its own (a different default, what the
# option means there).

def betas_option(default: tuple[float, float] = (0.9, 0.999), description: str | None = None
          ) -> tuple[float, float]:
    """The ``betas`` option: decay rates of the moment estimates."""
    rates: tuple[float, float] = Field(default=default, description=description)
    return rates


def eps_option(description: str | None = None) -> float:
    """The ``eps`` option: the term that keeps a denominator away from zero."""
    term: float = Field(default=1e-8, gt=0, description=description)
    return term


def weight_decay_option(default: float = 0.0, description: str | None = None) -> float:
    """The ``weight_decay`` option: its range is the same everywhere, while its default
    and what it means (decoupled decay or an L2 penalty) are each optimizer's own."""
    decay: float = Field(default=default, ge=0, description=description)
    return decay


class AdamFamilyOptions(PluginOptions):
    """What every Adam-style optimizer takes: moment decay rates, denominator term and
    weight decay."""

    betas: tuple[float, float] = betas_option()
    eps: float = eps_option()
    weight_decay: float = weight_decay_option()


class AdamWOptions(AdamFamilyOptions):
    betas: tuple[float, float] = betas_option(description="Moment decay rates.")
    eps: float = eps_option("Denominator term.")
    weight_decay: float = weight_decay_option(0.01, "Decoupled weight decay.")
    amsgrad: bool = False


class AdamOptions(AdamFamilyOptions):
    weight_decay: float = weight_decay_option(0.0, "L2 penalty.")
    amsgrad: bool = False


class SGDOptions(PluginOptions):
    momentum: float = Field(0.0, ge=0)
    dampening: float = Field(0.0, ge=0)
    weight_decay: float = weight_decay_option()
    nesterov: bool = False


class RMSpropOptions(PluginOptions):
    alpha: float = Field(0.99, gt=0, lt=1, description="Smoothing constant.")
    eps: float = eps_option()
    weight_decay: float = weight_decay_option()
    momentum: float = Field(0.0, ge=0)
    centered: bool = False


class AdafactorOptions(PluginOptions):
    beta2_decay: float = Field(-0.8, le=0, description="Decay rate of the second moment: "
                               "beta2 at step k is 1 - k^beta2_decay.")
    eps: tuple[float | None, float] = Field((None, 1e-3), description="Term added to the "
                                            "second moment (None: the dtype's eps) and "
                                            "floor of the parameter RMS scale.")
    d: float = Field(1.0, gt=0, description="Clipping threshold of the update RMS.")
    weight_decay: float = weight_decay_option(0.0, "Decoupled weight decay.")


class LionOptions(PluginOptions):
    betas: tuple[float, float] = betas_option((0.9, 0.99), "Interpolation rate of the "
                                              "update sign and decay rate of the momentum.")
    weight_decay: float = weight_decay_option(0.0, "Decoupled weight decay (scaled by "
                                              "the learning rate).")


# -- optional packages ------------------------------------------------------------------

def missing_extra(optimizer: str, module: str, extra: str) -> str:
    return (f"optimizer {optimizer!r} needs the {module!r} package, which is not installed;"
            f" install it with: pip install 'loraengine[{extra}]'")


def require(optimizer: str, module: str, extra: str) -> ModuleType:
    """Import an optional package or raise a ``ConfigError`` naming its extra."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ConfigError(f"optimizer.name: {missing_extra(optimizer, module, extra)}"
                          ) from None


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


class NeedsPackage(PluginOptions):
    """Options of an optimizer from an optional package: validation fails when the
    package is missing, so the error comes with the config's other problems."""

    #: (optimizer name, module to import, extra that installs it)
    package: ClassVar[tuple[str, str, str]] = ("", "", "")

    @model_validator(mode="after")
    def _package_installed(self) -> NeedsPackage:
        optimizer, module, extra = self.package
        if not _installed(module):
            raise PydanticCustomError("missing_extra", missing_extra(optimizer, module, extra))
        return self


class ProdigyOptions(NeedsPackage):
    package = ("prodigy", "prodigyopt", "prodigy")
    betas: tuple[float, float] = betas_option()
    beta3: float | None = Field(None, gt=0, lt=1, description="Decay of the step-size "
                                "estimate's statistics (default: sqrt(beta2)).")
    eps: float = eps_option()
    weight_decay: float = weight_decay_option()
    decouple: bool = Field(True, description="AdamW-style decoupled weight decay.")
    use_bias_correction: bool = False
    safeguard_warmup: bool = Field(False, description="Leave the LR out of the step-size "
                                   "estimate during warmup.")
    d0: float = Field(1e-6, gt=0, description="Initial step-size estimate.")
    d_coef: float = Field(1.0, gt=0, description="Multiplier of the estimated step size.")
    growth_rate: float = Field(float("inf"), gt=1, description="Cap on how fast the "
                               "estimate may grow per step.")


class ScheduleFreeOptions(AdamFamilyOptions, NeedsPackage):
    package = ("schedule_free_adamw", "schedulefree", "schedulefree")
    warmup_steps: int = Field(0, ge=0, description="The optimizer's own LR warmup (use it "
                              "instead of an lr_scheduler).")
    r: float = Field(0.0, ge=0, description="Polynomial weighting of the average.")
    weight_lr_power: float = Field(2.0, ge=0, description="How much the LR weighs each "
                                   "iterate in the average.")


class AdamW8bitOptions(AdamFamilyOptions, NeedsPackage):
    package = ("adamw8bit", "bitsandbytes", "bitsandbytes")
    weight_decay: float = weight_decay_option(0.01)
    min_8bit_size: int = Field(4096, ge=1, description="Tensors with fewer elements keep "
                               "32-bit states.")

    @model_validator(mode="before")
    @classmethod
    def _cuda_present(cls, data: Any) -> Any:
        # Checked before the package: without a GPU, installing it would not help.
        if not torch.cuda.is_available():
            raise PydanticCustomError(
                "needs_cuda", "optimizer 'adamw8bit' (bitsandbytes) keeps its 8-bit states "
                "on a CUDA GPU, and this machine has none; use adamw, adafactor or lion")
        return data


def _options(o: PluginOptions, model: type[PluginOptions]) -> dict[str, Any]:
    return {k: getattr(o, k) for k in model.model_fields}


#: Device types with torch's fused optimizer kernels (``fused=True``); not ``meta``,
#: where ``loraengine plan`` builds the optimizer and steps it without values.
FUSED_DEVICES = frozenset({"cpu", "cuda", "xpu", "mps", "hpu"})


def fused_kernel(params: list[torch.nn.Parameter]) -> dict[str, bool]:
    """``{"fused": True}`` when every parameter is a floating-point tensor on a device
    with a fused kernel, else ``{}`` (torch's default). Left alone, torch takes its
    per-parameter loop on the CPU: a dozen small ops per tensor, 4–13 ms per step for
    the 120–400 adapter tensors of ``benchmarks/run.py``'s workloads, where the fused
    kernel takes 0.6–2.7 ms. The two agree to float rounding (an ulp or so per step),
    keep the same state layout (a checkpoint of one resumes in the other) and both
    honour a ``GradScaler``."""
    ok = bool(params) and all(p.is_floating_point() and p.device.type in FUSED_DEVICES
                              for p in params)
    return {"fused": True} if ok else {}


def _fusable(make: Callable[..., torch.optim.Optimizer], model: type[PluginOptions]
             ) -> Callable[[Params, float, Any], torch.optim.Optimizer]:
    """A factory for the torch optimizer ``make`` that takes the fused kernel where
    ``fused_kernel`` allows it."""
    def factory(params: Params, lr: float, o: Any) -> torch.optim.Optimizer:
        params = list(params)
        return make(params, lr=lr, **_options(o, model), **fused_kernel(params))

    return factory


# -- Lion -------------------------------------------------------------------------------

class Lion(torch.optim.Optimizer):
    """Lion (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms"):

        c = β1·m + (1 − β1)·g;   θ ← θ·(1 − lr·λ) − lr·sign(c);   m ← β2·m + (1 − β2)·g

    One momentum buffer per parameter; the update has the same size in every
    coordinate, so it wants a learning rate 3–10× below AdamW's.
    """

    def __init__(self, params: Params, lr: float = 1e-4, betas: tuple[float, float] =
                 (0.9, 0.99), weight_decay: float = 0.0):
        if not 0.0 <= betas[0] < 1.0 or not 0.0 <= betas[1] < 1.0:
            raise ValueError(f"Lion betas must be in [0, 1), got {betas}")
        super().__init__(params, {"lr": lr, "betas": betas, "weight_decay": weight_decay})

    @overload
    def step(self, closure: None = None) -> None: ...
    @overload
    def step(self, closure: Callable[[], float]) -> float: ...

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, (beta1, beta2), wd = group["lr"], group["betas"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["exp_avg"] = torch.zeros_like(p)
                m = state["exp_avg"]
                g = p.grad
                update = (m * beta1).add_(g, alpha=1.0 - beta1).sign_()
                if wd:
                    p.mul_(1.0 - lr * wd)
                p.add_(update, alpha=-lr)
                m.mul_(beta2).add_(g, alpha=1.0 - beta2)
        return loss


# -- factories --------------------------------------------------------------------------

def make_prodigy(params: Params, lr: float, o: ProdigyOptions) -> torch.optim.Optimizer:
    prodigyopt = require("prodigy", "prodigyopt", "prodigy")
    return prodigyopt.Prodigy(params, lr=lr, **_options(o, ProdigyOptions))


def make_schedule_free(params: Params, lr: float, o: ScheduleFreeOptions
                       ) -> torch.optim.Optimizer:
    """Schedule-free AdamW keeps two points: gradients are taken at ``y`` (train mode),
    the average ``x`` is what to save (eval mode). The trainer calls ``train()`` before
    each step and ``eval()`` before writing the adapter; it starts in train mode."""
    schedulefree = require("schedule_free_adamw", "schedulefree", "schedulefree")
    opt = schedulefree.AdamWScheduleFree(params, lr=lr, **_options(o, ScheduleFreeOptions))
    opt.train()
    return opt


def make_adamw8bit(params: Params, lr: float, o: AdamW8bitOptions) -> torch.optim.Optimizer:
    params = list(params)
    off_gpu = sorted({p.device.type for p in params if p.device.type != "cuda"})
    if off_gpu:
        raise ConfigError(f"optimizer.name: 'adamw8bit' (bitsandbytes) needs the adapter on "
                          f"a CUDA device, but it is on {', '.join(off_gpu)}; set "
                          f"training.device to cuda or pick another optimizer")
    bnb = require("adamw8bit", "bitsandbytes", "bitsandbytes")
    return bnb.optim.AdamW8bit(params, lr=lr, **_options(o, AdamW8bitOptions))


@hookimpl
def loraengine_optimizers() -> list[OptimizerSpec]:
    return [
        OptimizerSpec("adamw", _fusable(torch.optim.AdamW, AdamWOptions), AdamWOptions,
                      "AdamW (decoupled decay)."),
        OptimizerSpec("adam", _fusable(torch.optim.Adam, AdamOptions), AdamOptions, "Adam."),
        OptimizerSpec("sgd", _fusable(torch.optim.SGD, SGDOptions), SGDOptions,
                      "SGD with optional momentum."),
        OptimizerSpec("rmsprop", lambda p, lr, o: torch.optim.RMSprop(
            p, lr=lr, **_options(o, RMSpropOptions)), RMSpropOptions, "RMSprop."),
        OptimizerSpec("adafactor", lambda p, lr, o: torch.optim.Adafactor(
            p, lr=lr, **_options(o, AdafactorOptions)), AdafactorOptions,
            "Adafactor (torch): factored second moments, little optimizer memory."),
        OptimizerSpec("lion", lambda p, lr, o: Lion(p, lr=lr, **_options(o, LionOptions)),
                      LionOptions, "Lion: sign of an interpolated momentum."),
        OptimizerSpec("prodigy", make_prodigy, ProdigyOptions,
                      "Prodigy (prodigyopt): estimates its own step size; lr is a "
                      "multiplier, usually 1.0."),
        OptimizerSpec("schedule_free_adamw", make_schedule_free, ScheduleFreeOptions,
                      "Schedule-free AdamW (schedulefree): no LR schedule needed."),
        OptimizerSpec("adamw8bit", make_adamw8bit, AdamW8bitOptions,
                      "AdamW with 8-bit states (bitsandbytes, CUDA only)."),
    ]
