"""What the conformance suites (adapters, optimizers, losses, memory strategies) share:
the table of a suite's named checks and how they run, the report of what ran, the
failure message, the check of a plugin's options model, a guard that no check touches
the global RNG, and the relative error the checks compare with.

A check fails with an ``AssertionError`` whose message starts ``[check] where:``; an
exception the plugin's own code raises inside a check (or while the check is set up)
is turned into one too, chained to the original so its traceback stays visible."""

from __future__ import annotations

import traceback
import types
import warnings
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from pathlib import PurePath
from typing import Any, Generic, Protocol, TypeVar, cast

import torch
from pydantic import BaseModel, ConfigDict, ValidationError

__all__ = ["CheckFailed", "Checks", "ConformanceReport", "Failing", "check_options",
           "global_rng_untouched", "options_check", "options_problems", "options_text",
           "raised", "relative_error", "resolve"]

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

    def run(self, check: str, ctx: Callable[[], Ctx], where: str = "") -> None:
        """Run one check on the context ``ctx()`` builds (built inside the RNG fork, so
        whatever it draws stays there); raise ``AssertionError`` when it fails.

        Any other exception, from building the context or from the check, becomes an
        ``AssertionError`` naming the check and where it ran (the context's ``fail``,
        else ``where``), chained to the original."""
        if check not in self._fns:
            raise ValueError(f"unknown conformance check {check!r}; choose from {self.names}")
        with torch.random.fork_rng(devices=[]):
            # A plugin drawing from the global RNG must not leak state between checks.
            try:
                context = ctx()
            except CheckFailed:
                raise
            except Exception as exc:  # noqa: BLE001 — the plugin's error is the finding
                raise Failing(where)(check, raised(exc, "setting up the check")) from exc
            own = getattr(context, "fail", None)
            fail = own if isinstance(own, Failing) else Failing(where)
            try:
                self._fns[check](context)
            except CheckFailed:
                raise
            except Exception as exc:  # noqa: BLE001 — a bare assert in a plugin included
                raise fail(check, raised(exc)) from exc

    def run_all(self, name: str, ctx: Callable[[], Ctx], selected: Iterable[str],
                case: str, where: str = "") -> ConformanceReport:
        """Run the ``selected`` checks in order on one context, built by ``ctx()`` for
        the first of them and shared by the rest; raise the first failure, else report
        them as passed on ``case``."""
        selected = list(selected)
        unknown = [c for c in selected if c not in self._fns]
        if unknown:
            raise ValueError(f"unknown conformance check(s) {unknown}; choose from "
                             f"{self.names}")
        built: list[Ctx] = []

        def shared() -> Ctx:
            if not built:
                built.append(ctx())
            return built[0]

        report = ConformanceReport(name)
        for check in selected:
            self.run(check, shared, where)
            report.passed.append((case, check))
        return report


class CheckFailed(AssertionError):
    """A conformance check's failure, as :class:`Failing` makes it (any other exception
    inside a check, an ``AssertionError`` of the plugin's own included, becomes one)."""


class Failing:
    """Makes the ``AssertionError`` of one check: ``[check] what: message``."""

    def __init__(self, where: str):
        self.where = where

    def __call__(self, check: str, msg: str) -> CheckFailed:
        return CheckFailed(f"[{check}] {self.where}: {msg}")

    def if_global_rng_drawn(self, check: str) -> AbstractContextManager[None]:
        """:func:`global_rng_untouched`, failing ``check``."""
        return global_rng_untouched(lambda msg: self(check, msg))

    @contextmanager
    def calling(self, check: str, what: str) -> Iterator[None]:
        """Fail ``check`` when the block raises: ``what raised Type: message``."""
        try:
            yield
        except CheckFailed:
            raise
        except Exception as exc:  # noqa: BLE001 — the plugin's error is the finding
            raise self(check, raised(exc, what)) from exc


#: Where a failure's location is not worth naming: the frameworks the plugin calls into.
_LIBRARY_PARTS = ("/torch/", "/pydantic/", "/pydantic_core/")


