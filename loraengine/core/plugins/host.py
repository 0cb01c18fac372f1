"""The plugin manager factory and the typed facade that is the only caller of hooks."""

from __future__ import annotations

import difflib
import importlib
import types
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from importlib import metadata
from types import CodeType
from typing import TYPE_CHECKING

import pluggy

from loraengine.core.errors import LoraEngineError, PluginError, PluginFailed
from loraengine.core.plugins import hookspecs
from loraengine.core.plugins.registry import CATEGORIES, Registry, Unavailable
from loraengine.core.plugins.specs import ProvidedSpec

if TYPE_CHECKING:
    import click

    from loraengine.core.plugins.run import RunResult, RunView

#: What may be registered as a plugin: a module or any object carrying ``@hookimpl``
#: functions (pluggy reads them by attribute), so nothing narrower than ``object``.
Plugin = object

ENTRY_POINT_GROUP = "loraengine"

#: The distribution of the built-in plugins: in a name clash, their record is the one kept.
BUILTIN_DISTRIBUTION = "loraengine"

#: A check of the records that will make the registry, against what the rest of the
#: engine requires of them (e.g. option names a config section reserves): yields each
#: record that cannot be used, with the reason (a phrase: "defines ..."). The engine's
#: config rules live outside this package, so ``make_host`` is handed the check.
RecordCheck = Callable[[Sequence[ProvidedSpec]], Iterable[tuple[ProvidedSpec, str]]]


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
    """Records of a registered plugin that were left out of a registry: its registration
    hook for ``category`` raised, or returned something other than a list of the hook's
    records (``name`` is ``None``: all of that hook's records); or one record, ``name``,
    could not be used (a name another plugin provides too, reserved option names).
    ``error`` is the whole message, naming the plugin and its distribution."""

    plugin: str
    distribution: str | None
    version: str | None
    category: str
    hook: str
    error: str
    name: str | None = None

    def describe(self) -> str:
        return self.error

    def warning(self) -> str:
        """The text of the ``PluginLoadWarning`` for it: the error and what was left out
        (a one-record error says so itself)."""
        if self.name is not None:
            return self.error
        return f"{self.error}; its {self.category} records are left out"

    def unavailable(self) -> Unavailable:
        """The note for an unknown name that this failure may explain: any name when a
        whole hook failed (it may have returned records of another category), the one
        name otherwise."""
        if self.name is None:
            return Unavailable(self.error)
        return Unavailable(self.error, self.category, self.name)


class PluginLoadWarning(UserWarning):
    """An external plugin, or some of its records, failed to load and was left out."""


def _warn(message: str) -> None:
    warnings.warn(message, PluginLoadWarning, stacklevel=3)  # at who asked for the registry


