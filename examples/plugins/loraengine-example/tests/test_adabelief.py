"""The AdaBelief optimizer passes loraengine's optimizer conformance suite and follows
its update rule."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("loraengine_example", reason="pip install -e examples/plugins/loraengine-example")

from loraengine_example.optimizer import SPEC, AdaBeliefOptions

from loraengine.testing.optimizer_conformance import run_optimizer_conformance


@pytest.mark.parametrize("options", [{}, {"weight_decay": 0.1, "betas": (0.8, 0.99)}],
                         ids=["defaults", "decay"])
def test_adabelief_conforms(options):
    run_optimizer_conformance(SPEC, options, lr=5e-2)


def test_two_steps_follow_the_update_rule():
    o = AdaBeliefOptions(betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)
    lr = 0.01
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0], dtype=torch.float64))
    opt = SPEC.factory([p], lr, o)
    theta, m, s = p.detach().clone(), torch.zeros(2, dtype=torch.float64), \
        torch.zeros(2, dtype=torch.float64)
    for k, g in enumerate((torch.tensor([0.5, -1.0]), torch.tensor([0.3, 2.0])), start=1):
        g = g.double()
        p.grad = g.clone()
        opt.step()
        m = 0.9 * m + 0.1 * g
        s = 0.99 * s + 0.01 * (g - m) ** 2 + 1e-8
        theta = theta * (1 - lr * 0.1)
        theta = theta - lr * (m / (1 - 0.9**k)) / ((s / (1 - 0.99**k)).sqrt() + 1e-8)
        torch.testing.assert_close(p.detach(), theta)


def test_steady_gradient_gives_larger_steps_than_a_noisy_one():
    """The belief is small when the gradient is predictable: AdaBelief's point."""
    moved = {}
    for label, grads in (("steady", [1.0] * 20), ("noisy", [1.0, -0.6] * 10)):
        p = torch.nn.Parameter(torch.zeros(1))
        opt = SPEC.factory([p], 0.01, AdaBeliefOptions())
        for g in grads:
            p.grad = torch.tensor([g])
            opt.step()
        moved[label] = abs(float(p.detach()))
    assert moved["steady"] > 3 * moved["noisy"]


def test_betas_out_of_range_are_a_config_error():
    from pydantic import ValidationError

    with pytest.raises(ValueError):
        SPEC.factory([torch.nn.Parameter(torch.zeros(1))], 0.1,
                     AdaBeliefOptions.model_construct(betas=(1.0, 0.9), eps=1e-16,
                                                      weight_decay=0.0))
    with pytest.raises(ValidationError):
        AdaBeliefOptions(surprise=1)
