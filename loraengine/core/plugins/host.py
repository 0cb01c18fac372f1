"""The plugin manager factory and the typed facade that is the only caller of hooks."""

from __future__ import annotations

import importlib
import types
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from importlib import metadata
from types import CodeType
from typing import TYPE_CHECKING

import pluggy

from loraengine.core.errors import LoraEngineError, PluginError, PluginFailed
from loraengine.core.plugins import hookspecs
from loraengine.core.plugins.registry import CATEGORIES, Registry
from loraengine.core.plugins.specs import ProvidedSpec

if TYPE_CHECKING:
    import click

    from loraengine.core.plugins.run import RunResult, RunView

#: What may be registered as a plugin: a module or any object carrying ``@hookimpl``
#: functions (pluggy reads them by attribute), so nothing narrower than ``object``.
Plugin = object

ENTRY_POINT_GROUP = "loraengine"


@dataclass(frozen=True)
class PluginFailure:
    """An external plugin that could not be loaded."""

    entry_point: str
    distribution: str | None
    error: str
    version: str | None = None

    def describe(self) -> str:
        dist = self.distribution or "unknown distribution"
        return f"plugin {self.entry_point!r} from distribution {dist!r} failed to load: {self.error}"


@dataclass(frozen=True)
class HookFailure:
    """A registered plugin whose registration hook for ``category`` raised, or returned
    something other than records of the hook's type, while its records were surveyed
    (``PluginHost.survey``). ``error`` is the whole message, naming the plugin."""

    plugin: str
    distribution: str | None
    version: str | None
    category: str
    hook: str
    error: str

    def describe(self) -> str:
        return self.error


class PluginLoadWarning(UserWarning):
    """An external plugin failed to load and was skipped."""


class PluginHost:
    """Owns the pluggy manager and makes the registry from what its plugins provide.

    Every hook call of the engine goes through a method here, so call sites are typed.
    """

    def __init__(self, pm: pluggy.PluginManager, failures: Sequence[PluginFailure] = ()):
        self.pm = pm
        self.failures: list[PluginFailure] = list(failures)
        self._registry: Registry | None = None
        self.distributions: dict[str, tuple[str | None, str | None]] = {}

    # -- registration -------------------------------------------------------------
    def register(self, plugin: Plugin, name: str | None = None, distribution: str | None = None,
                 version: str | None = None) -> str:
        """Register one plugin object (module or instance). Returns its name: ``name``,
        or else the module's name or the object's class (``#2``... after it when taken),
        which is how an error in one of its hooks names it."""
        if name is None:
            name = self._default_name(plugin)
        registered = self.pm.register(plugin, name=name)
        if registered is None:
            raise PluginError(f"plugin {name or plugin!r} is already registered")
        self.distributions[registered] = (distribution, version)
        self._registry = None
        return registered

    def _default_name(self, plugin: Plugin) -> str:
        base = getattr(plugin, "__name__", None) if isinstance(plugin, types.ModuleType) \
            else type(plugin).__qualname__
        name, n = str(base), 1
        while self.pm.get_plugin(name) is not None or self.pm.is_blocked(name):
            n += 1
            name = f"{base} #{n}"
        return name

    def unregister(self, name: str) -> None:
        self.pm.unregister(name=name)
        self.distributions.pop(name, None)
        self._registry = None

    @property
    def registry(self) -> Registry:
        """The registry of every record the registered plugins provide; made on first
        use and again after a plugin is registered or unregistered."""
        if self._registry is None:
            self._registry = Registry.of(self.records(), self.failure_note())
        return self._registry

    def records(self) -> Iterable[ProvidedSpec]:
        """Every record of every registration hook, category by category in
        registration order, with the plugin that returned it. A record of the wrong
        type for its hook is a ``PluginError``."""
        for category, (hook, record_type) in CATEGORIES.items():
            for plugin_name, spec in self.provided(hook):
                if not isinstance(spec, record_type):
                    raise PluginError(_wrong_record(plugin_name, hook, record_type, spec))
                dist, version = self.distributions.get(plugin_name, (None, None))
                yield ProvidedSpec(category, spec, plugin_name, dist, version)

    def provided(self, hook_name: str) -> Iterable[tuple[str, object]]:
        """Yield ``(plugin_name, record)`` for each record returned by ``hook_name``
        (unchecked: ``records`` checks each one's type)."""
        caller = getattr(self.pm.hook, hook_name)
        for impl in reversed(caller.get_hookimpls()):  # registration order
            try:
                # inside the guard: a result that is not iterable, or a generator that
                # raises part way, is the plugin's failure too
                result = list(impl.function() or ())
            except LoraEngineError:
                raise
            except Exception as exc:
                raise PluginFailed(impl.plugin_name, self.distribution_of(impl.plugin_name),
                                   hook_name, exc) from exc
            for spec in result:
                yield impl.plugin_name, spec

    def survey(self) -> tuple[Registry, list[HookFailure]]:
        """The registry of every record that can be had, and a ``HookFailure`` for each
        registration hook that could not give its records: it raised (an engine error
        included), or returned a record of the wrong type. That hook's records are left
        out; the plugin's other hooks, and every other plugin, still count. For listing
        what is installed: ``registry`` is what runs use, and fails at the first such
        hook. A name two plugins provide is still a ``PluginError``. Nothing is cached."""
        records: list[ProvidedSpec] = []
        failures: list[HookFailure] = []
        for category, (hook, record_type) in CATEGORIES.items():
            for impl in reversed(getattr(self.pm.hook, hook).get_hookimpls()):
                name = impl.plugin_name
                dist, version = self.distributions.get(name, (None, None))
                try:
                    specs = list(impl.function() or ())
                except Exception as exc:
                    error = str(PluginFailed(name, dist, hook, exc))
                else:
                    wrong = [s for s in specs if not isinstance(s, record_type)]
                    error = _wrong_record(name, hook, record_type, wrong[0]) if wrong else ""
                if error:
                    failures.append(HookFailure(name, dist, version, category, hook, error))
                    continue
                records.extend(ProvidedSpec(category, spec, name, dist, version)
                               for spec in specs)
        return Registry.of(records, self.failure_note()), failures

    def distribution_of(self, plugin_name: str) -> str | None:
        """The distribution a registered plugin came from (``None`` when unknown)."""
        return self.distributions.get(plugin_name, (None, None))[0]

    def failure_note(self) -> str:
        """Text to append to an unknown-name error when some plugin failed to load."""
        if not self.failures:
            return ""
        return " (note: " + "; ".join(f.describe() for f in self.failures) + ")"

    # -- lifecycle ------------------------------------------------------------------
    # Each lifecycle call runs through ``_notify``: an exception from a hook
    # implementation becomes one ``PluginFailed`` naming the plugin that raised it.
    def on_train_start(self, run: RunView) -> None:
        self._notify("loraengine_on_train_start", run=run)

    def on_step_end(self, run: RunView, step: int, metrics: dict[str, float]) -> None:
        self._notify("loraengine_on_step_end", run=run, step=step, metrics=metrics)

    def on_save(self, run: RunView, path: str, kind: str) -> None:
        self._notify("loraengine_on_save", run=run, path=path, kind=kind)

    def on_train_end(self, run: RunView, result: RunResult | None) -> None:
        self._notify("loraengine_on_train_end", run=run, result=result)

    def _notify(self, hook_name: str, **kwargs: object) -> None:
        """Call a lifecycle hook the way pluggy does (same order, the first exception
        stops the call); an exception that is not an engine error is re-raised as a
        ``PluginFailed`` naming the plugin whose implementation raised it."""
        caller = getattr(self.pm.hook, hook_name)
        try:
            caller(**kwargs)
        except LoraEngineError:
            raise
        except Exception as exc:
            plugin = self._raiser(caller.get_hookimpls(), exc)
            raise PluginFailed(plugin, self.distribution_of(plugin), hook_name, exc) from exc

    @staticmethod
    def _raiser(impls: Sequence[pluggy.HookImpl], exc: BaseException) -> str:
        """The plugin whose hook implementation ``exc`` came out of: the outermost
        frame of its traceback that runs one of ``impls``' functions."""
        by_code: dict[CodeType, str] = {}
        for impl in impls:
            code = getattr(impl.function, "__code__", None)  # bound methods forward it
            if code is not None:
                by_code[code] = impl.plugin_name
        tb = exc.__traceback__
        while tb is not None:
            found = by_code.get(tb.tb_frame.f_code)
            if found is not None:
                return found
            tb = tb.tb_next
        names = sorted({impl.plugin_name for impl in impls})
        return names[0] if len(names) == 1 else f"one of {', '.join(names)}"

    def register_commands(self, cli: click.Group) -> None:
        self.pm.hook.loraengine_register_commands(cli=cli)


