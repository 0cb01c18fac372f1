"""Which kernel the torch optimizers (adamw, adam, sgd) run: torch's fused one where every
parameter's device has it (the CPU among them; left to itself torch takes its
per-parameter loop there), the default on ``meta`` (where ``plan`` steps them). Fused and
loop follow the same update to float rounding, with every option passed through, and
their state dicts load into each other."""

from __future__ import annotations

import pytest
import torch

from loraengine.core.config.root import parse_config
from loraengine.plugins.optimizers import fused_kernel

EPS = torch.finfo(torch.float32).eps
STEPS = 6

#: optimizer section -> torch's class and the same options
CASES = [
    ({"name": "adamw", "lr": 1e-2, "weight_decay": 0.1, "amsgrad": True},
     torch.optim.AdamW, {"lr": 1e-2, "weight_decay": 0.1, "amsgrad": True}),
    ({"name": "adam", "lr": 1e-2, "betas": [0.8, 0.99], "eps": 1e-6},
     torch.optim.Adam, {"lr": 1e-2, "betas": (0.8, 0.99), "eps": 1e-6}),
    ({"name": "sgd", "lr": 1e-2, "momentum": 0.9, "nesterov": True, "weight_decay": 0.01},
     torch.optim.SGD, {"lr": 1e-2, "momentum": 0.9, "nesterov": True, "weight_decay": 0.01}),
]


def _params(device: str = "cpu") -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(0)
    return [torch.nn.Parameter(torch.randn(s, generator=g).to(device))
            for s in ((64, 8), (8, 3, 3, 3), (5,))]


def _step(opt: torch.optim.Optimizer, params: list[torch.nn.Parameter], k: int) -> None:
    g = torch.Generator().manual_seed(100 + k)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g).to(p.device)
    opt.step()


def _build(host, section: dict, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    o = parse_config({"model": {"family": "module"}, "optimizer": section},
                     host.registry).optimizer
    return host.registry.get("optimizer", section["name"]).factory(params, o.lr, o)


def _close(a: torch.Tensor, b: torch.Tensor, lr: float, steps: int) -> bool:
    """Whether ``a`` and ``b`` differ by no more than rounding alone can put between two
    orders of the same update: per step and element a few ulps of the parameter (the
    subtraction) and of the step (its own arithmetic, at most about lr for these rules
    with unit-scale gradients), added over the steps."""
    a, b = a.detach(), b.detach()
    return bool(((a - b).abs() <= steps * 4 * EPS * (b.abs() + lr)).all())


@pytest.mark.parametrize("section,torch_cls,kwargs", CASES, ids=[c[0]["name"] for c in CASES])
def test_cpu_takes_the_fused_kernel_and_follows_the_loop(host, section, torch_cls, kwargs):
    ours_p, loop_p = _params(), _params()
    ours = _build(host, section, ours_p)
    loop = torch_cls(loop_p, foreach=False, **kwargs)  # torch's per-parameter loop
    assert ours.defaults["fused"] is True
    for k in range(STEPS):
        _step(ours, ours_p, k)
        _step(loop, loop_p, k)
    for a, b, start in zip(ours_p, loop_p, _params(), strict=True):
        assert not _close(b, start, kwargs["lr"], STEPS)  # the steps moved every tensor
        assert _close(a, b, kwargs["lr"], STEPS)


@pytest.mark.parametrize("section,torch_cls,kwargs", CASES, ids=[c[0]["name"] for c in CASES])
def test_state_of_either_kernel_resumes_in_the_other(host, section, torch_cls, kwargs):
    """A checkpoint written by a fused run resumes in a loop run and back (state layout
    and step counts agree), continuing as an unbroken run does."""
    whole_p, fused_p = _params(), _params()
    whole = _build(host, section, whole_p)
    fused = _build(host, section, fused_p)
    for k in range(3):
        _step(whole, whole_p, k)
        _step(fused, fused_p, k)
    loop = torch_cls(fused_p, foreach=False, **kwargs)
    loop.load_state_dict(fused.state_dict())
    for k in range(3, 5):
        _step(whole, whole_p, k)
        _step(loop, fused_p, k)
    back = _build(host, section, fused_p)
    back.load_state_dict(loop.state_dict())
    assert back.defaults["fused"] is True
    _step(whole, whole_p, 5)
    _step(back, fused_p, 5)
    for a, b in zip(whole_p, fused_p, strict=True):
        assert _close(b, a, kwargs["lr"], STEPS)


@pytest.mark.parametrize("section", [c[0] for c in CASES], ids=[c[0]["name"] for c in CASES])
def test_meta_parameters_keep_the_default_kernel_and_step(host, section):
    params = _params("meta")
    assert fused_kernel(params) == {}
    opt = _build(host, section, params)
    assert not opt.defaults.get("fused")
    _step(opt, params, 0)  # what plan does: no values, no error


def test_fused_kernel_needs_every_parameter_on_a_device_that_has_it():
    cpu, meta = _params(), _params("meta")
    assert fused_kernel(cpu) == {"fused": True}
    assert fused_kernel(cpu + meta[:1]) == {}
    assert fused_kernel([torch.nn.Parameter(torch.ones(2, dtype=torch.bfloat16))]) == {
        "fused": True}
    assert fused_kernel([]) == {}
