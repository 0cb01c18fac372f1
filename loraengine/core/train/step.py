"""The training step: one micro-batch's loss, and one optimizer step over
``grad_accumulation_steps`` micro-batches.

The trainer and memory planning (``loraengine plan``) both run these functions; a plan
runs them on the ``meta`` device, where tensors have no values: there every loss and
gradient counts as finite. A ``StepProbe`` lets a caller wrap each forward and each
backward pass (to count FLOPs, for instance).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Protocol, TypeVar

import torch

from loraengine.core.build import Pipeline
from loraengine.core.data import BucketStream, Dataset, IndexStream
from loraengine.core.distributed import average_gradients, guarded
from loraengine.core.errors import LoraEngineError
from loraengine.core.model import checked_prediction, forward_failed
from loraengine.core.schedule import NoiseSchedule

_R = TypeVar("_R")


class StepProbe(Protocol):
    """Context managers entered around each micro-batch's forward and backward pass."""

    def forward(self) -> AbstractContextManager[object]: ...

    def backward(self) -> AbstractContextManager[object]: ...


def plugin_call(pipe: Pipeline, category: str, name: str, what: str,
                fn: Callable[..., _R], *args: object, **kwargs: object) -> _R:
    """``fn(*args, **kwargs)``, a call into what plugin ``name`` of ``category`` built:
    an exception it raises becomes the ``PluginFailed`` naming that plugin and ``what``
    was called (running out of memory and the engine's own errors pass as they are).
    Nothing is entered unless it raises: the hot path pays one Python call."""
    try:
        return fn(*args, **kwargs)
    except torch.OutOfMemoryError:
        raise
    except Exception:
        with pipe.host.registry.blame(category, name, what):
            raise


def _recipe_name(pipe: Pipeline, index: int) -> str:
    names = pipe.recipe_names
    return names[index] if index < len(names) else pipe.recipes[index].name


