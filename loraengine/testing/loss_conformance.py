"""The loss conformance suite: what every ``LossSpec``, built in or third party, must
satisfy for the trainer to use it.

The engine calls the loss as ``fn(pred, target)`` (or ``fn(pred, target, t, schedule)``
for a ``timestep_aware`` loss), expects the *elementwise* loss back and reduces it
itself: per sample (then weighted), then over the batch. The checks, on image
``[B,C,H,W]`` and video ``[B,C,T,H,W]`` shapes, and for a timestep-aware loss under a
DDPM and a flow schedule:

- ``options``: the options model forbids unknown keys, has a valid default for every
  option, defines none of the keys the engine gives every loss (``loss.target``...)
  and gives a JSON schema;
- ``elementwise``: the output has the prediction's shape, is floating point and finite;
- ``minimum_at_target``: no element's loss is lower anywhere than at ``pred == target``;
- ``gradient``: the gradient with respect to ``pred`` is finite and not all zero, and a
  target that does not require grad is fine;
- ``per_sample``: each sample's loss is the same computed in the batch as alone (so
  per-sample weighting and gradient accumulation mean what they say);
- ``deterministic``: the same inputs give the same output, without drawing from the
  global RNG.

Use it in one line::

    from loraengine.testing.loss_conformance import run_loss_conformance
    run_loss_conformance(MY_SPEC, {"eps": 1e-3})

Every failure is an ``AssertionError`` naming the loss, the case and the check, also
when the loss raises (a ``factory`` that is not callable included).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from loraengine.core.plugins.specs import LossSpec
from loraengine.core.schedule import NoiseSchedule
from loraengine.testing.suite import (
    Checks,
    ConformanceReport,
    Failing,
    options_check,
    options_text,
    resolve,
)

__all__ = ["LOSS_CHECKS", "LossCase", "loss_cases", "run_loss_check", "run_loss_conformance"]


@dataclass(frozen=True)
class LossCase:
    """A prediction shape and the noise schedule its timesteps come from."""

    name: str
    shape: tuple[int, ...]
    schedule: Callable[[], NoiseSchedule]

    def __str__(self) -> str:
        return self.name

    def tensors(self, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(pred, target, t): predictions at several distances from the target, and
        one timestep per sample drawn from the schedule."""
        g = torch.Generator().manual_seed(8000 + seed)
        target = torch.randn(self.shape, generator=g)
        spread = torch.logspace(-3, 1, self.shape[0]).reshape(-1, *[1] * (len(self.shape) - 1))
        pred = target + torch.randn(self.shape, generator=g) * spread
        sched = self.schedule()
        t = torch.stack([sched.sample_timestep(g) for _ in range(self.shape[0])])
        return pred, target, t


def loss_cases(spec: LossSpec | None = None) -> list[LossCase]:
    """The cases; a timestep-aware loss also runs under a flow schedule."""
    cases = [LossCase("image_ddpm", (4, 4, 6, 6), NoiseSchedule.ddpm),
             LossCase("video_ddpm", (3, 4, 2, 4, 4), NoiseSchedule.ddpm)]
    if spec is None or spec.timestep_aware:
        cases.append(LossCase("image_flow", (4, 4, 6, 6), lambda: NoiseSchedule.flow(3.0)))
    return cases


class _Ctx:
    def __init__(self, spec: LossSpec, case: LossCase, options: Any, seed: int,
                 rtol: float):
        self.spec, self.case, self.seed, self.rtol = spec, case, seed, rtol
        self.options = resolve(spec.config_model, options)
        self.schedule = case.schedule()
        self.fail = Failing(f"loss {spec.name!r} "
                            f"({options_text(self.options) or 'default options'}) on {case}")
        self._fn: Callable[..., torch.Tensor] | None = None

    def fn(self, check: str) -> Callable[..., torch.Tensor]:
        """The loss function from ``factory(options)``, made on first use (the
        ``options`` check runs without it); called with two or four arguments, as
        ``timestep_aware`` says."""
        if self._fn is None:
            factory = self.spec.factory
            if not callable(factory):
                raise self.fail(check, f"the record's factory is {factory!r}, not a "
                                f"callable factory(options) -> loss function")
            with self.fail.calling(check, "factory(options)"):
                fn = factory(self.options)
            if not callable(fn):
                raise self.fail(check, f"factory(options) returned {type(fn).__name__}, "
                                f"not a loss function fn(pred, target)")
            self._fn = fn
        return self._fn

    def __call__(self, pred: torch.Tensor, target: torch.Tensor, t: torch.Tensor,
                 check: str) -> torch.Tensor:
        fn = self.fn(check)
        with self.fail.calling(check, "the loss"):
            if self.spec.timestep_aware:
                return fn(pred, target, t, self.schedule)
            return fn(pred, target)


