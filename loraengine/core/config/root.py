"""Configuration: strict pydantic models, validation and cross-key checks (reading YAML
and formatting errors live in ``source``).

``TrainConfig`` is the static shape of a validated config, with one base class per
plugin section holding the keys every choice of it takes (``AdapterOptions.rank``...).
The model that validates is built after plugins load: each plugin section (optimizer,
loss, adapter, model, lr_scheduler, timestep_sampler, loss_weighting) becomes a
discriminated union of the installed plugins' option models joined to the section
base, and the ``memory`` and ``recipe`` sections the union of every memory strategy's /
recipe's fields. Unknown keys, out-of-range values and unknown plugin names are errors.

The option models themselves (``TrainConfig``, the section bases, ``ConfigPath``...)
live in ``loraengine.core.options`` and are re-exported here.
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal, Protocol, Union, cast, get_args
from weakref import WeakKeyDictionary

from pydantic import (
    BaseModel,
    Field,
    TypeAdapter,
    ValidationError,
    create_model,
)

from loraengine.core.config.source import (
    ConfigSource,
    apply_overrides,
    data_loc,
    error_message,
    read_yaml,
)
from loraengine.core.errors import ConfigError, PluginError
from loraengine.core.options import (
    SEED_MAX,
    AdapterOptions,
    ConfigPath,
    DataConfig,
    EarlyStopConfig,
    LossOptions,
    LossWeightingOptions,
    LRSchedulerOptions,
    MergedSection,
    ModelOptions,
    OptimizerOptions,
    OutputConfig,
    SamplesConfig,
    SectionOptions,
    Strict,
    TimestepSamplerOptions,
    TrainConfig,
    TrainingConfig,
    ValidationConfig,
    ValidationData,
)
from loraengine.core.plugins.registry import Registry

__all__ = [
    "DEFAULT_NAMES", "PLUGIN_SECTIONS", "SECTION_BASES", "SEED_MAX", "AdapterOptions",
    "ConfigPath", "ConfigSource", "DataConfig", "EarlyStopConfig", "LRSchedulerOptions",
    "LossOptions", "LossWeightingOptions", "MergedSection", "ModelOptions",
    "OptimizerOptions", "OutputConfig", "SamplesConfig", "SectionOptions", "Strict",
    "TimestepSamplerOptions", "TrainConfig", "TrainingConfig", "ValidationConfig",
    "ValidationData", "apply_overrides", "build_config_model", "check_consistency",
    "check_samples", "check_strategies", "config_to_dict", "load_config", "parse_config",
    "read_yaml",
]

#: The registry categories a plugin section picks from.
SectionCategory = Literal["model", "optimizer", "loss", "adapter", "lr_scheduler",
                          "timestep_sampler", "loss_weighting"]

PLUGIN_SECTIONS: dict[str, tuple[SectionCategory, str]] = {
    # section -> (registry category, discriminator key)
    "model": ("model", "family"),
    "optimizer": ("optimizer", "name"),
    "loss": ("loss", "name"),
    "adapter": ("adapter", "algorithm"),
    "lr_scheduler": ("lr_scheduler", "name"),
    "timestep_sampler": ("timestep_sampler", "name"),
    "loss_weighting": ("loss_weighting", "name"),
}

#: section -> the base of its members (its shared keys and the discriminator).
SECTION_BASES: dict[str, type[SectionOptions]] = {
    "model": ModelOptions, "optimizer": OptimizerOptions, "loss": LossOptions,
    "adapter": AdapterOptions, "lr_scheduler": LRSchedulerOptions,
    "timestep_sampler": TimestepSamplerOptions, "loss_weighting": LossWeightingOptions,
}

DEFAULT_NAMES = {"timestep_sampler": "family", "loss_weighting": "none",
                 "optimizer": "adamw", "loss": "mse", "adapter": "lora",
                 "lr_scheduler": "constant", "model": "diffusers"}


class _Named(Protocol):
    @property
    def name(self) -> str: ...
    @property
    def config_model(self) -> type[BaseModel]: ...


class _Ordered(_Named, Protocol):
    @property
    def order(self) -> int: ...


def _extensions(section: str, registry: Registry) -> list[type[BaseModel]]:
    """Option models that memory strategies add to every member of ``section``, checked
    against each other (a key may have one owner only)."""
    models: list[type[BaseModel]] = []
    owners: dict[str, str] = {}
    for strategy in sorted(registry.specs("memory"), key=lambda s: s.order):
        extra = strategy.extends.get(section)
        if extra is None:
            continue
        for name in extra.model_fields:
            if name in owners or name in SECTION_BASES[section].model_fields:
                raise PluginError(f"{section} option {name!r} is defined by both "
                                  f"{owners.get(name, 'the engine')} and memory "
                                  f"strategy {strategy.name!r}")
            owners[name] = f"memory strategy {strategy.name!r}"
        models.append(extra)
    return models


def _member(section: str, key: str, spec: _Named,
            extensions: Sequence[type[BaseModel]] = ()) -> type[SectionOptions]:
    """One choice of a plugin section: the section base, the keys memory strategies add
    to the section, and the plugin's options, with the discriminator fixed to the
    plugin's name."""
    section_base, own = SECTION_BASES[section], spec.config_model
    reserved = set(section_base.model_fields).union(*(m.model_fields for m in extensions))
    clash = reserved & set(own.model_fields)
    if clash:
        raise PluginError(f"{section} plugin {spec.name!r} defines reserved option(s) "
                          f"{sorted(clash)}")
    # The plugin's fields come first, then the added keys, the discriminator and the
    # shared keys: pydantic orders inherited fields from the last base to the first.
    # (create_model's stubs take one base class; a tuple of bases is valid at run time)
    made = create_model(  # type: ignore[call-overload]
        f"{section.title().replace('_', '')}_{spec.name}",
        __base__=(section_base, *extensions, own),
        **{key: (Literal[spec.name], spec.name)})
    member = cast("type[SectionOptions]", made)
    # A plugin's model may relax its own config; a member never takes unknown keys.
    member.model_config["extra"] = "forbid"
    member.model_rebuild(force=True)
    return member