def draw_noise(pipe: Pipeline, x0: torch.Tensor, generator: torch.Generator
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sample draws, so a batch of k·b sees exactly the draws of k batches of b.
    Returns the target's noise, the timesteps and the noise that makes ``x_t`` (the
    two noises differ only when a recipe such as input perturbation says so). The
    timestep sampler's draws are checked against the schedule (``timestep_problem``)
    and a failure names the sampler, or the recipe whose ``perturb_noise`` raised."""
    schedule = pipe.loaded.schedule
    sampler = pipe.timestep_sampler
    draw_t = schedule.restrict(sampler or schedule.sample_timestep)
    noises, ts, xt_noises = [], [], []
    # a model shifting by resolution draws with the shift of this batch's latent size
    with schedule.shifted_for(x0.shape[1:]):
        for _ in range(x0.shape[0]):  # sample by sample: noise, its timestep, tweaks
            noise = torch.randn(x0.shape[1:], generator=generator)
            try:
                t = draw_t(generator)
                if not isinstance(t, torch.Tensor) or t.ndim != 0:
                    raise TypeError(f"it returned {_drawn(t)}; draw(generator) returns "
                                    f"one timestep, a 0-dim tensor")
            except Exception:
                if sampler is None:
                    raise
                with pipe.host.registry.blame("timestep_sampler",
                                              pipe.config.timestep_sampler.name, "draw"):
                    raise
            ts.append(t)
            xt_noise = noise
            for i, recipe in enumerate(pipe.recipes):
                try:
                    xt_noise, noise = recipe.perturb_noise(xt_noise, noise, generator)
                except torch.OutOfMemoryError:
                    raise
                except Exception:
                    with pipe.host.registry.blame("recipe", _recipe_name(pipe, i),
                                                  "perturb_noise"):
                        raise
            noises.append(noise)
            xt_noises.append(xt_noise)
    timesteps = torch.stack(ts)
    if sampler is not None:
        problem = timestep_problem(schedule, timesteps)
        if problem is not None:
            with pipe.host.registry.blame("timestep_sampler",
                                          pipe.config.timestep_sampler.name, "draw"):
                raise ValueError(problem)
    return torch.stack(noises), timesteps, torch.stack(xt_noises)


def _drawn(t: object) -> str:
    if isinstance(t, torch.Tensor):
        return f"a tensor of shape {list(t.shape)}"
    value = f" ({t:g})" if isinstance(t, (int, float)) else ""
    return f"a {type(t).__name__}{value}, not a tensor"


def timestep_problem(schedule: NoiseSchedule, t: torch.Tensor) -> str | None:
    """What is wrong with the timesteps ``t`` (``[B]``, one draw per sample) for
    ``schedule``: values that are not finite or fall outside it (flow: σ in [0, 1];
    DDPM: integer steps 0 to N-1), or fractional values on a DDPM schedule (σ drawn for
    a model that takes steps); ``None`` when nothing is. The draws are host tensors of
    B values: one read and a pass over them."""
    if t.is_meta:
        return None
    end = schedule.range_end
    values = t.tolist()
    bad = next((v for v in values if not 0 <= v <= end), None)  # NaN fails it too
    if bad is not None:
        return f"it drew {bad:g}, outside the schedule: a timestep here is {_units(schedule)}"
    if not schedule.is_flow and t.is_floating_point():
        fraction = next((v for v in values if v != int(v)), None)
        if fraction is not None:
            return (f"it drew {fraction:g}, not an integer step: a timestep here is "
                    f"{_units(schedule)} (a sigma in [0, 1] is for flow models; "
                    f"schedule.is_flow tells them apart)")
    return None


def _units(schedule: NoiseSchedule) -> str:
    if schedule.is_flow:
        return "sigma in [0, 1] for this flow-matching model"
    n = schedule.num_timesteps
    return f"an integer step in [0, {n - 1}] for this {n}-step DDPM schedule"


def micro_step(pipe: Pipeline, indices: torch.Tensor, generator: torch.Generator,
               dataset: Dataset | None = None, part: slice | None = None) -> torch.Tensor:
    """Forward one micro-batch of ``dataset`` (the training data by default) and return
    its (unscaled) mean loss; noise and timesteps come from ``generator``. With
    ``part``, the random draws are made for the whole batch (keeping every rank's
    streams in step) and only those rows are computed."""
    schedule = pipe.loaded.schedule
    data = dataset or pipe.dataset
    x0, cond = data.batch(indices[part] if part is not None else indices)
    x0 = x0.float()
    if part is not None:
        full = torch.empty((len(indices), *x0.shape[1:]))
        noise, t, xt_noise = (v[part] for v in draw_noise(pipe, full, generator))
    else:
        noise, t, xt_noise = draw_noise(pipe, x0, generator)
    x_t = schedule.add_noise(x0, xt_noise, t)
    dev, dt = pipe.device, pipe.compute_dtype
    cond = {k: v.to(dev, dt) if v.is_floating_point() else v.to(dev)
            for k, v in cond.items()}
    model_t = schedule.model_timesteps(t).to(dev)
    try:
        if pipe.denoise is not None:
            raw = pipe.denoise(x_t.to(dev, dt), model_t, cond)
        else:
            raw = pipe.loaded.predict(pipe.model, x_t.to(dev, dt), model_t, cond)
    except (RuntimeError, ValueError, TypeError, IndexError) as exc:
        if isinstance(exc, torch.OutOfMemoryError):
            raise
        raise forward_failed(exc, x_t, cond) from exc
    pred = checked_prediction(raw, x_t).float()
    if torch.is_grad_enabled() and not pred.requires_grad:
        raise LoraEngineError("the model returned a prediction that no gradient reaches the "
                              "adapter through: its forward detaches its output or runs "
                              "under torch.no_grad/inference_mode")
    x0, noise, t, x_t = x0.to(dev), noise.to(dev), t.to(dev), x_t.to(dev)
    if pipe.config.loss.target == "x0":
        pred, target = schedule.predicted_x0(pred, x_t, t), x0
    else:
        target = schedule.target(x0, noise, t)
    per_sample = pipe.per_sample_loss(pred, target.float(), t)
    return (per_sample * pipe.loss_weights(t).to(per_sample)).mean()


def _is_finite(value: torch.Tensor) -> bool:
    # meta tensors carry no values: a dry run takes every step as finite
    return value.device.type == "meta" or bool(torch.isfinite(value))


def _value(loss: torch.Tensor) -> float:
    return 0.0 if loss.device.type == "meta" else float(loss.detach())


@contextmanager
def _no_sync(pipe: Pipeline, last: bool) -> Iterator[None]:
    """Skip DDP's gradient exchange on all but the last micro-batch of a step."""
    denoise = pipe.denoise
    if denoise is None or last or not hasattr(denoise, "no_sync"):
        yield
    else:
        with denoise.no_sync():
            yield