def raised(exc: BaseException, what: str = "") -> str:
    """``what raised Type: message (at file.py:12 in name)`` for a failure message: the
    location is the innermost frame outside torch and pydantic, the plugin's code as a
    rule."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__)
              if not any(part in PurePath(f.filename).as_posix() for part in _LIBRARY_PARTS)]
    text = f"{what or 'the check'} raised {type(exc).__name__}"
    message = " ".join(str(exc).split())
    if message:
        text += f": {message}"
    if frames:
        last = frames[-1]
        text += f" (at {PurePath(last.filename).name}:{last.lineno} in {last.name})"
    return text


def options_problems(model: type[BaseModel], section: str | None = None,
                     name: str = "") -> list[str]:
    """What is wrong with a plugin's options model: it must forbid unknown keys, accept
    an empty mapping (every option has a default: a config naming only the plugin is
    valid), have defaults that pass its own validation (pydantic does not validate
    defaults, so ``Field(-1.0, gt=0)`` would reach the plugin as -1.0) and give a JSON
    schema (the CLI and the docs are made from it). For a record of the plugin section
    ``section`` (``optimizer``, ``loss``, ``adapter``...; ``name`` is the record's name)
    it must also leave alone the keys the engine gives every choice of that section
    (``optimizer.lr``...): the engine refuses a plugin defining one."""
    problems = []
    if not (isinstance(model, type) and issubclass(model, BaseModel)):
        return [f"config_model {model!r} is not a pydantic model"]
    if model.model_config.get("extra") != "forbid":
        problems.append("the options model does not forbid unknown keys (derive it from "
                        "loraengine.PluginOptions)")
    try:
        model.model_validate({})
    except ValidationError as exc:
        missing = [_loc(e["loc"]) for e in exc.errors() if e["type"] == "missing"]
        other = [e for e in exc.errors() if e["type"] != "missing"]
        if missing:
            problems.append(f"options without a default: {', '.join(missing)}")
        if other:
            problems.append("an empty mapping does not validate: "
                            + "; ".join(f"{_loc(e['loc'])}: {e['msg']}" for e in other))
    problems += _default_problems(model)
    if section is not None:
        problems += _reserved_problems(model, section, name)
    try:
        model.model_json_schema()
    except Exception as exc:  # noqa: BLE001 — any failure here is the finding
        problems.append(f"no JSON schema: {type(exc).__name__}: {exc}")
    return problems


def _loc(loc: Iterable[Any]) -> str:
    return ".".join(map(str, loc)) or "(the model)"


def _default_problems(model: type[BaseModel]) -> list[str]:
    """One line per option whose default its own field refuses, found by validating an
    empty mapping with pydantic's ``validate_default`` switched on (in a subclass)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a subclass may repeat the model's own warnings
        try:
            checked = cast("type[BaseModel]", types.new_class(
                model.__name__, (model,), exec_body=lambda ns: ns.update(
                    __module__=model.__module__,
                    model_config=ConfigDict(validate_default=True))))
            checked.model_validate({})
        except ValidationError as exc:
            # (errors of the whole model are the empty mapping's, reported above)
            return [f"option {_loc(e['loc'])} has a default that does not validate "
                    f"({e['input']!r}): {e['msg']}"
                    for e in exc.errors() if e["type"] != "missing" and e["loc"]]
        except Exception as exc:  # noqa: BLE001 — a default that breaks validation
            return [f"validating the defaults failed: {raised(exc)}"]
    return []


def _reserved_problems(model: type[BaseModel], section: str, name: str) -> list[str]:
    """The engine's refusal of a plugin whose options define a key of every choice of
    ``section`` (``core/config/root.py`` builds each choice on ``SECTION_BASES``)."""
    from loraengine.core.config.root import SECTION_BASES

    base = SECTION_BASES.get(section)
    if base is None:
        return []
    clash = sorted(set(base.model_fields) & set(model.model_fields))
    if not clash:
        return []
    keys = ", ".join(f"{section}.{k}" for k in base.model_fields)
    return [f"{section} plugin {name!r} defines reserved option(s) {clash}: the engine "
            f"refuses the plugin ({keys} are the engine's keys of every {section})"]


class _WithOptions(Protocol):
    @property
    def name(self) -> str: ...

    @property
    def config_model(self) -> type[BaseModel]: ...


class PluginContext(Protocol):
    """What :func:`check_options` needs of a suite's context."""

    @property
    def spec(self) -> _WithOptions: ...

    @property
    def fail(self) -> Failing: ...


def options_check(section: str | None) -> Callable[[PluginContext], None]:
    """The ``options`` check of a suite whose records are chosen in the plugin section
    ``section`` (``None``: a merged section such as ``memory``): raise when
    :func:`options_problems` finds anything wrong with the spec's options model."""
    def check(c: PluginContext) -> None:
        problems = options_problems(c.spec.config_model, section, c.spec.name)
        if problems:
            raise c.fail("options", "; ".join(problems))

    return check


#: The ``options`` check without a plugin section's reserved keys (memory strategies).
check_options = options_check(None)


def options_text(options: Any) -> dict[str, Any]:
    """The options as a dict for a failure message (no warning for a default of the
    wrong type, which the ``options`` check reports); ``{}`` for anything else."""
    if not isinstance(options, BaseModel):
        return {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return options.model_dump()


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
