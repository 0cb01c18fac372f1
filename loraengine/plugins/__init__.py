"""The built-in plugins, registered through the same hooks as third-party packages.

``build_plugin_manager`` is the one place that names them: it hands their modules to
the engine's plugin host, then loads every ``loraengine`` entry point.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from loraengine.core.plugins.host import BUILTIN_DISTRIBUTION, PluginHost, make_host
from loraengine.core.plugins.specs import MemoryStrategySpec, ProvidedSpec, RecipeSpec

#: Built-in plugin modules, registered one by one exactly like external plugins.
BUILTIN_PLUGINS: tuple[str, ...] = (
    "loraengine.plugins.optimizers",
    "loraengine.plugins.losses",
    "loraengine.plugins.schedulers",
    "loraengine.plugins.exporters",
    "loraengine.plugins.adapters",
    "loraengine.plugins.memory",
    "loraengine.plugins.models",
    "loraengine.plugins.training",
    "loraengine.plugins.samplers",
    "loraengine.plugins.outputs.previews",
    "loraengine.plugins.outputs.plot",
    "loraengine.plugins.outputs.loggers",
)


def build_plugin_manager(*, builtins: bool = True, entry_points: bool = True,
                         strict: bool = False, extra: Iterable[Any] = ()) -> PluginHost:
    """The plugin host of a run: the built-ins (unless ``builtins=False``), every
    ``loraengine`` entry point, then ``extra`` plugin objects.

    An entry point that fails to import is a ``PluginLoadWarning`` naming its
    distribution, or a ``PluginError`` when ``strict``; so is a record of one that no
    config could be built with (``unusable_options``), when the registry is made.
    """
    return make_host(BUILTIN_PLUGINS if builtins else (), entry_points=entry_points,
                     strict=strict, extra=extra, check=unusable_options)


def unusable_options(records: Sequence[ProvidedSpec]) -> Iterator[tuple[ProvidedSpec, str]]:
    """The records whose options the config model (``build_config_model``) would refuse,
    failing every config, used or not, with why: a section plugin's option named like a
    key of the section itself or a key a memory strategy adds to it; a memory or recipe
    option, or a key a memory strategy adds to a section, that another record defines
    already. The config model's rules; where two records clash, the built-in one is
    taken to be right (then the lower ``order``, then the earlier one)."""
    from loraengine.core.config.root import PLUGIN_SECTIONS, SECTION_BASES

    def ranked(category: str) -> list[ProvidedSpec]:
        return sorted((p for p in records if p.category == category),
                      key=lambda p: (p.distribution != BUILTIN_DISTRIBUTION, _order(p)))

    unusable: list[ProvidedSpec] = []
    for category in ("memory", "recipe"):
        owners: dict[str, str] = {}
        for p in ranked(category):
            fields = set(_options(p).model_fields)
            taken = sorted(fields & owners.keys())
            if taken:
                unusable.append(p)
                yield p, (f"defines {category} option(s) {taken}, which {category} "
                          f"{owners[taken[0]]!r} defines already")
                continue
            owners.update(dict.fromkeys(fields, p.name))
    # section -> key -> who defines it: the section, then what built-in members and
    # memory strategies add (a member's own option may not be a key a strategy adds)
    keys: dict[str, dict[str, str]] = {
        section: dict.fromkeys(SECTION_BASES[section].model_fields, "the engine")
        for section in PLUGIN_SECTIONS}
    sections: dict[str, str] = {category: section
                                for section, (category, _) in PLUGIN_SECTIONS.items()}
    for p in records:
        if p.distribution == BUILTIN_DISTRIBUTION and p.category in sections:
            for key in _options(p).model_fields:
                keys[sections[p.category]].setdefault(key, f"{p.category} {p.name!r}")
    added: dict[str, set[str]] = {section: set() for section in PLUGIN_SECTIONS}
    for p in ranked("memory"):
        if any(p is u for u in unusable) or not isinstance(p.spec, MemoryStrategySpec):
            continue
        extends = {s: m for s, m in p.spec.extends.items() if s in keys}
        clash = [(s, key) for s, m in extends.items() for key in m.model_fields
                 if key in keys[s]]
        if clash:
            section, key = clash[0]
            yield p, f"adds {section} option {key!r}, which {keys[section][key]} defines already"
            continue
        for section, model in extends.items():
            keys[section].update(dict.fromkeys(model.model_fields,
                                               f"memory strategy {p.name!r}"))
            added[section].update(model.model_fields)
    for p in records:
        member_of = sections.get(p.category)
        if member_of is None or p.distribution == BUILTIN_DISTRIBUTION:
            continue
        reserved = set(SECTION_BASES[member_of].model_fields) | added[member_of]
        clash_names = sorted(reserved & set(_options(p).model_fields))
        if clash_names:
            yield p, (f"defines reserved option(s) {clash_names}, keys the {member_of} "
                      f"section has already")


def _options(p: ProvidedSpec) -> Any:
    """The options model of a record that has one."""
    return p.spec.config_model  # type: ignore[union-attr]  # only records that have one


def _order(p: ProvidedSpec) -> int:
    return p.spec.order if isinstance(p.spec, MemoryStrategySpec | RecipeSpec) else 0


__all__ = ["BUILTIN_PLUGINS", "build_plugin_manager", "unusable_options"]
