"""What the conformance suites (adapters, optimizers, losses, memory strategies) share:
the table of a suite's named checks and how they run, the report of what ran, the
failure message, the check of a plugin's options model, a guard that no check touches
the global RNG, and the relative error the checks compare with."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar

import torch
from pydantic import BaseModel, ValidationError

__all__ = ["Checks", "ConformanceReport", "Failing", "check_options", "global_rng_untouched",
           "options_problems", "relative_error", "resolve"]

Ctx = TypeVar("Ctx")


@dataclass
class ConformanceReport:
    """Which (case, check) pairs ran and which cases the plugin does not support."""

    algorithm: str
    passed: list[tuple[str, str]] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


class Checks(Generic[Ctx]):
    """The named checks of one suite, in the order they are declared; each is a function
    of the suite's context object. Declared with ``@CHECKS_TABLE("name")``."""

    def __init__(self) -> None:
        self._fns: dict[str, Callable[[Ctx], None]] = {}

    def __call__(self, name: str) -> Callable[[Callable[[Ctx], None]], Callable[[Ctx], None]]:
        def declare(fn: Callable[[Ctx], None]) -> Callable[[Ctx], None]:
            self._fns[name] = fn
            return fn

        return declare

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self._fns)

    def run(self, check: str, ctx: Callable[[], Ctx]) -> None:
        """Run one check on the context ``ctx()`` builds (built inside the RNG fork, so
        whatever it draws stays there); raise ``AssertionError`` when it fails."""
        if check not in self._fns:
            raise ValueError(f"unknown conformance check {check!r}; choose from {self.names}")
        with torch.random.fork_rng(devices=[]):
            # A plugin drawing from the global RNG must not leak state between checks.
            self._fns[check](ctx())

    def run_all(self, name: str, ctx: Ctx, selected: Iterable[str],
                case: str) -> ConformanceReport:
        """Run the ``selected`` checks in order on one shared ``ctx``; raise the first
        failure, else report them as passed on ``case``."""
        selected = list(selected)
        unknown = [c for c in selected if c not in self._fns]
        if unknown:
            raise ValueError(f"unknown conformance check(s) {unknown}; choose from "
                             f"{self.names}")
        report = ConformanceReport(name)
        for check in selected:
            self.run(check, lambda: ctx)
            report.passed.append((case, check))
        return report


class Failing:
    """Makes the ``AssertionError`` of one check: ``[check] what: message``."""

    def __init__(self, where: str):
        self.where = where

    def __call__(self, check: str, msg: str) -> AssertionError:
        return AssertionError(f"[{check}] {self.where}: {msg}")

    def if_global_rng_drawn(self, check: str) -> AbstractContextManager[None]:
        """:func:`global_rng_untouched`, failing ``check``."""
        return global_rng_untouched(lambda msg: self(check, msg))


def options_problems(model: type[BaseModel]) -> list[str]:
    """What is wrong with a plugin's options model: it must forbid unknown keys, accept
    an empty mapping (every option has a default: a config naming only the plugin is
    valid) and give a JSON schema (the CLI and the docs are made from it)."""
    problems = []
    if not (isinstance(model, type) and issubclass(model, BaseModel)):
        return [f"config_model {model!r} is not a pydantic model"]
    if model.model_config.get("extra") != "forbid":
        problems.append("the options model does not forbid unknown keys (derive it from "
                        "loraengine.PluginOptions)")
    try:
        model.model_validate({})
    except ValidationError as exc:
        missing = [".".join(map(str, e["loc"])) for e in exc.errors()]
        problems.append(f"options without a default: {', '.join(missing)}")
    try:
        model.model_json_schema()
    except Exception as exc:  # noqa: BLE001 — any failure here is the finding
        problems.append(f"no JSON schema: {type(exc).__name__}: {exc}")
    return problems


class _WithOptions(Protocol):
    @property
    def config_model(self) -> type[BaseModel]: ...


class PluginContext(Protocol):
    """What :func:`check_options` needs of a suite's context."""

    @property
    def spec(self) -> _WithOptions: ...

    @property
    def fail(self) -> Failing: ...


def check_options(c: PluginContext) -> None:
    """The ``options`` check every plugin suite has: raise when :func:`options_problems`
    finds anything wrong with the spec's options model."""
    problems = options_problems(c.spec.config_model)
    if problems:
        raise c.fail("options", "; ".join(problems))


def resolve(model: type[BaseModel], options: Any) -> Any:
    """``None`` or a mapping -> the validated options; a model instance passes."""
    if isinstance(options, BaseModel):
        return options
    return model.model_validate(dict(options or {}))


def relative_error(a: torch.Tensor, b: torch.Tensor,
                   dtype: torch.dtype = torch.float32) -> float:
    """max |a−b| over max |b|, both computed in ``dtype``."""
    a, b = a.detach().to(dtype), b.detach().to(dtype)
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


@contextmanager
def global_rng_untouched(fail: Callable[[str], AssertionError]) -> Iterator[None]:
    """Fail when the block draws from torch's global RNG: every random number of a run
    must come from the seeded generators, or two runs with one seed differ."""
    before = torch.get_rng_state()
    yield
    if not torch.equal(before, torch.get_rng_state()):
        raise fail("drew from torch's global RNG; draw from a seeded torch.Generator")
