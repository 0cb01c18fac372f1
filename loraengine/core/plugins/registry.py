"""Collects the spec records of every plugin into one name -> record map per category."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from loraengine.core.errors import ConfigError, PluginError
from loraengine.core.plugins import specs as S

if TYPE_CHECKING:
    from loraengine.core.plugins.host import PluginHost

#: category -> (hook name, record type)
CATEGORIES: dict[str, tuple[str, type]] = {
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
}


@dataclass
class Registry:
    """Every provided record, by category and name."""

    entries: dict[str, dict[str, S.ProvidedSpec]] = field(default_factory=dict)
    host: Any = None
    config_model: Any = None  # the root config model, built on first use

    @classmethod
    def collect(cls, host: PluginHost) -> Registry:
        reg = cls(entries={c: {} for c in CATEGORIES}, host=host)
        for category, (hook, record_type) in CATEGORIES.items():
            for plugin_name, spec in host.provided(hook):
                if not isinstance(spec, record_type):
                    raise PluginError(
                        f"plugin {plugin_name!r} returned {type(spec).__name__} from {hook}; "
                        f"expected {record_type.__name__}")
                dist, version = host.distributions.get(plugin_name, (None, None))
                provided = S.ProvidedSpec(category, spec, plugin_name, dist, version)
                existing = reg.entries[category].get(spec.name)
                if existing is not None:
                    raise PluginError(
                        f"conflicting plugins: {category} {spec.name!r} is provided by both "
                        f"{_who(existing)} and {_who(provided)}")
                reg.entries[category][spec.name] = provided
        return reg

    def names(self, category: str) -> list[str]:
        return sorted(self.entries[category])

    def specs(self, category: str) -> list[Any]:
        return [p.spec for p in self.entries[category].values()]

    def get(self, category: str, name: str) -> Any:
        try:
            return self.entries[category][name].spec
        except KeyError:
            note = self.host.failure_for(category, name) if self.host is not None else ""
            raise ConfigError(
                f"unknown {category} {name!r}; installed: {', '.join(self.names(category))}{note}"
            ) from None

    def all(self) -> list[S.ProvidedSpec]:
        return [p for cat in CATEGORIES for p in self.entries[cat].values()]


def _who(p: S.ProvidedSpec) -> str:
    return f"plugin {p.plugin!r} ({p.distribution or 'no distribution'})"
