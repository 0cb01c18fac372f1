"""The memory-strategy conformance suite: what every ``MemoryStrategySpec``, built in or
third party, must satisfy. A memory strategy trades time for memory; it must not change
what is trained, touch the frozen base, or leave anything behind on the model.

Each check trains ``TinyDenoiser`` for two SGD steps from ``tiny_train_config`` (every
built-in strategy off) with and without ``enable``, the config overlay that switches
the strategy on (``{"memory": {"my_option": True}}``). The checks:

- ``options``: the options model forbids unknown keys, has a valid default for every
  option and gives a JSON schema;
- ``switch``: ``enabled(config)`` is true with the overlay and false without it, and
  ``validate`` (when given) finds no problem in either config;
- ``same_training``: the loss map and the trained adapter tensors match the run without
  the strategy (within ``rtol`` relative; a lossy strategy such as a quantized base
  passes a looser one);
- ``frozen_base``: while it is applied, the optimizer holds exactly the adapter's
  trainable parameters and no base parameter requires a gradient; after training and
  ``close()`` every base parameter is as before (bit for bit unless ``restore_rtol``
  allows a lossy round trip, as a quantized base needs);
- ``restores``: after ``Pipeline.close()`` every module of the model has its class,
  forward, hooks and parameter names back, and the bare model's output matches the
  output before training (bit for bit unless ``restore_rtol`` says otherwise).

Use it in one line::

    from loraengine.testing.memory_conformance import run_memory_conformance
    run_memory_conformance(MY_SPEC, enable={"memory": {"my_option": True}})

Every failure is an ``AssertionError`` naming the strategy and the check, also when the
strategy's own code raises.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from loraengine.core.plugins.specs import MemoryStrategySpec
from loraengine.testing.harness import (
    TinyData,
    deep_merge,
    registered,
    tiny_data,
    tiny_train_config,
)
from loraengine.testing.suite import (
    Checks,
    ConformanceReport,
    Failing,
    check_options,
    relative_error,
)

__all__ = ["MEMORY_CHECKS", "run_memory_check", "run_memory_conformance"]


def _module_state(model: nn.Module) -> dict[str, tuple[Any, ...]]:
    """What a strategy may change while applied and must put back."""
    return {name: (type(m), "forward" in m.__dict__, len(m._forward_hooks),
                   len(m._forward_pre_hooks), len(m._backward_hooks),
                   len(getattr(m, "_backward_pre_hooks", {})),
                   tuple(sorted(n for n, _ in m.named_parameters(recurse=False))))
            for name, m in model.named_modules()}


@torch.no_grad()
def _bare_output(model: nn.Module, data: TinyData) -> torch.Tensor:
    t = torch.tensor([10, 500], dtype=torch.long)
    return model(data.latents[:2], t, data.conditioning[:2]).detach().clone()


class _Ctx:
    def __init__(self, spec: MemoryStrategySpec, enable: Mapping[str, Any], host: Any,
                 model_factory: Callable[[], nn.Module], rtol: float, restore_rtol: float):
        self.spec, self.enable, self.host = spec, dict(enable), host
        self.model_factory, self.rtol, self.restore_rtol = model_factory, rtol, restore_rtol
        self.data = tiny_data()
        self.fail = Failing(f"memory strategy {spec.name!r} (enabled by {self.enable})")

    def config(self, enabled: bool) -> Any:
        from loraengine.core.config.root import parse_config

        # SGD keeps the trained tensors linear in the gradients, so a lossy strategy's
        # error shows up in proportion rather than through Adam's normalisation.
        base = tiny_train_config({"optimizer": {"name": "sgd", "lr": 0.05}})
        return parse_config(deep_merge(base, self.enable) if enabled else base,
                            self.host.registry)

    def pipeline(self, enabled: bool, model: nn.Module | None = None) -> Any:
        from loraengine.core.build import build_pipeline

        return build_pipeline(self.config(enabled), self.host,
                              model=model or self.model_factory(),
                              latents=self.data.latents, conditioning=self.data.conditioning)

    def train(self, enabled: bool) -> Any:
        return self.run(self.pipeline(enabled))

    def run(self, pipe: Any, before: Callable[[Any], None] | None = None) -> Any:
        """Train ``pipe`` (after ``before(pipe)``, when given) and close it whatever
        happens; return the ``TrainResult``."""
        from loraengine.core.train.loop import Trainer

        try:
            if before is not None:
                before(pipe)
            return Trainer(pipe, write_files=False).run()
        finally:
            pipe.close()


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return relative_error(a, b, torch.float64)


_TABLE: Checks[_Ctx] = Checks()
_TABLE("options")(check_options)


@_TABLE("switch")
def _check_switch(c: _Ctx) -> None:
    on, off = c.config(True), c.config(False)
    if not c.spec.enabled(on):
        raise c.fail("switch", "enabled(config) is false with the overlay that should "
                     "switch it on")
    if c.spec.enabled(off):
        raise c.fail("switch", "enabled(config) is true in a config that does not ask for "
                     "it (every built-in strategy off)")
    if c.spec.validate is not None:
        for label, cfg in (("with", on), ("without", off)):
            problems = c.spec.validate(cfg)
            if not isinstance(problems, list) or problems:
                raise c.fail("switch", f"validate() {label} the overlay returned "
                             f"{problems!r}, expected []")


@_TABLE("same_training")
def _check_same_training(c: _Ctx) -> None:
    plain, with_it = c.train(False), c.train(True)
    want, got = plain.loss_map["loss"], with_it.loss_map["loss"]
    if len(got) != len(want):
        raise c.fail("same_training", f"{len(got)} steps recorded, expected {len(want)}")
    err = _relative(torch.tensor(got), torch.tensor(want))
    if not err <= c.rtol:
        raise c.fail("same_training", f"losses {got} differ from {want} without the "
                     f"strategy ({err:.3g} relative, tolerance {c.rtol:g})")
    if set(with_it.lora) != set(plain.lora):
        raise c.fail("same_training", "the trained adapter has other tensors than without "
                     "the strategy")
    for key, value in plain.lora.items():
        err = _relative(with_it.lora[key], value)
        if not err <= c.rtol:
            raise c.fail("same_training", f"adapter tensor {key} differs from the run "
                         f"without the strategy by {err:.3g} relative (tolerance {c.rtol:g})")


@_TABLE("frozen_base")
def _check_frozen_base(c: _Ctx) -> None:
    def while_applied(pipe: Any) -> None:
        held = {id(p) for g in pipe.optimizer.param_groups for p in g["params"]}
        trainable = {id(p) for p in pipe.trainable_parameters()}
        if held != trainable:
            raise c.fail("frozen_base", "the optimizer does not hold exactly the adapter's "
                         "trainable parameters")
        grad_on = [n for n, p in pipe.model.named_parameters() if p.requires_grad]
        if grad_on:
            raise c.fail("frozen_base", f"base parameters require a gradient: {grad_on[:5]}")

    model = c.model_factory()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    c.run(c.pipeline(True, model), while_applied)
    for name, p in model.named_parameters():
        if name in before:
            err = _relative(p, before[name])
            if not err <= c.restore_rtol:
                raise c.fail("frozen_base", f"training changed the base parameter {name} "
                             f"({err:.3g} relative, tolerance {c.restore_rtol:g})")


@_TABLE("restores")
def _check_restores(c: _Ctx) -> None:
    model = c.model_factory()
    state, out = _module_state(model), _bare_output(model, c.data)
    c.run(c.pipeline(True, model))
    after = _module_state(model)
    for name, was in state.items():
        now = after.get(name)
        if now != was:
            raise c.fail("restores", f"module {name or '<root>'} is not as it was after "
                         f"close(): (class, own forward, hooks..., parameters) {was} -> {now}")
    if set(after) != set(state):
        raise c.fail("restores", f"modules added or removed: "
                     f"{sorted(set(after) ^ set(state))[:5]}")
    model.to(torch.float32)
    err = _relative(_bare_output(model, c.data), out)
    if not err <= c.restore_rtol:
        raise c.fail("restores", f"the bare model's output after close() differs by "
                     f"{err:.3g} relative (tolerance {c.restore_rtol:g})")


#: The checks, in the order they run.
MEMORY_CHECKS: tuple[str, ...] = _TABLE.names


@contextmanager
def _host_with(spec: MemoryStrategySpec, host: Any) -> Iterator[Any]:
    """``host`` (default: the built-ins) with ``spec`` registered unless it is there."""
    if host is None:
        from loraengine.plugins import build_plugin_manager

        host = build_plugin_manager(entry_points=False)
    provided = host.registry.entries["memory"].get(spec.name)
    if provided is not None and provided.spec is spec:
        yield host
        return
    with registered(host, spec, name=f"conformance:{spec.name}"):
        yield host


def _default_model() -> nn.Module:
    from loraengine.testing.models import TinyDenoiser

    return TinyDenoiser()


def run_memory_check(spec: MemoryStrategySpec, check: str, enable: Mapping[str, Any], *,
                     host: Any = None, model_factory: Callable[[], nn.Module] | None = None,
                     rtol: float = 1e-5, restore_rtol: float = 0.0) -> None:
    """Run one check; raise ``AssertionError`` when it fails."""
    run_memory_conformance(spec, enable, host=host, model_factory=model_factory, rtol=rtol,
                           restore_rtol=restore_rtol, checks=(check,))


def run_memory_conformance(spec: MemoryStrategySpec, enable: Mapping[str, Any], *,
                           host: Any = None,
                           model_factory: Callable[[], nn.Module] | None = None,
                           rtol: float = 1e-5, restore_rtol: float = 0.0,
                           checks: Iterable[str] = MEMORY_CHECKS) -> ConformanceReport:
    """Run the checks on ``spec``, switched on by the config overlay ``enable``; raise
    ``AssertionError`` on the first failure, else return what ran. ``host`` defaults to
    the built-ins (``spec`` is registered on it for the run when it is not there)."""
    with _host_with(spec, host) as h:
        return _TABLE.run_all(
            spec.name, lambda: _Ctx(spec, enable, h, model_factory or _default_model, rtol,
                                    restore_rtol),
            checks, "tiny_denoiser", f"memory strategy {spec.name!r} (enabled by {dict(enable)})")
