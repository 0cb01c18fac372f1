"""What the conformance suites for optimizers, losses and memory strategies share: the
check of a plugin's options model, a guard that no check touches the global RNG, and the
report of what ran. (The adapter suite in ``conformance.py`` has its own cases; its
``ConformanceReport`` is the report used here too.)"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from pydantic import BaseModel, ValidationError

from loraengine.testing.conformance import ConformanceReport

__all__ = ["ConformanceReport", "Failing", "global_rng_untouched", "options_problems",
           "resolve", "run_checks"]


class Failing:
    """Makes the ``AssertionError`` of one check: ``[check] what: message``."""

    def __init__(self, where: str):
        self.where = where

    def __call__(self, check: str, msg: str) -> AssertionError:
        return AssertionError(f"[{check}] {self.where}: {msg}")


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


def resolve(model: type[BaseModel], options: Any) -> Any:
    """``None`` or a mapping -> the validated options; a model instance passes."""
    if isinstance(options, BaseModel):
        return options
    return model.model_validate(dict(options or {}))


@contextmanager
def global_rng_untouched(fail: Callable[[str], AssertionError]) -> Iterator[None]:
    """Fail when the block draws from torch's global RNG: every random number of a run
    must come from the seeded generators, or two runs with one seed differ."""
    before = torch.get_rng_state()
    yield
    if not torch.equal(before, torch.get_rng_state()):
        raise fail("drew from torch's global RNG; draw from a seeded torch.Generator")


def run_checks(name: str, checks: dict[str, Callable[[], None]],
               selected: list[str] | tuple[str, ...], case: str) -> ConformanceReport:
    """Run the ``selected`` checks in order; raise the first failure, else report."""
    unknown = [c for c in selected if c not in checks]
    if unknown:
        raise ValueError(f"unknown conformance check(s) {unknown}; choose from "
                         f"{tuple(checks)}")
    report = ConformanceReport(name)
    for check in selected:
        with torch.random.fork_rng(devices=[]):
            checks[check]()
        report.passed.append((case, check))
    return report