class PluginHost:
    """Owns the pluggy manager and makes the registry from what its plugins provide.

    Every hook call of the engine goes through a method here, so call sites are typed.
    """

    def __init__(self, pm: pluggy.PluginManager, failures: Sequence[PluginFailure] = (), *,
                 strict: bool = False, check: RecordCheck | None = None):
        self.pm = pm
        self.failures: list[PluginFailure] = list(failures)
        self._registry: Registry | None = None
        self.distributions: dict[str, tuple[str | None, str | None]] = {}
        self.strict = strict
        #: The plugins loaded from entry points. Unless ``strict``, a registration hook
        #: of theirs that fails, or a record of theirs that cannot be used, leaves those
        #: records out of the registry with a warning: a broken installed package must
        #: not stop runs that never use it. Any other plugin's failure is an error.
        self.installed: set[str] = set()
        #: What was left out of the registry so far (see ``installed``).
        self.dropped: list[HookFailure] = []
        #: How each of ``dropped`` is reported, once: a ``PluginLoadWarning`` unless
        #: replaced (the command line prints a ``warning:`` line).
        self.report: Callable[[str], None] = _warn
        self._reported: set[str] = set()
        self._check = check

    # -- registration -------------------------------------------------------------
    def register(self, plugin: Plugin, name: str | None = None, distribution: str | None = None,
                 version: str | None = None) -> str:
        """Register one plugin object (module or instance). Returns its name: ``name``,
        or else the module's name or the object's class (``#2``... after it when taken),
        which is how an error in one of its hooks names it. A plugin pluggy refuses (an
        implementation of a hook the engine does not have, an argument its hookspec does
        not declare) is a ``PluginError`` naming it, and stays unregistered."""
        if name is None:
            name = self._default_name(plugin)
        try:
            registered = self._register(plugin, name, distribution, version)
        except pluggy.PluginValidationError as exc:
            raise PluginError(PluginFailure(name, distribution, _reason(exc), version)
                              .describe()) from exc
        if registered is None:
            raise PluginError(f"plugin {name or plugin!r} is already registered")
        return registered

    def _register(self, plugin: Plugin, name: str, distribution: str | None,
                  version: str | None) -> str | None:
        """``pm.register`` (``None``: the name is blocked), and what ``pm.check_pending``
        would find, for this plugin alone: an implementation of a hook that has no spec
        is a ``PluginValidationError`` too, and leaves the plugin unregistered."""
        registered = self.pm.register(plugin, name=name)
        if registered is None:
            return None
        unknown = self._unknown_hook(plugin, registered)
        if unknown:
            self.pm.unregister(name=registered)
            raise pluggy.PluginValidationError(plugin, unknown)
        self.distributions[registered] = (distribution, version)
        self._registry = None
        return registered

    def _unknown_hook(self, plugin: Plugin, name: str) -> str:
        """Why ``plugin`` implements a hook the engine does not have (a misspelt hook
        name, mostly), or ``""``."""
        callers = vars(self.pm.hook).values()
        for caller in self.pm.get_hookcallers(plugin) or ():
            if caller.has_spec() or all(impl.plugin is not plugin or impl.optionalhook
                                        for impl in caller.get_hookimpls()):
                continue
            known = [c.name for c in callers if isinstance(c, pluggy.HookCaller)
                     and c.has_spec()]
            close = difflib.get_close_matches(caller.name, known, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            return f"unknown hook {caller.name!r} in plugin {name!r}{hint}"
        return ""

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
        use and again after a plugin is registered or unregistered. What an installed
        plugin fails to provide is left out (see ``installed``) and reported once
        through ``report``; an unknown name then notes why."""
        if self._registry is None:
            registry, failures = self._collect(self._tolerated)
            for failure in failures:
                if failure not in self.dropped:
                    self.dropped.append(failure)
                text = failure.warning()
                if text not in self._reported:  # two plugins of one clash share a text
                    self._reported.add(text)
                    self.report(text)
            self._registry = registry
        return self._registry

    def _tolerated(self, plugin: str) -> bool:
        return not self.strict and plugin in self.installed

    def survey(self) -> tuple[Registry, list[HookFailure]]:
        """The registry of every record that can be had, and a ``HookFailure`` for each
        registration hook that could not give its records (it raised, an engine error
        included, or returned something other than a list of its records) and for each
        record that cannot be used (a name a built-in or another plugin provides too;
        reserved option names). Those records are left out; the plugin's other records,
        and every other plugin, still count. For listing what is installed: every plugin
        is treated the way ``registry`` treats installed ones, and nothing is reported
        or cached."""
        return self._collect(lambda plugin: True)

    def _collect(self, tolerate: Callable[[str], bool]) -> tuple[Registry, list[HookFailure]]:
        """The one way records become a registry (``registry`` and ``survey`` differ in
        ``tolerate`` only): every record of every registration hook, category by
        category in registration order, with the plugin that returned it. A failure of
        a plugin ``tolerate`` accepts leaves its records out and is returned; any other
        plugin's is raised: what its hook raised (an engine error as it is, anything
        else as a ``PluginFailed``), or a ``PluginError``."""
        records: list[ProvidedSpec] = []
        failures: list[HookFailure] = []
        for category, (hook, record_type) in CATEGORIES.items():
            for impl in reversed(getattr(self.pm.hook, hook).get_hookimpls()):  # in order
                name = impl.plugin_name
                dist, version = self.distributions.get(name, (None, None))
                try:
                    # inside the guard: a result that is not iterable, or a generator that
                    # raises part way, is the plugin's failure too
                    result = impl.function()
                    specs = [] if _is_record(result) else list(result or ())
                except Exception as exc:
                    if not tolerate(name):
                        if isinstance(exc, LoraEngineError):
                            raise
                        raise PluginFailed(name, dist, hook, exc) from exc
                    error = str(PluginFailed(name, dist, hook, exc))
                else:
                    error = _bad_result(name, dist, hook, record_type, result, specs)
                    if error and not tolerate(name):
                        raise PluginError(error)
                if error:
                    failures.append(HookFailure(name, dist, version, category, hook, error))
                    continue
                records.extend(ProvidedSpec(category, spec, name, dist, version)
                               for spec in specs)
        records = self._settle_clashes(records, tolerate, failures)
        records = self._checked(records, tolerate, failures)
        unavailable = [Unavailable(f.describe()) for f in self.failures]
        unavailable += [f.unavailable() for f in failures]
        return Registry.of(records, unavailable=unavailable), failures

    def _settle_clashes(self, records: list[ProvidedSpec], tolerate: Callable[[str], bool],
                        failures: list[HookFailure]) -> list[ProvidedSpec]:
        """``records`` less those a name clash leaves out, each one a failure. Of the
        records of one category and name, a built-in's is kept, and so is one of a
        plugin ``tolerate`` does not accept; the others are left out (all of them when
        none is kept). Two kept ones stay for ``Registry.of`` to refuse."""
        groups: dict[tuple[str, str], list[ProvidedSpec]] = {}
        for provided in records:
            groups.setdefault((provided.category, provided.name), []).append(provided)
        left_out: list[ProvidedSpec] = []
        for (category, name), group in groups.items():
            if len(group) < 2:
                continue
            kept = [p for p in group
                    if p.distribution == BUILTIN_DISTRIBUTION or not tolerate(p.plugin)]
            others = [p for p in group if not any(p is k for k in kept)]
            for provided in others:
                if kept:
                    error = (f"{_record(provided)} is left out: {_who(kept[0])} provides "
                             f"that name already")
                else:
                    error = f"{category} {name!r} is left out: {_providers(group)}"
                failures.append(_record_failure(provided, error))
            left_out += others
        return [p for p in records if not any(p is q for q in left_out)]

    def _checked(self, records: list[ProvidedSpec], tolerate: Callable[[str], bool],
                 failures: list[HookFailure]) -> list[ProvidedSpec]:
        """``records`` less those the host's ``check`` finds unusable, each one a failure.
        A built-in's record is kept (the engine's own bug, which the config model
        reports), and so is one of a plugin neither installed nor accepted by
        ``tolerate`` (the same); an installed plugin's under ``strict`` is an error."""
        if self._check is None:
            return records
        unusable: list[ProvidedSpec] = []
        for provided, reason in self._check(records):
            if provided.distribution == BUILTIN_DISTRIBUTION:
                continue
            if tolerate(provided.plugin):
                failures.append(_record_failure(
                    provided, f"{_record(provided)} is left out: it {reason}"))
                unusable.append(provided)
            elif provided.plugin in self.installed:
                raise PluginError(f"{_record(provided)} cannot be used: it {reason}")
        return [p for p in records if not any(p is q for q in unusable)]

    def distribution_of(self, plugin_name: str) -> str | None:
        """The distribution a registered plugin came from (``None`` when unknown)."""
        return self.distributions.get(plugin_name, (None, None))[0]

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


