"""LoRA's fused side path (one autograd node per layer, backward written out) against
autograd on the plain formula ``base(x) + s·up(down(x))`` built here from torch's own
functional ops: output and the gradients of the input, ``lora_down`` and ``lora_up``
agree to 1e-5 relative in fp32 (the two differ only in summation order over
contractions of at most a few hundred terms: a few ulps of fp32, far below 1e-5).
Also: which layers it takes, what it keeps for backward, and the weight-mode path
being the fused node."""

from __future__ import annotations

from contextlib import nullcontext

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from loraengine.core.adapter import AdapterNetwork
from loraengine.plugins.adapters.lora import LoRALayer
from loraengine.plugins.adapters.lora_fused import fusable, lora_forward
from loraengine.testing.suite import relative_error

TOL = 1e-5

CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}

CASES = [
    ("linear 2-D", lambda: nn.Linear(24, 40), (6, 24)),
    ("linear 3-D", lambda: nn.Linear(24, 40), (2, 5, 24)),
    ("linear no bias", lambda: nn.Linear(32, 16, bias=False), (3, 7, 32)),
    ("conv1d", lambda: nn.Conv1d(8, 12, 3, padding=1), (2, 8, 11)),
    ("conv2d 3x3", lambda: nn.Conv2d(8, 12, 3, padding=1), (2, 8, 9, 9)),
    ("conv2d 1x1 no bias", lambda: nn.Conv2d(16, 8, 1, bias=False), (3, 16, 5, 6)),
    ("conv2d stride 2", lambda: nn.Conv2d(8, 12, 3, stride=2, padding=1), (2, 8, 9, 8)),
    ("conv2d dilation 2", lambda: nn.Conv2d(6, 10, 3, padding=2, dilation=2), (2, 6, 8, 8)),
    ("conv2d 1x3", lambda: nn.Conv2d(8, 12, (1, 3), padding=(0, 1)), (2, 8, 5, 7)),
    ("conv3d", lambda: nn.Conv3d(4, 8, 3, padding=1), (2, 4, 4, 5, 5)),
]


def _setup(make, shape, rank=4, seed=0):
    torch.manual_seed(seed)
    base = make().requires_grad_(False)
    layer = LoRALayer(base, rank, alpha=3.0)
    with torch.no_grad():
        layer.lora_up.normal_(0, 0.1)  # non-zero so every gradient is non-trivial
    x = torch.randn(shape)
    return base, layer, x


def _reference(base, down, up, scale, x, base_out=None):
    """Autograd on the formula, from torch's functional ops alone."""
    if isinstance(base, nn.Linear):
        side = F.linear(F.linear(x, down), up)
        y = F.linear(x, base.weight, base.bias) if base_out is None else base_out
    else:
        conv = CONV[base.weight.ndim - 2]
        geo = (base.stride, base.padding, base.dilation)
        side = conv(conv(x, down, None, *geo), up)
        y = conv(x, base.weight, base.bias, *geo) if base_out is None else base_out
    return y + scale * side


def _grads(fn, x, params, seed=1):
    x = x.clone().requires_grad_(True)
    for p in params:
        p.grad = None
    out = fn(x)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed))
    (out * g).sum().backward()
    return out.detach(), [x.grad.clone()] + [p.grad.clone() for p in params]


@pytest.mark.parametrize("mode", ["weight", "bypass"])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_fused_path_matches_autograd_on_the_formula(case, mode):
    _, make, shape = case
    base, layer, x = _setup(make, shape)
    params = [layer.lora_down, layer.lora_up]
    scale = layer.scale * 0.7
    if mode == "weight":
        def fused(t):
            return lora_forward(base, t, layer.lora_down, layer.lora_up, scale)

        def ref(t):
            return _reference(base, layer.lora_down, layer.lora_up, scale, t)
    else:
        def fused(t):
            return lora_forward(base, t, layer.lora_down, layer.lora_up, scale, base(t))

        def ref(t):
            return _reference(base, layer.lora_down, layer.lora_up, scale, t, base(t))
    out_f, grads_f = _grads(fused, x, params)
    out_r, grads_r = _grads(ref, x, params)
    assert out_f.shape == out_r.shape
    assert relative_error(out_f, out_r) <= TOL
    for name, gf, gr in zip(("x", "lora_down", "lora_up"), grads_f, grads_r, strict=True):
        assert gf.shape == gr.shape, name
        assert bool(gr.abs().max() > 0), name
        assert relative_error(gf, gr) <= TOL, (name, relative_error(gf, gr))


@pytest.mark.parametrize("mode", ["weight", "bypass"])
def test_the_adapter_trains_through_the_fused_node(mode):
    base, layer, x = _setup(lambda: nn.Conv2d(8, 12, 3, padding=1), (2, 8, 6, 6))
    layer.path = "factored"
    net = AdapterNetwork({"conv": layer})
    net.attach(mode)
    out = base(x)
    net.detach()
    assert type(out.grad_fn).__name__ == "_ConvLoRABackward"
    assert not base.weight.requires_grad and base.weight.grad is None


