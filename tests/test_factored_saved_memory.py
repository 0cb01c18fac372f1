"""What the LoKr and OFT factored training paths keep for backward: LoKr only its input
(as the rebuild path does), OFT on a convolution only W·x (not the input as well).
Bytes are counted by autograd's saved-tensor hooks, one count per storage."""

from __future__ import annotations

import torch
from torch import nn

from loraengine.plugins import build_plugin_manager
from loraengine.testing.conformance import build_adapter, perturb


def _saved_bytes(layer: nn.Module, x: torch.Tensor) -> tuple[int, torch.Tensor]:
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = layer(x)
    return sum(storages.values()), out


def _adapter(name: str, base: nn.Module, **options):
    host = build_plugin_manager(entry_points=False)
    layer = build_adapter(host.registry.get("adapter", name), base, options or None, rank=4)
    perturb(layer)
    layer.path = "factored"
    return layer


def _small_params(layer: nn.Module) -> int:
    return sum(p.numel() * 4 for p in layer.parameters()) + 4096  # factors, scalars


def test_lokr_linear_factored_path_keeps_only_the_input():
    base = nn.Linear(64, 96).requires_grad_(False)
    layer = _adapter("lokr", base, factor=-1)
    x = torch.randn(3, 40, 64, requires_grad=True)
    saved, out = _saved_bytes(layer, x)
    assert layer.last_path == "factored"
    weight = base.weight.numel() * 4  # the frozen weight, kept for dL/dx, allocates nothing
    assert saved <= x.numel() * 4 + weight + _small_params(layer)
    out.square().sum().backward()  # and backward still runs from what was kept
    assert x.grad is not None and all(p.grad is not None for p in layer.parameters())


def test_lokr_conv_factored_path_keeps_nothing_beyond_the_base_convolution():
    base = nn.Conv2d(32, 48, 3, padding=1).requires_grad_(False)
    layer = _adapter("lokr", base, factor=-1)
    x = torch.randn(2, 32, 12, 12, requires_grad=True)
    floor, _ = _saved_bytes(base, x)  # the plain convolution keeps x and W
    saved, _ = _saved_bytes(layer, x)
    assert layer.last_path == "factored"
    assert saved <= floor + _small_params(layer)


def test_oft_conv_factored_path_keeps_w_x_and_not_the_input():
    base = nn.Conv2d(32, 32, 3, padding=1).requires_grad_(False)
    layer = _adapter("oft", base)
    x = torch.randn(2, 32, 12, 12, requires_grad=True)
    saved, out = _saved_bytes(layer, x)
    assert layer.last_path == "factored"
    wx_bytes = out.numel() * 4  # W·x has the output's size
    assert saved <= wx_bytes + base.weight.numel() * 4 + _small_params(layer)
    # the input is not kept beside W·x (autograd's own convolution would keep it)
    assert saved - base.weight.numel() * 4 < x.numel() * 4 + wx_bytes
    out.square().sum().backward()  # dL/dx from the kept W·x and weight alone...
    layer.path = "rebuild"
    x2 = x.detach().requires_grad_(True)
    layer(x2).square().sum().backward()  # ...equals the rebuilt layer's
    assert x.grad is not None and x2.grad is not None
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-5, atol=1e-5)
