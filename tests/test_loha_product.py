"""LoHa's memory-saving Hadamard product: the same values and gradients as autograd's."""

from __future__ import annotations

import torch

from loraengine.plugins.adapters.loha import HadamardProduct


def test_hadamard_product_gradients_match_autograd():
    g = torch.Generator().manual_seed(0)
    factors = [torch.randn(s, generator=g, dtype=torch.float64, requires_grad=True)
               for s in ((6, 3), (3, 10), (6, 3), (3, 10))]
    assert torch.autograd.gradcheck(lambda *f: HadamardProduct.apply(*f, 0.7), factors)
    out = HadamardProduct.apply(*factors, 0.7)
    ref = (factors[0] @ factors[1]) * (factors[2] @ factors[3]) * 0.7
    assert torch.equal(out, ref)
