"""LoHa's memory-saving Hadamard product: the same values and gradients as autograd's."""

from __future__ import annotations

import math

import pytest
import torch

from loraengine.plugins.adapters.loha import HadamardProduct, _RebuildLoHa


def test_hadamard_product_gradients_match_autograd():
    g = torch.Generator().manual_seed(0)
    factors = [torch.randn(s, generator=g, dtype=torch.float64, requires_grad=True)
               for s in ((6, 3), (3, 10), (6, 3), (3, 10))]
    assert torch.autograd.gradcheck(lambda *f: HadamardProduct.apply(*f, 0.7), factors)
    out = HadamardProduct.apply(*factors, 0.7)
    ref = (factors[0] @ factors[1]) * (factors[2] @ factors[3]) * 0.7
    assert torch.equal(out, ref)


def _rebuild_cases():
    conv_args = {1: ((2,), (1,), (1,)), 2: ((1, 2), (2, 0), (1, 2)), 3: ((1, 1, 1), (1, 0, 1),
                                                                      (1, 1, 1))}
    yield "linear", (5, 7, 12), (10, 12), None
    for nd, (stride, padding, dilation) in conv_args.items():
        k, size = ((3,) * nd, 7) if nd < 3 else ((3, 1, 2), 4)  # a small 3-D case
        yield f"conv{nd}d", (2, 4, *([size] * nd)), (6, 4, *k), (stride, padding, dilation)


@pytest.mark.parametrize("case", list(_rebuild_cases()), ids=lambda c: c[0])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_rebuild_node_matches_autograd_of_the_formula(case, bias, dtype):
    """The fused rebuild node against autograd over W + s·(w1a·w1b)⊙(w2a·w2b) through
    torch's own linear/convolution: gradcheck in float64; in float32 the output, dL/dx
    and every factor's gradient against the formula's, to rounding."""
    from loraengine.plugins.adapters.common import CONV_BY_NDIM

    _, x_shape, w_shape, conv = case
    g = torch.Generator().manual_seed(1)
    out, cols, r = w_shape[0], math.prod(w_shape[1:]), 3
    x = torch.randn(x_shape, generator=g, dtype=dtype, requires_grad=True)
    w = torch.randn(w_shape, generator=g, dtype=dtype)
    b = torch.randn(out, generator=g, dtype=dtype) if bias else None
    factors = [torch.randn(s, generator=g, dtype=dtype, requires_grad=True)
               for s in ((out, r), (r, cols), (out, r), (r, cols))]

    def fused(x, *f):
        return _RebuildLoHa.apply(x, w, b, *f, 0.7, conv)

    if dtype == torch.float64:
        assert torch.autograd.gradcheck(fused, (x, *factors))
        return
    dw = ((factors[0] @ factors[1]) * (factors[2] @ factors[3]) * 0.7).reshape(w_shape)
    if conv is None:
        ref = torch.nn.functional.linear(x, w + dw, b)
    else:
        ref = CONV_BY_NDIM[len(w_shape)](x, w + dw, b, *conv)
    got = fused(x, *factors)
    gy = torch.randn(got.shape, generator=g, dtype=dtype)
    grads = torch.autograd.grad(got, (x, *factors), gy)
    want = torch.autograd.grad(ref, (x, *factors), gy)
    # float32: the same products, the scale applied at another point of the sums; a
    # few ulps of the largest term, far below 1e-5 of it
    tol = 1e-5
    assert (got - ref).abs().max() <= tol * ref.abs().max()
    for a, e in zip(grads, want, strict=True):
        assert (a - e).abs().max() <= tol * e.abs().max()