def _union(section: str, registry: Registry) -> Any:  # a type form, as pydantic takes it
    """The type of a plugin section: its one member, or a union tagged by the key."""
    category, key = PLUGIN_SECTIONS[section]
    extensions = _extensions(section, registry)
    members = [_member(section, key, s, extensions) for s in registry.specs(category)]
    if not members:
        raise PluginError(f"no {category} plugin is installed")
    if len(members) == 1:
        return members[0]
    return Annotated[Union[tuple(members)], Field(discriminator=key)]  # noqa: UP007


def _memory_model(registry: Registry, category: Literal["memory", "recipe"] = "memory",
                  model_name: str = "MemoryConfig") -> type[MergedSection]:
    """A section merged from the option fields of every plugin of ``category``."""
    fields: dict[str, Any] = {}
    owners: dict[str, str] = {}
    specs: list[_Ordered] = [*registry.specs("memory")] if category == "memory" else \
        [*registry.specs("recipe")]
    for spec in sorted(specs, key=lambda s: s.order):
        for fname, finfo in spec.config_model.model_fields.items():
            if fname in owners:
                raise PluginError(f"{category} option {fname!r} is defined by both "
                                  f"plugins {owners[fname]!r} and {spec.name!r}")
            owners[fname] = spec.name
            fields[fname] = (finfo.annotation, finfo)
    return create_model(model_name, __base__=MergedSection, **fields)


#: The root model of each registry, made on first use. Keyed weakly by the registry
#: (which is frozen and compared by identity), so a new set of plugins gets its own.
_ROOT_MODELS: WeakKeyDictionary[Registry, type[TrainConfig]] = WeakKeyDictionary()


def build_config_model(registry: Registry) -> type[TrainConfig]:
    """The root config model for the installed plugins (made once per registry)."""
    cached = _ROOT_MODELS.get(registry)
    if cached is not None:
        return cached
    sections: dict[str, Any] = {}
    for section in PLUGIN_SECTIONS:
        union = _union(section, registry)
        default = DEFAULT_NAMES[section]
        if section == "model":
            sections[section] = (union, Field(description="The model family and its options."))
        else:
            _, key = PLUGIN_SECTIONS[section]
            sections[section] = (union, Field(default_factory=lambda d={key: default}, u=union:
                                              _default_member(u, d)))
    memory = _memory_model(registry)
    recipe = _memory_model(registry, "recipe", "RecipeConfig")
    root: type[TrainConfig] = create_model(
        "TrainConfig", __base__=TrainConfig,
        memory=(memory, Field(default_factory=memory)),
        recipe=(recipe, Field(default_factory=recipe)),
        **sections,
    )
    _ROOT_MODELS[registry] = root
    return root


def _default_member(union: Any, data: dict[str, str]) -> SectionOptions:
    member: SectionOptions = TypeAdapter(union).validate_python(data)
    return member


