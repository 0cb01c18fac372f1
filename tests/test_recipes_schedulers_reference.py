"""Each built-in LR schedule, step by step, against the same curve from a well-kept
library: ``diffusers.optimization.get_scheduler`` (the transformers schedules) and
``torch.optim.lr_scheduler``.

One documented difference: our warmup is ``(s + 1)/W`` at the 0-based step ``s`` (the
first step already moves, step ``W - 1`` uses the full rate; see
``loraengine/plugins/schedulers.py``), while diffusers' is ``s/W`` (its first step has
rate 0). So during warmup ours at step ``s`` is theirs at ``s + 1``; after it the two
are equal. torch's ``LinearLR(1/W, 1, W - 1)`` is exactly our warmup.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from test_recipes_schedulers import lrs

diffusers_optimization = pytest.importorskip("diffusers.optimization")

TOTAL, BASE, WARMUP = 20, 0.1, 5
EXACT = {"rel": 1e-12, "abs": 1e-18}  # the same formula, evaluated in another order
#: torch's CosineAnnealingLR and LinearLR step a recursion (each rate from the last)
#: rather than evaluating the closed form, so rounding accumulates over the steps
RECURSIVE = {"rel": 1e-9, "abs": 1e-15}


def reference(make: Callable[[torch.optim.Optimizer], torch.optim.lr_scheduler.LRScheduler],
              total: int = TOTAL) -> list[float]:
    """The rate of each of ``total`` steps of the library scheduler ``make(optimizer)``
    builds (read before each step, as ``lrs`` reads ours)."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=BASE)
    sched = make(opt)
    out = []
    for _ in range(total):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def diffusers_curve(name: str, warmup: int, **kwargs: float) -> list[float]:
    return reference(lambda opt: diffusers_optimization.get_scheduler(
        name, opt, num_warmup_steps=warmup, num_training_steps=TOTAL, **kwargs))


#: ours (options) -> diffusers' (name, get_scheduler keywords). diffusers' polynomial
#: decays to lr_end = 1e-7 rather than 0: our min_lr_ratio = lr_end / lr says the same.
PAIRS = {
    "constant": ({"name": "constant"}, ("constant", {})),
    "linear": ({"name": "linear"}, ("linear", {})),
    "cosine": ({"name": "cosine"}, ("cosine", {})),
    "cosine_with_restarts": ({"name": "cosine_with_restarts", "cycles": 3},
                             ("cosine_with_restarts", {"num_cycles": 3})),
    "polynomial": ({"name": "polynomial", "power": 2.0, "min_lr_ratio": 1e-7 / BASE},
                   ("polynomial", {"power": 2.0})),
}


@pytest.mark.parametrize("name", list(PAIRS))
def test_matches_diffusers_without_warmup(host, name):
    ours, (theirs, kwargs) = PAIRS[name]
    assert lrs(host, ours, TOTAL, BASE) == pytest.approx(
        diffusers_curve(theirs, 0, **kwargs), **EXACT)


@pytest.mark.parametrize("name", list(PAIRS))
def test_matches_diffusers_with_warmup_one_step_ahead(host, name):
    ours, (theirs, kwargs) = PAIRS[name]
    if name == "constant":
        theirs = "constant_with_warmup"  # diffusers' constant ignores the warmup
    got = lrs(host, {**ours, "warmup_steps": WARMUP}, TOTAL, BASE)
    want = diffusers_curve(theirs, WARMUP, **kwargs)
    assert got[:WARMUP] == pytest.approx(want[1:WARMUP + 1], **EXACT)  # the shift
    assert got[WARMUP:] == pytest.approx(want[WARMUP:], **EXACT)
    assert want[0] == 0.0 and got[0] == pytest.approx(BASE / WARMUP, **EXACT)


def _warmup(opt: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
    return torch.optim.lr_scheduler.LinearLR(opt, 1 / WARMUP, 1.0, total_iters=WARMUP - 1)


def test_constant_warmup_is_torchs_linear_lr(host):
    assert lrs(host, {"name": "constant", "warmup_steps": WARMUP}, TOTAL, BASE) == \
        pytest.approx(reference(_warmup), **RECURSIVE)


def test_linear_with_floor_is_torchs_linear_lr(host):
    got = lrs(host, {"name": "linear", "min_lr_ratio": 0.25}, TOTAL, BASE)
    want = reference(lambda opt: torch.optim.lr_scheduler.LinearLR(
        opt, start_factor=1.0, end_factor=0.25, total_iters=TOTAL))
    assert got == pytest.approx(want, **RECURSIVE)


def test_cosine_with_floor_after_warmup_is_torchs_sequence(host):
    got = lrs(host, {"name": "cosine", "min_lr_ratio": 0.2, "warmup_steps": WARMUP},
              TOTAL, BASE)
    want = reference(lambda opt: torch.optim.lr_scheduler.SequentialLR(opt, [
        _warmup(opt),
        torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=TOTAL - WARMUP,
                                                   eta_min=0.2 * BASE),
    ], milestones=[WARMUP]))
    assert got == pytest.approx(want, **RECURSIVE)


def test_polynomial_is_torchs_polynomial_lr(host):
    got = lrs(host, {"name": "polynomial", "power": 3.0}, TOTAL, BASE)
    want = reference(lambda opt: torch.optim.lr_scheduler.PolynomialLR(
        opt, total_iters=TOTAL, power=3.0))
    assert got == pytest.approx(want, **RECURSIVE)