#: The start of torch's warning for a scheduler stepped before any optimizer step.
_SCHEDULER_FIRST = r"Detected call of `lr_scheduler\.step\(\)` before `optimizer\.step\(\)`"


def train_step(pipe: Pipeline, stream: IndexStream | BucketStream,
               generator: torch.Generator, scaler: torch.amp.GradScaler | None = None,
               probe: StepProbe | None = None) -> dict[str, float]:
    """One optimizer step over ``grad_accumulation_steps`` micro-batches drawn from
    ``stream``. Returns its ``loss`` (the mean over micro-batches), ``lr`` and
    ``skipped`` (1.0 when the step was not applied for a non-finite loss or gradient)."""
    tcfg = pipe.config.training
    accum = tcfg.grad_accumulation_steps
    optimizer = pipe.optimizer
    opt_name, sched_name = pipe.config.optimizer.name, pipe.config.lr_scheduler.name
    to_train = getattr(optimizer, "train", None)
    if callable(to_train):  # schedule-free optimizers take gradients at y
        plugin_call(pipe, "optimizer", opt_name, "train", to_train)
    plugin_call(pipe, "optimizer", opt_name, "zero_grad", optimizer.zero_grad,
                set_to_none=True)
    total = 0.0
    finite = True
    dist = pipe.dist
    part = dist.slice_of(tcfg.batch_size) if dist.enabled else None
    for i in range(accum):
        with _no_sync(pipe, last=i == accum - 1):
            with probe.forward() if probe is not None else nullcontext():
                loss = micro_step(pipe, stream.take(tcfg.batch_size), generator, part=part)
            value = _value(loss)
            if not math.isfinite(value):
                finite = False
            total += value / accum
            scaled = loss / accum
            if scaler is not None:
                scaled = scaler.scale(scaled)
            with probe.backward() if probe is not None else nullcontext():
                if dist.enabled:
                    guarded(scaled.backward, "averaging gradients")
                else:
                    scaled.backward()
    params = pipe.trainable_parameters()
    if dist.enabled:
        if pipe.sharded:
            average_gradients(params, dist.world_size)
        total = dist.mean(total)  # nan on any rank makes the mean nan
        finite = math.isfinite(total)
    if scaler is not None:
        scaler.unscale_(optimizer)
    # one fused norm over every gradient: non-finite anywhere makes it non-finite,
    # and clipping reuses it (one device sync per step instead of one per tensor)
    grads = [p.grad for p in params if p.grad is not None]
    total_norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros(())
    grads_ok = _is_finite(total_norm)
    lr = float(optimizer.param_groups[0]["lr"])
    # A non-finite loss, or non-finite gradients without a scaler, is a bad step. With
    # fp16's scaler, overflowing gradients are its normal way of finding the scale:
    # the step is not applied, but it is not counted against the watchdog.
    skipped = not finite or (scaler is None and not grads_ok)
    overflow = scaler is not None and not grads_ok
    applied = not skipped and not overflow
    if tcfg.max_grad_norm is not None and applied:
        torch.nn.utils.clip_grads_with_norm_(params, tcfg.max_grad_norm, total_norm)
    if scaler is not None:
        if finite:  # the scaler skips overflowing steps itself
            plugin_call(pipe, "optimizer", opt_name, "step", scaler.step, optimizer)
        scaler.update()
    elif applied:
        plugin_call(pipe, "optimizer", opt_name, "step", optimizer.step)
    plugin_call(pipe, "optimizer", opt_name, "zero_grad", optimizer.zero_grad,
                set_to_none=True)
    if applied:
        plugin_call(pipe, "lr_scheduler", sched_name, "step", pipe.lr_scheduler.step)
    else:
        # The schedule advances on a skipped step too (it counts steps, not updates).
        # When no update has been applied yet, torch warns that the scheduler ran before
        # the optimizer, about exactly this on purpose; that warning alone is dropped.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_SCHEDULER_FIRST, category=UserWarning)
            plugin_call(pipe, "lr_scheduler", sched_name, "step", pipe.lr_scheduler.step)
    if applied:
        for i, recipe in enumerate(pipe.recipes):  # e.g. the EMA of the adapter weights
            plugin_call(pipe, "recipe", _recipe_name(pipe, i), "after_optimizer_step",
                        recipe.after_optimizer_step)
    return {"loss": total, "lr": lr, "skipped": float(skipped)}