def _check_plugin_names(data: dict[str, Any], registry: Registry,
                        source: ConfigSource) -> list[str]:
    problems: list[str] = []
    for section, (category, key) in PLUGIN_SECTIONS.items():
        sect = data.get(section)
        if sect is None:
            continue
        if not isinstance(sect, dict):
            problems.append(f"{section}: expected a mapping{source.where((section,))}")
            continue
        sect.setdefault(key, DEFAULT_NAMES[section])
        name = sect[key]
        if not isinstance(name, str):
            problems.append(f"{section}.{key}: expected a name, got {name!r}"
                            f"{source.where((section, key))}")
            continue
        if name not in registry.entries[category]:
            problems.append(f"{section}.{key}: {registry.unknown(category, name)}"
                            f"{source.where((section, key))}")
    problems.extend(_check_logger_names(data, registry, source))
    exporter = (data.get("adapter") or {}).get("exporter") if isinstance(
        data.get("adapter"), dict) else None
    if exporter is not None and exporter not in registry.entries["exporter"]:
        problems.append(f"adapter.exporter: unknown key format {exporter!r}; installed: "
                        f"{', '.join(registry.names('exporter'))}"
                        f"{source.where(('adapter', 'exporter'))}")
    return problems


def _check_logger_names(data: dict[str, Any], registry: Registry, source: ConfigSource
                        ) -> list[str]:
    """``output.loggers``: a list of installed logger names whose packages are here."""
    output = data.get("output")
    loggers = output.get("loggers") if isinstance(output, dict) else None
    if loggers is None:
        return []
    if not isinstance(loggers, list):
        return [f"output.loggers: expected a list of names, got {loggers!r}"
                f"{source.where(('output', 'loggers'))}"]
    problems: list[str] = []
    for i, name in enumerate(loggers):
        where = source.where(("output", "loggers", str(i)))
        if not isinstance(name, str):
            problems.append(f"output.loggers.{i}: expected a name, got {name!r}{where}")
        elif name not in registry.entries["logger"]:
            problems.append(f"output.loggers.{i}: {registry.unknown('logger', name)}{where}")
        else:
            spec = registry.get("logger", name)
            with registry.blame("logger", name, "missing"):
                needs = spec.missing() if spec.missing is not None else None
            if needs:
                problems.append(f"output.loggers.{i}: logger {name!r} needs {needs}{where}")
    if len(set(x for x in loggers if isinstance(x, str))) < len(loggers):
        problems.append(f"output.loggers: a logger is named twice in {loggers!r}"
                        f"{source.where(('output', 'loggers'))}")
    return problems


def empty_config_message(source: ConfigSource) -> str:
    """What an empty config needs, instead of the first key pydantic misses."""
    where = f"{source.path}: " if source.path is not None else ""
    return (f"{where}the config is empty; a minimal one names the model and the data "
            f"(model: {{family: sd15, path: PIPELINE_FOLDER}}, data: {{latents: "
            f"FILE, conditioning: FILE}}); examples/quickstart.yaml is a complete one to "
            f"start from")


def _models_in(form: Any) -> list[type[BaseModel]]:
    """The pydantic models a type form (a model, a union, ``Annotated``, ``X | None``,
    ``list[X]``) can hold."""
    if isinstance(form, type) and issubclass(form, BaseModel):
        return [form]
    return [m for arg in get_args(form) for m in _models_in(arg)]


def keys_at(root: type[BaseModel], loc: Sequence[Any]) -> list[str]:
    """The keys the section at pydantic's error location ``loc`` takes (its parts may
    include a union member's tag or class name); empty when it cannot be told."""
    models = [root]
    for part in loc:
        if isinstance(part, int):
            continue  # a list item: the same models
        found = [m for m in models if part in m.model_fields]
        if found:
            models = [n for m in found for n in _models_in(m.model_fields[part].annotation)]
            continue
        tagged = [m for m in models if m.__name__ == part or any(
            f.default == part for f in m.model_fields.values() if isinstance(f.default, str))]
        if not tagged:
            return []
        models = tagged[:1]
    return sorted({k for m in models for k in m.model_fields})


