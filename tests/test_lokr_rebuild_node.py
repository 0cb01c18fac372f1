"""LoKr's rebuild path as one node (``_KronRebuild``): the same output and gradients as
autograd over W + kron(w1, w2) through torch's own linear/convolution."""

from __future__ import annotations

import math

import pytest
import torch

from loraengine.plugins.adapters.common import CONV_BY_NDIM
from loraengine.plugins.adapters.lokr import _KronRebuild


def _cases():
    # (x, weight, (a, c), conv): out = a·b, in = c·d
    yield "linear", (5, 7, 12), (10, 12), (2, 3), None
    conv = {1: ((2,), (1,), (1,)), 2: ((1, 2), (2, 0), (1, 2)), 3: ((1, 1, 1), (1, 0, 1),
                                                                  (1, 1, 1))}
    for nd, args in conv.items():
        k, size = ((3,) * nd, 7) if nd < 3 else ((3, 1, 2), 4)
        yield f"conv{nd}d", (2, 4, *([size] * nd)), (6, 4, *k), (3, 2), args


@pytest.mark.parametrize("case", list(_cases()), ids=lambda c: c[0])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_kron_rebuild_node_matches_autograd_of_the_formula(case, bias, dtype):
    """gradcheck in float64; in float32 output, dL/dx and both factors' gradients equal
    the formula's to rounding (the same sums in another order: far below 1e-5)."""
    _, x_shape, w_shape, (a, c), conv = case
    g = torch.Generator().manual_seed(4)
    b, d = w_shape[0] // a, w_shape[1] // c
    k = math.prod(w_shape[2:])
    x = torch.randn(x_shape, generator=g, dtype=dtype, requires_grad=True)
    w = torch.randn(w_shape, generator=g, dtype=dtype)
    bv = torch.randn(w_shape[0], generator=g, dtype=dtype) if bias else None
    w1 = torch.randn(a, c, generator=g, dtype=dtype, requires_grad=True)
    w2 = torch.randn(b, d * k, generator=g, dtype=dtype, requires_grad=True)

    def fused(x, w1, w2):
        return _KronRebuild.apply(x, w, bv, w1, w2, conv)

    if dtype == torch.float64:
        assert torch.autograd.gradcheck(fused, (x, w1, w2))
        return
    # kron over the [out, in] axes, the kernel carried by w2
    dw = torch.kron(w1.reshape(a, c, *([1] * (len(w_shape) - 2))),
                    w2.reshape(b, d, *w_shape[2:]))
    if conv is None:
        ref = torch.nn.functional.linear(x, w + dw, bv)
    else:
        ref = CONV_BY_NDIM[len(w_shape)](x, w + dw, bv, *conv)
    got = fused(x, w1, w2)
    gy = torch.randn(got.shape, generator=g, dtype=dtype)
    grads = torch.autograd.grad(got, (x, w1, w2), gy)
    want = torch.autograd.grad(ref, (x, w1, w2), gy)
    tol = 1e-5
    assert (got - ref).abs().max() <= tol * ref.abs().max()
    for got_grad, ref_grad in zip(grads, want, strict=True):
        assert (got_grad - ref_grad).abs().max() <= tol * ref_grad.abs().max()