def _wrong_record(plugin: str, hook: str, record_type: type, spec: object) -> str:
    return (f"plugin {plugin!r} returned {type(spec).__name__} from {hook}; "
            f"expected {record_type.__name__}")


def _distribution_of(ep: metadata.EntryPoint) -> tuple[str | None, str | None]:
    dist = getattr(ep, "dist", None)
    if dist is None:
        return None, None
    return dist.metadata["Name"], dist.version


def make_host(builtin_modules: Sequence[str] = (), *, entry_points: bool = True,
              strict: bool = False, extra: Iterable[Plugin] = ()) -> PluginHost:
    """Make a plugin host: ``builtin_modules`` (imported and registered one by one,
    exactly like external plugins), then every ``loraengine`` entry point.

    An entry point that fails to import is a ``PluginLoadWarning`` naming its
    distribution, or a ``PluginError`` when ``strict``. Name clashes between records
    surface when the registry is first built.
    """
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    host = PluginHost(pm)
    if builtin_modules:
        version = metadata.version("loraengine") if _installed() else None
        for modname in builtin_modules:
            host.register(importlib.import_module(modname), name=modname,
                          distribution="loraengine", version=version)
    if entry_points:
        for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
            dist, ver = _distribution_of(ep)
            if pm.get_plugin(ep.name) is not None:  # the same module published twice
                continue
            try:
                plugin = ep.load()
            except Exception as exc:  # a broken third-party plugin must not stop the tool
                failure = PluginFailure(ep.name, dist, f"{type(exc).__name__}: {exc}", ver)
                if strict:
                    raise PluginError(failure.describe()) from exc
                warnings.warn(failure.describe(), PluginLoadWarning, stacklevel=2)
                host.failures.append(failure)
                continue
            host.register(plugin, name=ep.name, distribution=dist, version=ver)
    for plugin in extra:
        host.register(plugin)
    pm.check_pending()
    return host


def _installed() -> bool:
    try:
        metadata.version("loraengine")
    except metadata.PackageNotFoundError:
        return False
    return True


__all__ = ["CATEGORIES", "HookFailure", "PluginFailure", "PluginHost", "PluginLoadWarning",
           "make_host"]