def did_you_mean(key: str, choices: Sequence[str]) -> str:
    """``; did you mean 'steps'?`` for a misspelt key, else nothing."""
    close = difflib.get_close_matches(key, choices, n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def parse_config(raw: Mapping[str, Any], registry: Registry,
                 source: ConfigSource | None = None, base_dir: Path | None = None
                 ) -> TrainConfig:
    """Validate raw config data into the root model; raise ``ConfigError`` listing every
    problem as ``path.to.key: message (file:line)``."""
    source = source or ConfigSource()
    data: dict[str, Any] = json.loads(json.dumps(raw, default=str)) if not isinstance(
        raw, dict) else _plain_copy(raw)
    problems = _check_plugin_names(data, registry, source)
    if problems:
        raise ConfigError(problems)
    root = build_config_model(registry)
    try:
        cfg = root.model_validate(data, context={"base_dir": base_dir})
    except ValidationError as exc:
        if not data:
            raise ConfigError(empty_config_message(source)) from None
        lines = []
        for err in exc.errors():
            loc = data_loc(data, err["loc"])
            message = error_message(err)
            if err.get("type") == "extra_forbidden":
                message += did_you_mean(str(err["loc"][-1]), keys_at(root, err["loc"][:-1]))
            lines.append(f"{'.'.join(loc) or '<root>'}: {message}{source.where(loc)}")
        raise ConfigError(list(dict.fromkeys(lines))) from None
    check_consistency(cfg, source)
    check_strategies(cfg, registry, source)
    check_samples(cfg, registry, source)
    return cfg


def check_samples(cfg: TrainConfig, registry: Registry, source: ConfigSource | None = None
                  ) -> None:
    """Config-time check of ``output.samples``: the sampler exists and takes the
    options given (a sampler chosen by ``auto`` is checked when the model is known)."""
    samples = cfg.output.samples
    if samples is None:
        return
    where = source.where(("output", "samples")) if source is not None else ""
    if samples.size is not None and min(samples.size) < 1:
        raise ConfigError(f"output.samples.size: sides must be positive, got "
                          f"{list(samples.size)}{where}")
    if samples.sampler != "auto":
        from loraengine.core.samplers import resolve_sampler  # torch-heavy; import on use

        try:
            resolve_sampler(registry, samples.sampler, samples.sampler_options)
        except ConfigError as exc:
            raise ConfigError(f"{exc}{where}") from None


def check_strategies(cfg: TrainConfig, registry: Registry, source: ConfigSource) -> None:
    """Run every memory strategy's ``validate`` over the whole config (combinations
    such as a quantized base without bypass mode)."""
    problems: list[str] = []
    for spec in sorted(registry.specs("memory"), key=lambda s: s.order):
        check = spec.validate
        for problem in (check(cfg) if check is not None else ()):
            key = problem.split(":", 1)[0].strip()
            problems.append(problem + source.where(tuple(key.split("."))))
    if problems:
        raise ConfigError(problems)


def _plain_copy(data: Any, _memo: dict[int, Any] | None = None) -> Any:
    """Plain dicts (string keys) and lists; a container shared by several keys (a YAML
    alias) is copied once and stays shared, so the copy is as large as the document,
    not as large as its aliases expanded."""
    memo: dict[int, Any] = {} if _memo is None else _memo
    if not isinstance(data, (Mapping, list, tuple)):
        return data
    if id(data) in memo:
        return memo[id(data)]
    if isinstance(data, Mapping):
        out: dict[str, Any] = {}
        memo[id(data)] = out  # before the children: a container holding itself ends
        for k, v in data.items():
            out[str(k)] = _plain_copy(v, memo)
        return out
    items: list[Any] = []
    memo[id(data)] = items
    items.extend(_plain_copy(v, memo) for v in data)
    return items


def load_config(path: Path, registry: Registry, overrides: list[str] | None = None
                ) -> TrainConfig:
    """Read, override and validate a YAML config file."""
    path = Path(path)
    data, lines = read_yaml(path)
    touched = apply_overrides(data, overrides or [])
    source = ConfigSource(path, lines, touched)
    return parse_config(data, registry, source, base_dir=path.resolve().parent)


def config_to_dict(cfg: BaseModel) -> dict[str, Any]:
    """The config as JSON-ready data (paths as strings)."""
    data: dict[str, Any] = json.loads(cfg.model_dump_json())
    return data


def check_consistency(cfg: TrainConfig, source: ConfigSource) -> None:
    """Rules that involve more than one key."""
    problems = []
    needs_val = [("validation", "every"), ("early_stop", "patience")]
    if cfg.data.validation is None:
        for loc in needs_val:
            if getattr(getattr(cfg, loc[0]), loc[1]) is not None:
                problems.append(f"{'.'.join(loc)}: needs data.validation (held-out latents "
                                f"and conditioning){source.where(loc)}")
    if (cfg.output.keep_best or cfg.early_stop.patience is not None) and \
            cfg.validation.every is None:
        loc = ("output", "keep_best") if cfg.output.keep_best else ("early_stop", "patience")
        problems.append(f"{'.'.join(loc)}: needs validation.every{source.where(loc)}")
    if cfg.output.keep_last is not None and cfg.output.save_every is None:
        problems.append(f"output.keep_last: needs output.save_every"
                        f"{source.where(('output', 'keep_last'))}")
    if problems:
        raise ConfigError(problems)
