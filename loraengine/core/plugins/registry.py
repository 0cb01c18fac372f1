"""The registry: every spec record the plugins provide, one name -> record map per
category. The host collects the records and makes the registry; the registry itself is
frozen and knows nothing of the host."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from types import MappingProxyType
from typing import Literal, overload

from pydantic import BaseModel

from loraengine.core.errors import ConfigError, LoraEngineError, PluginError, PluginFailed
from loraengine.core.plugins import specs as S

#: The categories of records, as ``Registry.get`` and ``names`` take them.
Category = Literal["optimizer", "loss", "adapter", "memory", "model", "lr_scheduler",
                   "exporter", "timestep_sampler", "loss_weighting", "recipe", "sampler", "logger"]

#: category -> (hook name, record type)
CATEGORIES: dict[str, tuple[str, type[S.AnySpec]]] = {
    "optimizer": ("loraengine_optimizers", S.OptimizerSpec),
    "loss": ("loraengine_losses", S.LossSpec),
    "adapter": ("loraengine_adapters", S.AdapterSpec),
    "memory": ("loraengine_memory_strategies", S.MemoryStrategySpec),
    "model": ("loraengine_models", S.ModelFamilySpec),
    "lr_scheduler": ("loraengine_lr_schedulers", S.LRSchedulerSpec),
    "exporter": ("loraengine_exporters", S.ExporterSpec),
    "timestep_sampler": ("loraengine_timestep_samplers", S.TimestepSamplerSpec),
    "loss_weighting": ("loraengine_loss_weightings", S.LossWeightingSpec),
    "recipe": ("loraengine_recipes", S.RecipeSpec),
    "sampler": ("loraengine_samplers", S.SamplerSpec),
    "logger": ("loraengine_loggers", S.LoggerSpec),
}


#: What ``Registry.specs`` returns: the list of one category's records.
_SpecList = (
    list[S.OptimizerSpec[BaseModel]] | list[S.LossSpec[BaseModel]]
    | list[S.AdapterSpec[BaseModel]] | list[S.MemoryStrategySpec]
    | list[S.ModelFamilySpec[BaseModel]] | list[S.LRSchedulerSpec[BaseModel]]
    | list[S.ExporterSpec] | list[S.TimestepSamplerSpec[BaseModel]]
    | list[S.LossWeightingSpec[BaseModel]] | list[S.RecipeSpec] | list[S.SamplerSpec[BaseModel]]
    | list[S.LoggerSpec] | list[S.AnySpec])


@dataclass(frozen=True)
class Unavailable:
    """Why a record someone asks for may be missing: a plugin that failed to load or
    whose registration hook failed (``category`` ``None``: it may have been meant to
    provide any name), or one record that was left out (``category`` and ``name``)."""

    reason: str
    category: str | None = None
    name: str | None = None

    def covers(self, category: str, name: str) -> bool:
        return self.category is None or (self.category, self.name) == (category, name)


@dataclass(frozen=True, eq=False)  # compared (and hashed, e.g. as a cache key) by identity
class Registry:
    """Every provided record, by category and name.

    Unknown-name errors end with a note of each ``unavailable`` entry that covers the
    name, and with ``failure_note`` (text made by the caller), when there are any.
    """

    entries: Mapping[str, Mapping[str, S.ProvidedSpec]]
    failure_note: str = ""
    unavailable: tuple[Unavailable, ...] = ()

    @classmethod
    def of(cls, records: Iterable[S.ProvidedSpec], failure_note: str = "",
           unavailable: Iterable[Unavailable] = ()) -> Registry:
        """The registry of ``records`` (in registration order); two records of one
        category with the same name are a ``PluginError`` naming both plugins."""
        entries: dict[str, dict[str, S.ProvidedSpec]] = {c: {} for c in CATEGORIES}
        for provided in records:
            existing = entries[provided.category].get(provided.name)
            if existing is not None:
                raise PluginError(
                    f"conflicting plugins: {provided.category} {provided.name!r} is provided "
                    f"by both {_who(existing)} and {_who(provided)}")
            entries[provided.category][provided.name] = provided
        frozen = {c: MappingProxyType(by_name) for c, by_name in entries.items()}
        return cls(MappingProxyType(frozen), failure_note, tuple(unavailable))

    def names(self, category: str) -> list[str]:
        return sorted(self.entries[category])

    @overload
    def specs(self, category: Literal["optimizer"]) -> list[S.OptimizerSpec[BaseModel]]: ...
    @overload
    def specs(self, category: Literal["loss"]) -> list[S.LossSpec[BaseModel]]: ...
    @overload
    def specs(self, category: Literal["adapter"]) -> list[S.AdapterSpec[BaseModel]]: ...
    @overload
    def specs(self, category: Literal["memory"]) -> list[S.MemoryStrategySpec]: ...
    @overload
    def specs(self, category: Literal["model"]) -> list[S.ModelFamilySpec[BaseModel]]: ...
    @overload
    def specs(self, category: Literal["lr_scheduler"]
              ) -> list[S.LRSchedulerSpec[BaseModel]]: ...
    @overload
    def specs(self, category: Literal["exporter"]) -> list[S.ExporterSpec]: ...
    @overload
    def specs(self, category: Literal["timestep_sampler"]
              ) -> list[S.TimestepSamplerSpec[BaseModel]]: ...
    @overload
    def specs(self, category: Literal["loss_weighting"]
              ) -> list[S.LossWeightingSpec[BaseModel]]: ...
    @overload
    def specs(self, category: Literal["recipe"]) -> list[S.RecipeSpec]: ...
    @overload
    def specs(self, category: Literal["sampler"]) -> list[S.SamplerSpec[BaseModel]]: ...
    @overload
    def specs(self, category: Literal["logger"]) -> list[S.LoggerSpec]: ...

    def specs(self, category: str) -> _SpecList:
        """The records of ``category``, in registration order."""
        return [p.spec for p in self.entries[category].values()]

    @overload
    def get(self, category: Literal["optimizer"], name: str) -> S.OptimizerSpec[BaseModel]: ...
    @overload
    def get(self, category: Literal["loss"], name: str) -> S.LossSpec[BaseModel]: ...
    @overload
    def get(self, category: Literal["adapter"], name: str) -> S.AdapterSpec[BaseModel]: ...
    @overload
    def get(self, category: Literal["memory"], name: str) -> S.MemoryStrategySpec: ...
    @overload
    def get(self, category: Literal["model"], name: str) -> S.ModelFamilySpec[BaseModel]: ...
    @overload
    def get(self, category: Literal["lr_scheduler"], name: str
            ) -> S.LRSchedulerSpec[BaseModel]: ...
    @overload
    def get(self, category: Literal["exporter"], name: str) -> S.ExporterSpec: ...
    @overload
    def get(self, category: Literal["timestep_sampler"], name: str
            ) -> S.TimestepSamplerSpec[BaseModel]: ...
    @overload
    def get(self, category: Literal["loss_weighting"], name: str
            ) -> S.LossWeightingSpec[BaseModel]: ...
    @overload
    def get(self, category: Literal["recipe"], name: str) -> S.RecipeSpec: ...
    @overload
    def get(self, category: Literal["sampler"], name: str) -> S.SamplerSpec[BaseModel]: ...
    @overload
    def get(self, category: Literal["logger"], name: str) -> S.LoggerSpec: ...

    def get(self, category: str, name: str) -> S.AnySpec:
        """The record ``name`` of ``category``; a ``ConfigError`` listing the installed
        names when there is none."""
        try:
            return self.entries[category][name].spec
        except KeyError:
            raise ConfigError(self.unknown(category, name)) from None

    def unknown(self, category: str, name: str) -> str:
        """The message for a name no plugin of ``category`` provides: the installed
        names, and what failed that may have been meant to provide it."""
        reasons = dict.fromkeys(u.reason for u in self.unavailable if u.covers(category, name))
        note = f" (note: {'; '.join(reasons)})" if reasons else ""
        return (f"unknown {category} {name!r}; installed: "
                f"{', '.join(self.names(category))}{note}{self.failure_note}")

    @contextmanager
    def blame(self, category: str, name: str, what: str) -> Iterator[None]:
        """Run the block as a call into the plugin behind record ``name`` of
        ``category``: an exception that is not an engine error becomes a
        ``PluginFailed`` naming that plugin, its distribution and ``what`` was called
        (e.g. ``factory``); the original stays chained for ``--debug``. Engine errors a
        plugin raises on purpose pass through unchanged.

        Example::

            spec = registry.get("optimizer", name)
            with registry.blame("optimizer", name, "factory"):
                optimizer = spec.factory(params, lr, options)
        """
        try:
            yield
        except LoraEngineError:
            raise
        except Exception as exc:
            provided = self.entries.get(category, {}).get(name)
            plugin = provided.plugin if provided is not None else "unknown"
            dist = provided.distribution if provided is not None else None
            raise PluginFailed(plugin, dist, f"{category} {name!r} {what}", exc) from exc

    def all(self) -> list[S.ProvidedSpec]:
        return [p for cat in CATEGORIES for p in self.entries[cat].values()]


def _who(p: S.ProvidedSpec) -> str:
    return f"plugin {p.plugin!r} ({p.distribution or 'no distribution'})"