def _is_record(obj: object) -> bool:
    return isinstance(obj, tuple(record_type for _, record_type in CATEGORIES.values()))


def _bad_result(plugin: str, dist: str | None, hook: str, record_type: type, result: object,
                specs: list[object]) -> str:
    """Why what a registration hook returned (``result``, as the list ``specs``) is not
    a list of ``record_type`` records, or ``""``."""
    who = f"plugin {plugin!r}" + (f" (distribution {dist!r})" if dist else "")
    if _is_record(result):
        return (f"{who} returned a bare {type(result).__name__} from {hook}; expected a "
                f"list of {record_type.__name__}")
    wrong = [s for s in specs if not isinstance(s, record_type)]
    if wrong:
        return f"{who} returned {type(wrong[0]).__name__} from {hook}; expected " \
               f"{record_type.__name__}"
    return ""


def _record(p: ProvidedSpec) -> str:
    return (f"{p.category} {p.name!r} of plugin {p.plugin!r} "
            f"(distribution {p.distribution or 'unknown'!r})")


def _who(p: ProvidedSpec) -> str:
    return f"plugin {p.plugin!r} (distribution {p.distribution or 'unknown'!r})"


def _providers(group: Sequence[ProvidedSpec]) -> str:
    """Why none of ``group`` (records of one category and name, from plugins that may
    all be left out) is used."""
    plugins = sorted({p.plugin for p in group})  # not in entry point order: that varies
    if len(plugins) == 1:
        return f"{_who(group[0])} returns {len(group)} records of that name"
    whos = [_who(next(p for p in group if p.plugin == name)) for name in plugins]
    if len(whos) == 2:
        return f"{whos[0]} and {whos[1]} both provide it; uninstall one to use the other"
    return f"{', '.join(whos[:-1])} and {whos[-1]} all provide it; uninstall all but one " \
           f"to use it"


