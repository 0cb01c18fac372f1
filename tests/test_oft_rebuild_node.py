"""OFT's rebuild path as one node (``_RotatedWeightOp``): its backward reaches the
rotation from the output and its gradient instead of the full weight gradient, which
holds because each block is orthogonal. Pinned against autograd over the plain formula
(W′ₖ = Rₖᵀ·Wₖ through torch's own linear/convolution, R the Cayley transform)."""

from __future__ import annotations

import pytest
import torch

from loraengine.plugins.adapters.common import CONV_BY_NDIM
from loraengine.plugins.adapters.oft import OFTLayer, _RotatedWeightOp


def _cases():
    yield "linear", (5, 7, 12), (16, 12), None
    conv = {1: ((2,), (1,), (1,)), 2: ((1, 2), (2, 0), (1, 2)), 3: ((1, 1, 1), (1, 0, 1),
                                                                  (1, 1, 1))}
    for nd, args in conv.items():
        k, size = ((3,) * nd, 7) if nd < 3 else ((3, 1, 2), 4)
        yield f"conv{nd}d", (2, 4, *([size] * nd)), (16, 4, *k), args


def _reference(x, w, b, r, conv):
    n, blk, _ = r.shape
    adapted = torch.bmm(r.transpose(1, 2), w.reshape(n, blk, -1)).reshape(w.shape)
    if conv is None:
        return torch.nn.functional.linear(x, adapted, b)
    return CONV_BY_NDIM[w.ndim](x, adapted, b, *conv)


def _cayley(blocks):
    """R = (I−Q)⁻¹(I+Q) in the blocks' own dtype (the layer's ``cayley`` works in fp32,
    orthogonal to fp32 rounding only)."""
    q = blocks - blocks.transpose(-1, -2)
    eye = torch.eye(q.shape[-1], dtype=q.dtype)
    return torch.linalg.solve(eye - q, eye + q)


@pytest.mark.parametrize("case", list(_cases()), ids=lambda c: c[0])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("block", [4, 8, 16, 3])
def test_rotated_weight_node_matches_autograd_of_the_formula(case, bias, dtype, block):
    """Output, dL/dx and dL/d(blocks) (through the Cayley transform) equal autograd's
    over the formula: to float64 rounding (1e-10) and float32's (1e-5). Blocks of 4 and
    8 are contracted in groups of 16 wide, 16 and 3 one by one."""
    _, x_shape, w_shape, conv = case
    g = torch.Generator().manual_seed(2)
    x = torch.randn(x_shape, generator=g, dtype=dtype, requires_grad=True)
    w_shape = (48 if block == 3 else 16, *w_shape[1:])
    w = torch.randn(w_shape, generator=g, dtype=dtype)
    b = torch.randn(w_shape[0], generator=g, dtype=dtype) if bias else None
    count = w_shape[0] // block
    blocks = (torch.randn(count, block, block, generator=g, dtype=dtype) * 0.3
              ).requires_grad_(True)
    got = _RotatedWeightOp.apply(x, w, b, _cayley(blocks), conv)
    ref = _reference(x, w, b, _cayley(blocks), conv)
    gy = torch.randn(got.shape, generator=g, dtype=dtype)
    grads = torch.autograd.grad(got, (x, blocks), gy)
    want = torch.autograd.grad(ref, (x, blocks), gy)
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    assert (got - ref).abs().max() <= tol * ref.abs().max()
    for a, e in zip(grads, want, strict=True):
        assert (a - e).abs().max() <= tol * e.abs().max()


def test_the_layer_takes_the_node_and_leaves_it_where_the_identity_fails():
    """At multiplier 1 without rescale the rebuild path is the node (its backward is
    ``_RotatedWeightOp``'s); with another multiplier or ``rescale`` the map is no longer
    orthogonal and the layer keeps autograd's own route, whose gradients the node's
    equal where both apply."""
    g = torch.Generator().manual_seed(3)
    base = torch.nn.Linear(12, 16).requires_grad_(False)
    x = torch.randn(6, 12, generator=g, requires_grad=True)
    gy = torch.randn(6, 16, generator=g)
    layer = OFTLayer(base, 4)
    with torch.no_grad():
        layer.oft_blocks.normal_(0, 0.2, generator=g)
    layer.path = "rebuild"
    y = layer(x)
    assert type(y.grad_fn).__name__ == "_RotatedWeightOpBackward"
    grads = torch.autograd.grad(y, (x, layer.oft_blocks), gy)
    layer.multiplier = 1.0 + 1e-12  # the same values through the generic route
    y2 = layer(x)
    assert type(y2.grad_fn).__name__ != "_RotatedWeightOpBackward"
    want = torch.autograd.grad(y2, (x, layer.oft_blocks), gy)
    for a, e in zip(grads, want, strict=True):
        assert (a - e).abs().max() <= 1e-5 * e.abs().max()
    layer.multiplier = 0.5
    assert type(layer(x).grad_fn).__name__ != "_RotatedWeightOpBackward"
