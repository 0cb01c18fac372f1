"""The optimizer conformance suite: what every ``OptimizerSpec``, built in or third
party, must satisfy for the trainer to use it.

The problem is a small seeded least-squares fit (a weight and a bias, plus a third
parameter that never gets a gradient). The checks:

- ``options``: the options model forbids unknown keys, has a valid default for every
  option, defines none of the keys the engine gives every optimizer (``lr``: the
  engine refuses such a plugin) and gives a JSON schema;
- ``builds``: ``factory(params, lr, options)`` returns a ``torch.optim.Optimizer``
  holding exactly the given parameters, each group's ``lr`` equal to the given one (LR
  schedulers and the loss map read and write ``param_groups[i]["lr"]``);
- ``descends``: ``steps`` steps lower the loss below ``descent`` × its start and keep
  every parameter finite;
- ``skips_missing_grads``: a parameter whose ``grad`` is ``None`` is left bit for bit
  (an adapter layer a batch did not reach must not drift, e.g. by weight decay);
- ``deterministic``: two runs from the same start end bit-identical, and none draws
  from torch's global RNG;
- ``state_roundtrip``: ``state_dict()`` saved with ``torch.save``, loaded into a fresh
  optimizer over copies of the parameters, continues exactly as the original (resume
  from a checkpoint is exact).

Use it in one line::

    from loraengine.testing.optimizer_conformance import run_optimizer_conformance
    run_optimizer_conformance(MY_SPEC, {"beta": 0.9}, lr=5e-2)

Optimizers with ``train()``/``eval()`` modes (schedule-free) are put in train mode
before stepping, as the trainer does. Every failure is an ``AssertionError`` naming the
optimizer and the check, also when the factory or ``step()`` raises.
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Mapping
from typing import Any

import torch

from loraengine.core.plugins.specs import OptimizerSpec
from loraengine.testing.suite import (
    Checks,
    ConformanceReport,
    Failing,
    options_check,
    options_text,
    resolve,
)

__all__ = ["OPTIMIZER_CHECKS", "Problem", "run_optimizer_check", "run_optimizer_conformance"]


class Problem:
    """A seeded least-squares fit ``y ≈ x·Wᵀ + b``; ``idle`` never gets a gradient."""

    def __init__(self, seed: int = 0):
        g = torch.Generator().manual_seed(7000 + seed)
        self.x = torch.randn(32, 6, generator=g)
        true_w = torch.randn(3, 6, generator=g)
        self.y = self.x @ true_w.T + 0.5
        self.start = {"weight": torch.randn(3, 6, generator=g) * 0.1,
                      "bias": torch.zeros(3), "idle": torch.randn(4, generator=g)}

    def params(self) -> dict[str, torch.nn.Parameter]:
        return {k: torch.nn.Parameter(v.clone()) for k, v in self.start.items()}

    def loss(self, p: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return (self.x @ p["weight"].T + p["bias"] - self.y).square().mean()


def _train_mode(opt: torch.optim.Optimizer) -> None:
    """Put an optimizer with modes (schedule-free) in train mode, as the trainer does
    before each step; ``torch.optim.Optimizer`` itself has no modes."""
    train = getattr(opt, "train", None)
    if callable(train):
        train()


class _Ctx:
    def __init__(self, spec: OptimizerSpec, options: Any, lr: float, steps: int,
                 descent: float, seed: int):
        self.spec, self.lr, self.steps, self.descent = spec, lr, steps, descent
        self.options = resolve(spec.config_model, options)
        self.problem = Problem(seed)
        self.fail = Failing(f"optimizer {spec.name!r} (lr {lr:g}, "
                            f"{options_text(self.options) or 'default options'})")

    def make(self, check: str, params: Iterable[torch.nn.Parameter]) -> torch.optim.Optimizer:
        """``factory(params, lr, options)``, in train mode; ``check`` fails when it
        cannot be called or raises."""
        factory = self.spec.factory
        if not callable(factory):
            raise self.fail(check, f"the record's factory is {factory!r}, not a callable "
                            f"factory(params, lr, options)")
        with self.fail.calling(check, "factory(params, lr, options)"):
            opt = factory(list(params), self.lr, self.options)
            _train_mode(opt)
        return opt

    def step(self, check: str, p: Mapping[str, torch.nn.Parameter],
             opt: torch.optim.Optimizer) -> float:
        """One optimizer step on the problem; the loss before it."""
        with self.fail.calling(check, "optimizer.zero_grad()"):
            opt.zero_grad(set_to_none=True)
        loss = self.problem.loss(p)
        loss.backward()
        with self.fail.calling(check, "optimizer.step()"):
            opt.step()
        return float(loss.detach())

    def run(self, check: str, n: int) -> tuple[dict[str, torch.nn.Parameter],
                                               torch.optim.Optimizer, list[float]]:
        p = self.problem.params()
        opt = self.make(check, p.values())
        losses = [self.step(check, p, opt) for _ in range(n)]
        return p, opt, losses


_TABLE: Checks[_Ctx] = Checks()
_TABLE("options")(options_check("optimizer"))


@_TABLE("builds")
def _check_builds(c: _Ctx) -> None:
    p = c.problem.params()
    opt = c.make("builds", p.values())
    if not isinstance(opt, torch.optim.Optimizer):
        raise c.fail("builds", f"factory returned {type(opt).__name__}, not a "
                     f"torch.optim.Optimizer")
    held = [q for group in opt.param_groups for q in group["params"]]
    given = list(p.values())
    if len(held) != len(given) or any(not any(q is g for g in given) for q in held):
        raise c.fail("builds", f"the optimizer holds {len(held)} parameter(s), not exactly "
                     f"the {len(given)} given")
    for i, group in enumerate(opt.param_groups):
        if "lr" not in group or float(group["lr"]) != float(c.lr):
            raise c.fail("builds", f"param_groups[{i}]['lr'] is {group.get('lr')!r}, not "
                         f"the given {c.lr!r}")


@_TABLE("descends")
def _check_descends(c: _Ctx) -> None:
    p, _, losses = c.run("descends", c.steps)
    final = float(c.problem.loss(p).detach())
    if not all(bool(torch.isfinite(q).all()) for q in p.values()):
        raise c.fail("descends", "a parameter became non-finite")
    if not final < c.descent * losses[0]:
        raise c.fail("descends", f"{c.steps} steps took the loss from {losses[0]:.4g} to "
                     f"{final:.4g} (wanted below {c.descent:g}×; try another lr)")


@_TABLE("skips_missing_grads")
def _check_skips_missing_grads(c: _Ctx) -> None:
    p, _, _ = c.run("skips_missing_grads", 3)
    if p["idle"].grad is not None:
        raise c.fail("skips_missing_grads", "the optimizer created a gradient for a "
                     "parameter that had none")
    if not torch.equal(p["idle"].detach(), c.problem.start["idle"]):
        raise c.fail("skips_missing_grads", "a parameter without a gradient changed")


@_TABLE("deterministic")
def _check_deterministic(c: _Ctx) -> None:
    with c.fail.if_global_rng_drawn("deterministic"):
        first, _, _ = c.run("deterministic", 5)
        second, _, _ = c.run("deterministic", 5)
    for name in first:
        if not torch.equal(first[name].detach(), second[name].detach()):
            raise c.fail("deterministic", f"two runs from the same start differ in {name}")


@_TABLE("state_roundtrip")
def _check_state_roundtrip(c: _Ctx) -> None:
    p, opt, _ = c.run("state_roundtrip", 3)
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    q = {k: torch.nn.Parameter(v.detach().clone()) for k, v in p.items()}
    fresh = c.make("state_roundtrip", q.values())
    try:
        fresh.load_state_dict(torch.load(buffer, weights_only=False))
    except Exception as exc:  # noqa: BLE001
        raise c.fail("state_roundtrip", f"load_state_dict failed: {type(exc).__name__}: "
                     f"{exc}") from exc
    _train_mode(fresh)
    for _ in range(3):
        c.step("state_roundtrip", p, opt)
        c.step("state_roundtrip", q, fresh)
    for name in p:
        if not torch.equal(p[name].detach(), q[name].detach()):
            err = float((p[name] - q[name]).detach().abs().max())
            raise c.fail("state_roundtrip", f"after reloading the state, {name} differs "
                         f"from the uninterrupted run by {err:.3g}")


#: The checks, in the order they run.
OPTIMIZER_CHECKS: tuple[str, ...] = _TABLE.names


def run_optimizer_check(spec: OptimizerSpec, check: str, options: Any = None, *,
                        lr: float = 5e-2, steps: int = 60, descent: float = 0.5,
                        seed: int = 0) -> None:
    """Run one check; raise ``AssertionError`` when it fails."""
    run_optimizer_conformance(spec, options, lr=lr, steps=steps, descent=descent,
                              seed=seed, checks=(check,))


def run_optimizer_conformance(spec: OptimizerSpec, options: Mapping[str, Any] | Any = None,
                              *, lr: float = 5e-2, steps: int = 60, descent: float = 0.5,
                              seed: int = 0, checks: Iterable[str] = OPTIMIZER_CHECKS
                              ) -> ConformanceReport:
    """Run the checks on ``spec`` with ``options`` at learning rate ``lr``; raise
    ``AssertionError`` on the first failure, else return what ran."""
    return _TABLE.run_all(spec.name, lambda: _Ctx(spec, options, lr, steps, descent, seed),
                          checks, "least_squares", f"optimizer {spec.name!r} (lr {lr:g})")