def test_input_gradient_is_skipped_when_the_input_needs_none():
    base, layer, x = _setup(lambda: nn.Linear(16, 8), (4, 16))
    out = lora_forward(base, x, layer.lora_down, layer.lora_up, layer.scale)
    out.sum().backward()
    assert layer.lora_down.grad is not None and layer.lora_up.grad is not None
    want = _reference(base, layer.lora_down.detach().requires_grad_(True),
                      layer.lora_up.detach(), layer.scale, x)
    assert relative_error(out, want) <= TOL


def test_layers_the_fused_path_does_not_take_keep_the_plain_route():
    trainable = nn.Linear(8, 8)  # the base weight wants a gradient
    same = nn.Conv2d(4, 4, 3, padding="same").requires_grad_(False)
    reflect = nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect").requires_grad_(False)
    grouped = nn.Conv2d(4, 4, 3, padding=1, groups=2).requires_grad_(False)
    frozen = nn.Conv2d(4, 4, 3, padding=1).requires_grad_(False)
    assert [fusable(m) for m in (trainable, same, reflect, grouped, frozen)] == [
        False, False, False, False, True]
    for base in (same, reflect):
        layer = LoRALayer(base, 2, 2.0)
        with torch.no_grad():
            layer.lora_up.normal_(0, 0.1)
        layer.path = "factored"
        x = torch.randn(1, 4, 6, 6)
        out = layer(x)
        assert type(out.grad_fn).__name__ != "_ConvLoRABackward"
        want = base(x) + layer.scale * F.conv2d(
            base._conv_forward(x, layer.lora_down, None), layer.lora_up)
        assert relative_error(out, want) <= TOL


def _saved_bytes(fn, x):
    storages: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(x)
    return sum(storages.values())


@pytest.mark.parametrize("make,shape", [
    (lambda: nn.Linear(64, 96), (2, 50, 64)),
    (lambda: nn.Conv2d(16, 24, 3, padding=1), (2, 16, 12, 12)),
])
def test_backward_keeps_only_the_input_and_the_rank_r_intermediate(make, shape):
    base, layer, x = _setup(make, shape, rank=4)
    x.requires_grad_(True)
    n_out = base(x).numel() // base.weight.shape[0]  # output positions
    weights = sum(t.numel() * 4 for t in (base.weight, layer.lora_down, layer.lora_up))
    want = x.numel() * 4 + n_out * 4 * 4 + weights  # x, h (rank 4), the three weights
    got = _saved_bytes(lambda t: lora_forward(base, t, layer.lora_down, layer.lora_up,
                                              layer.scale), x)
    assert got == want


def test_loha_runs_as_a_rank_r2_lora_through_the_fused_node():
    """Plain LoHa takes the fused node (its conformance suite checks the numbers);
    its Tucker form keeps its own route."""
    from loraengine.plugins.adapters.loha import LoHaLayer

    for tucker, fused in ((False, True), (True, False)):
        base = nn.Conv2d(8, 12, 3, padding=1).requires_grad_(False)
        layer = LoHaLayer(base, 2, 2.0, use_tucker=tucker)
        layer.path = "factored"
        out = layer(torch.randn(1, 8, 5, 5))
        assert (type(out.grad_fn).__name__ == "_ConvLoRABackward") == fused


def test_weight_mode_runs_a_linears_base_op_inside_the_node_watched_or_not():
    """Weight mode folds a Linear's base op into the node. Under a dispatch mode (as
    selective checkpointing and FLOP counting run) forward writes a new tensor instead
    of adding in place: the same values bit for bit, and both the formula's."""
    from torch.utils.flop_counter import FlopCounterMode

    base, layer, x = _setup(lambda: nn.Linear(24, 40), (2, 5, 24))
    params = [layer.lora_down, layer.lora_up]

    def fused(t):
        return lora_forward(base, t, layer.lora_down, layer.lora_up, layer.scale)

    out_r, grads_r = _grads(lambda t: _reference(base, layer.lora_down, layer.lora_up,
                                                 layer.scale, t), x, params)
    runs = []
    for watched in (False, True):
        with FlopCounterMode(display=False) if watched else nullcontext():
            out = fused(x.clone().requires_grad_(True))
            assert type(out.grad_fn).__name__ == "_LinearBaseLoRABackward"
            runs.append(_grads(fused, x, params))
    for out_f, grads_f in runs:
        assert relative_error(out_f, out_r) <= TOL
        for gf, gr in zip(grads_f, grads_r, strict=True):
            assert relative_error(gf, gr) <= TOL
    (out_a, grads_a), (out_b, grads_b) = runs
    assert torch.equal(out_a, out_b)
    assert all(torch.equal(a, b) for a, b in zip(grads_a, grads_b, strict=True))


def test_folded_input_gradient_is_one_tensor_autograd_adds_into():
    """The node's dx is a tensor of its own (not a view of a product), so autograd adds
    other consumers' shares of dx into it rather than allocating a sum."""
    base, layer, x = _setup(lambda: nn.Linear(16, 8), (3, 4, 16))
    x = x.clone().requires_grad_(True)
    seen = []
    y = lora_forward(base, x, layer.lora_down, layer.lora_up, layer.scale)
    y.grad_fn.register_hook(lambda grads_in, grads_out: seen.append(grads_in[0]))
    y.sum().backward()
    assert seen and seen[0]._base is None and seen[0].shape == x.shape
