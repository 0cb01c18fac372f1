"""The log-cosh loss passes loraengine's loss conformance suite and has the shape its
name says."""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("loraengine_example", reason="pip install -e examples/plugins/loraengine-example")

from loraengine_example.loss import SPEC, log_cosh

from loraengine.testing.loss_conformance import run_loss_conformance


@pytest.mark.parametrize("options", [{}, {"delta": 0.25}], ids=["delta1", "delta0.25"])
def test_log_cosh_conforms(options):
    run_loss_conformance(SPEC, options)


def test_equals_the_direct_formula_where_that_is_safe():
    d = torch.linspace(-20, 20, 401, dtype=torch.float64)
    torch.testing.assert_close(log_cosh(d, torch.zeros_like(d)), torch.log(torch.cosh(d)))


def test_huge_errors_stay_finite_and_linear():
    d = torch.tensor([1e4, -1e6], dtype=torch.float32)
    out = log_cosh(d, torch.zeros_like(d))
    torch.testing.assert_close(out, d.abs() - math.log(2.0))


@pytest.mark.parametrize("delta", [1.0, 0.1])
def test_quadratic_below_delta_linear_above(delta):
    small = torch.tensor([1e-3 * delta], dtype=torch.float64)
    large = torch.tensor([1e3 * delta], dtype=torch.float64)
    zero = torch.zeros(1, dtype=torch.float64)
    torch.testing.assert_close(log_cosh(small, zero, delta), small**2 / 2, rtol=1e-5, atol=0)
    torch.testing.assert_close(log_cosh(large, zero, delta),
                               delta * large - delta**2 * math.log(2.0))