_TABLE: Checks[_Ctx] = Checks()
_TABLE("options")(options_check("loss"))


@_TABLE("elementwise")
@torch.no_grad()
def _check_elementwise(c: _Ctx) -> None:
    pred, target, t = c.case.tensors(c.seed)
    out = c(pred, target, t, "elementwise")
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != tuple(pred.shape):
        shape = list(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise c.fail("elementwise", f"returned {shape} for a prediction of "
                     f"{list(pred.shape)}: return the elementwise loss, the engine reduces it")
    if not out.is_floating_point() or not bool(torch.isfinite(out).all()):
        raise c.fail("elementwise", "the loss is not a finite floating-point tensor")


@_TABLE("minimum_at_target")
@torch.no_grad()
def _check_minimum_at_target(c: _Ctx) -> None:
    pred, target, t = c.case.tensors(c.seed)
    at_target = c(target.clone(), target, t, "minimum_at_target")
    off = c(pred, target, t, "minimum_at_target")
    if not bool(torch.isfinite(at_target).all()):
        raise c.fail("minimum_at_target", "the loss at pred == target is not finite")
    slack = 1e-6 * (1.0 + at_target.abs())
    lower = off < at_target - slack
    if bool(lower.any()):
        raise c.fail("minimum_at_target", f"{int(lower.sum())} element(s) have a lower "
                     f"loss away from the target than at it")


@_TABLE("gradient")
def _check_gradient(c: _Ctx) -> None:
    pred, target, t = c.case.tensors(c.seed)
    pred.requires_grad_(True)
    try:
        c(pred, target, t, "gradient").sum().backward()
    except RuntimeError as exc:
        raise c.fail("gradient", f"backward through the loss failed: {exc}") from exc
    grad = pred.grad
    if grad is None:
        raise c.fail("gradient", "no gradient reaches the prediction")
    if not bool(torch.isfinite(grad).all()):
        raise c.fail("gradient", "the gradient with respect to the prediction is not finite")
    if not bool(grad.abs().sum() > 0):
        raise c.fail("gradient", "the gradient with respect to the prediction is all zero")


@_TABLE("per_sample")
@torch.no_grad()
def _check_per_sample(c: _Ctx) -> None:
    pred, target, t = c.case.tensors(c.seed)
    together = c(pred, target, t, "per_sample")
    for i in range(pred.shape[0]):
        alone = c(pred[i:i + 1], target[i:i + 1], t[i:i + 1], "per_sample")[0]
        err = float((alone - together[i]).abs().max())
        scale = float(together[i].abs().max().clamp_min(1e-12))
        if not err <= c.rtol * scale:
            raise c.fail("per_sample", f"sample {i}'s loss depends on the rest of the batch "
                         f"(differs by {err / scale:.3g} relative when computed alone)")


@_TABLE("deterministic")
@torch.no_grad()
def _check_deterministic(c: _Ctx) -> None:
    pred, target, t = c.case.tensors(c.seed)
    with c.fail.if_global_rng_drawn("deterministic"):
        first = c(pred, target, t, "deterministic")
        second = c(pred, target, t, "deterministic")
    if not torch.equal(first, second):
        raise c.fail("deterministic", "the same inputs gave different losses")


#: The checks, in the order they run.
LOSS_CHECKS: tuple[str, ...] = _TABLE.names


def run_loss_check(spec: LossSpec, case: LossCase, check: str, options: Any = None, *,
                   seed: int = 0, rtol: float = 1e-5) -> None:
    """Run one check on one case; raise ``AssertionError`` when it fails."""
    _TABLE.run(check, lambda: _Ctx(spec, case, options, seed, rtol),
               f"loss {spec.name!r} on {case}")


def run_loss_conformance(spec: LossSpec, options: Mapping[str, Any] | Any = None, *,
                         seed: int = 0, rtol: float = 1e-5,
                         checks: Iterable[str] = LOSS_CHECKS) -> ConformanceReport:
    """Run every check on every case; raise ``AssertionError`` on the first failure,
    else return what ran."""
    report = ConformanceReport(spec.name)
    checks = list(checks)
    for case in loss_cases(spec):
        for check in checks:
            run_loss_check(spec, case, check, options, seed=seed, rtol=rtol)
            report.passed.append((case.name, check))
    return report
