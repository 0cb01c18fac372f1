"""Choosing a sampler plugin for a model and checking its options: used by the
``output.samples`` check at config time, the training previews and ``loraengine sample``.
"""

from __future__ import annotations

from collections.abc import Mapping

from pydantic import ValidationError

from loraengine.core.errors import ConfigError
from loraengine.core.plugins.registry import Registry
from loraengine.core.plugins.specs import SampleFn
from loraengine.core.schedule import NoiseSchedule


def auto_sampler(schedule: NoiseSchedule, registry: Registry) -> str:
    """The sampler ``auto`` means for ``schedule``: the first installed one that names
    the schedule's prediction type in its ``default_for``."""
    for spec in registry.specs("sampler"):
        if schedule.prediction_type in spec.default_for:
            return spec.name
    raise ConfigError(f"no installed sampler is the default for a "
                      f"{schedule.prediction_type} model; name one")


def resolve_sampler(registry: Registry, name: str, options: Mapping[str, object] | None,
                    schedule: NoiseSchedule | None = None,
                    key: str = "output.samples.sampler",
                    options_key: str = "output.samples.sampler_options"
                    ) -> SampleFn:
    """The ``sample`` function of sampler ``name`` (``auto``: by the schedule) with its
    options validated; a ``ConfigError`` naming ``key`` when it does not fit."""
    if name == "auto":
        if schedule is None:
            raise ConfigError(f"{key}: 'auto' needs the model's schedule")
        name = auto_sampler(schedule, registry)
    if name not in registry.entries["sampler"]:
        raise ConfigError(f"{key}: unknown sampler {name!r}; installed: "
                          f"{', '.join(registry.names('sampler'))}")
    spec = registry.get("sampler", name)
    if schedule is not None and schedule.prediction_type not in spec.prediction_types:
        fits = [s.name for s in registry.specs("sampler")
                if schedule.prediction_type in s.prediction_types]
        raise ConfigError(f"{key}: sampler {name!r} cannot sample a "
                          f"{schedule.prediction_type} model; use one of: {', '.join(fits)}")
    try:
        opts = spec.config_model.model_validate(dict(options or {}))
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        raise ConfigError(f"{options_key}: {where}: {err['msg']}") from None
    return spec.factory(opts)