def _record_failure(p: ProvidedSpec, error: str) -> HookFailure:
    return HookFailure(p.plugin, p.distribution, p.version, p.category,
                       CATEGORIES[p.category][0], error, p.name)


def _reason(exc: BaseException) -> str:
    """``exc`` as one line: its type and every line of its message (pluggy spreads the
    reason it refuses a plugin over several)."""
    text = "; ".join(line.strip() for line in str(exc).splitlines() if line.strip())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _distribution_of(ep: metadata.EntryPoint) -> tuple[str | None, str | None]:
    dist = getattr(ep, "dist", None)
    if dist is None:
        return None, None
    return dist.metadata["Name"], dist.version


def make_host(builtin_modules: Sequence[str] = (), *, entry_points: bool = True,
              strict: bool = False, extra: Iterable[Plugin] = (),
              check: RecordCheck | None = None) -> PluginHost:
    """Make a plugin host: ``builtin_modules`` (imported and registered one by one,
    exactly like external plugins), then every ``loraengine`` entry point, then
    ``extra``; ``check`` vets the records that make its registry.

    An entry point that fails to import, or that pluggy refuses (a misspelt hook name,
    an argument the hookspec does not declare), is a ``PluginLoadWarning`` naming its
    distribution and is skipped, or a ``PluginError`` when ``strict``. What an entry
    point's hooks fail to provide surfaces when the registry is first made: left out
    with a warning, or an error when ``strict`` (``PluginHost.installed``).
    """
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    host = PluginHost(pm, strict=strict, check=check)
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
                if pm.is_registered(plugin):  # ... or under two entry point names
                    continue
                registered = host._register(plugin, ep.name, dist, ver)
                if registered is None:
                    raise PluginError(f"it loads as {plugin!r}, which pluggy does not register")
            except Exception as exc:  # a broken third-party plugin must not stop the tool
                failure = PluginFailure(ep.name, dist, _reason(exc), ver)
                if strict:
                    raise PluginError(failure.describe()) from exc
                warnings.warn(failure.describe(), PluginLoadWarning, stacklevel=2)
                host.failures.append(failure)
                continue
            host.installed.add(registered)
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


__all__ = ["BUILTIN_DISTRIBUTION", "CATEGORIES", "HookFailure", "PluginFailure", "PluginHost",
           "PluginLoadWarning", "RecordCheck", "make_host"]
