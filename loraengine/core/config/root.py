"""Configuration: strict pydantic models, validation and cross-key checks (reading YAML
and formatting errors live in ``source``).

``TrainConfig`` is the static shape of a validated config, with one base class per
plugin section holding the keys every choice of it takes (``AdapterOptions.rank``...).
The model that validates is built after plugins load: each plugin section (optimizer,
loss, adapter, model, lr_scheduler, timestep_sampler, loss_weighting) becomes a
discriminated union of the installed plugins' option models joined to the section
base, and the ``memory`` and ``recipe`` sections the union of every memory strategy's /
recipe's fields. Unknown keys, out-of-range values and unknown plugin names are errors.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, Protocol, Union
from weakref import WeakKeyDictionary

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
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
from loraengine.core.plugins.registry import Registry
from loraengine.core.plugins.specs import PluginOptions

SEED_MAX = 2**64 - 1


def _resolve_path(value: Path | None, info: ValidationInfo) -> Path | None:
    if value is None:
        return None
    base = (info.context or {}).get("base_dir")
    value = Path(value).expanduser()
    if base is not None and not value.is_absolute():
        value = Path(base) / value
    return value


#: A path; relative paths resolve against the config file's folder.
ConfigPath = Annotated[Path, AfterValidator(_resolve_path)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)


class TrainingConfig(Strict):
    """How long and how to train."""

    batch_size: int = Field(default=1, ge=1, le=10000, description="Samples per micro-batch.")
    grad_accumulation_steps: int = Field(
        default=1, ge=1, le=1024, description="Micro-batches per optimizer step.")
    steps: int = Field(default=16, ge=1, le=100000, description="Optimizer steps to train.")
    seed: int = Field(default=0, ge=0, le=SEED_MAX,
                      description="Seeds adapter init, batch order, noise and timesteps.")
    dtype: Literal["bf16", "fp32", "none"] = Field(
        default="bf16", description="Compute dtype of the base model; none keeps the model's own "
        "(an fp16 model then trains with a gradient scaler).")
    max_grad_norm: float | None = Field(
        default=None, gt=0, description="Clip the adapter gradients' global norm to this value.")
    device: str = Field(default="auto",
                        description="auto (cuda when available), cpu, cuda, cuda:N.")
    dist_timeout: float = Field(
        default=600.0, gt=0, description="Seconds a process waits for the others (torchrun) before "
        "the run stops with an error.")
    fsdp: bool = Field(default=False, description="Under torchrun, shard the frozen base over the "
                       "processes (FSDP2) for models that do not fit one device; adapters "
                       "stay replicated.")
    max_bad_steps: int = Field(
        default=5, ge=1, description="Consecutive non-finite steps (each skipped) after which "
        "training rolls back to the last good checkpoint and stops.")


class ValidationData(Strict):
    """Held-out latents and conditioning for the validation loss."""

    latents: ConfigPath = Field(description="safetensors file with `latents`.")
    conditioning: ConfigPath = Field(description="safetensors file with `cond`.")


class DataConfig(Strict):
    """Pre-encoded training data."""

    latents: ConfigPath | None = Field(
        default=None, description="safetensors file with `latents` [N,C,H,W] (or [N,C,T,H,W]).")
    conditioning: ConfigPath | None = Field(
        default=None, description="safetensors file with `cond` [N|1,L,D] plus family extras.")
    bucket_mode: bool = Field(default=False, description="Latents are pre-bucketed by resolution: "
                              "`latents.<i>` with `cond.<i>`; each batch comes from one bucket.")
    validation: ValidationData | None = Field(default=None, description="Held-out data for a "
                                              "deterministic validation loss.")


class ValidationConfig(Strict):
    """When to compute the validation loss."""

    every: int | None = Field(default=None, ge=1, description="Steps between validation losses "
                              "(and after the last step); needs data.validation.")


class EarlyStopConfig(Strict):
    """Stop when the validation loss stops improving."""

    patience: int | None = Field(default=None, ge=1, description="Validations without an "
                                 "improvement of at least min_delta before stopping.")
    min_delta: float = Field(default=0.0, ge=0)


class SamplesConfig(Strict):
    """Preview images rendered while training (``<name>.samples/``); off unless set."""

    every: int | None = Field(default=None, ge=1, description="Steps between preview grids "
                              "(step_<n>.png); the last step always gets one.")
    conditioning: ConfigPath | None = Field(
        default=None, description="safetensors file with the prompts' conditioning (`cond` "
        "[P,L,D] plus family extras); default: the distinct training conditionings.")
    count: int = Field(default=4, ge=1, le=64, description="At most this many prompts (grid rows).")
    per_prompt: int = Field(default=2, ge=1, le=16, description="Images per prompt, one seed each "
                            "(grid columns).")
    negative: ConfigPath | None = Field(
        default=None, description="safetensors file with the negative conditioning for guidance "
        "(one entry); default: zeros, an empty conditioning.")
    seed: int = Field(default=0, ge=0, le=SEED_MAX, description="Seeds the starting noise; "
                      "the same every time, so grids compare across steps.")
    steps: int = Field(default=20, ge=1, le=1000, description="Sampler steps.")
    guidance: float = Field(default=1.0, ge=0.0, le=100.0, description="Classifier-free guidance "
                            "scale; 1 uses the conditional prediction alone.")
    sampler: str = Field(default="auto", min_length=1, description="A sampler plugin (ddim, "
                         "euler, ...); auto: ddim for epsilon/v models, euler for flow.")
    sampler_options: dict[str, Any] = Field(
        default_factory=dict, description="The sampler's own options (ddim: eta; euler: "
        "karras, rho, shift).")
    size: tuple[int, int] | None = Field(default=None, description="Latent height and width; "
                                         "default: the training latents'.")
    compare: bool = Field(default=True, description="At the end also write compare.png: the base "
                          "model beside the adapted one, same prompts and seeds.")


class OutputConfig(Strict):
    """Where and what to write."""

    dir: ConfigPath = Field(default=Path("output"), description="Output folder.")
    name: str = Field(default="lora", min_length=1, pattern=r"^[^/\\]+$",
                      description="Base name of the written files.")
    plot: bool = Field(default=True, description="Write <name>.loss.png.")
    save_every: int | None = Field(default=None, ge=1, description="Write a resumable checkpoint "
                                   "every N steps to <dir>/<name>.checkpoints/.")
    keep_last: int | None = Field(default=None, ge=1, description="Keep only the newest K "
                                  "checkpoints.")
    keep_best: bool = Field(default=False, description="Also write <name>.best.safetensors at the "
                            "lowest validation loss.")
    samples: SamplesConfig | None = Field(default=None, description="Render preview images during "
                                          "training (off by default).")


# -- the plugin sections ----------------------------------------------------------------
#
# Each plugin section of the config is one of the installed plugins' option models plus
# the keys every choice of that section takes. Those keys (and the name that picks the
# plugin) are declared once, on the section's base below; the root model built for the
# installed plugins makes each member a subclass of the section base and the plugin's
# own ``config_model``, so the engine reads e.g. ``config.adapter.rank`` as an ``int``
# whichever algorithm is chosen.


class SectionOptions(PluginOptions):
    """Base of the shared keys of a plugin section; ``extra="forbid"`` as plugin options."""


class ModelOptions(SectionOptions):
    """Keys every model family takes."""

    family: str
    quantize: Literal["none", "fp8", "int8"] = Field(
        default="none", description="Store the frozen base's Linear weights quantized "
        "(per-output-channel scales).")


class OptimizerOptions(SectionOptions):
    """Keys every optimizer takes."""

    name: str
    lr: float = Field(default=5e-4, ge=1e-7, le=1.0, description="Learning rate.")


class LossOptions(SectionOptions):
    """Keys every loss takes."""

    name: str
    target: Literal["native", "x0"] = Field(
        default="native", description="native: the family's own target (eps/v/flow); x0: "
        "compare predicted and clean latents.")


class AdapterOptions(SectionOptions):
    """Keys every adapter algorithm takes."""

    algorithm: str
    rank: int = Field(default=8, ge=1, le=128, description="Adapter rank.")
    alpha: float | None = Field(default=None, gt=0, description="Scale numerator; the delta is "
                                "scaled by alpha/rank. Default: rank (scale 1).")
    dtype: Literal["bf16", "fp32"] = Field(default="bf16", description="Adapter dtype (the saved "
                                           "file's dtype).")
    master_weights: bool = Field(default=True, description="Keep fp32 master weights for a bf16 "
                                 "adapter.")
    existing: ConfigPath | None = Field(default=None, description="A LoRA file to continue "
                                        "training from.")
    include: list[str] = Field(default=["*"], description="Glob patterns of module paths to adapt.")
    exclude: list[str] = Field(default=[], description="Glob patterns of module paths to leave "
                               "alone.")
    norm_and_bias_deltas: bool = Field(default=False, description="Also train full deltas of every "
                                       "bias and norm scale (diff / diff_b), as ComfyUI's "
                                       "trainer does.")
    exporter: str | None = Field(default=None, description="Key format of the written file "
                                 "(kohya, comfyui, ...); default: the model family's.")


class LRSchedulerOptions(SectionOptions):
    """Keys every learning-rate schedule takes."""

    name: str


class TimestepSamplerOptions(SectionOptions):
    """Keys every timestep sampler takes."""

    name: str


class LossWeightingOptions(SectionOptions):
    """Keys every loss weighting takes."""

    name: str


class MergedSection(Strict):
    """Base of a section merged from the option fields of every plugin of a category
    (``memory``, ``recipe``); its keys are the plugins' own."""


class TrainConfig(Strict):
    """A validated training config: the static shape the engine reads.

    The model that validates a config is built for the installed plugins by
    ``build_config_model``: a subclass of this one whose plugin sections are
    discriminated unions of the section base and each plugin's options, and whose
    ``memory`` and ``recipe`` sections hold every strategy's / recipe's fields.
    """

    training: TrainingConfig = Field(default_factory=TrainingConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    memory: MergedSection = Field(default_factory=MergedSection)
    recipe: MergedSection = Field(default_factory=MergedSection)
    output: OutputConfig = Field(default_factory=OutputConfig)
    validation: ValidationConfig = Field(default_factory=ValidationConfig)
    early_stop: EarlyStopConfig = Field(default_factory=EarlyStopConfig)
    model: ModelOptions = Field(description="The model family and its options.")
    optimizer: OptimizerOptions
    loss: LossOptions
    adapter: AdapterOptions
    lr_scheduler: LRSchedulerOptions
    timestep_sampler: TimestepSamplerOptions
    loss_weighting: LossWeightingOptions


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


def _member(section: str, key: str, spec: _Named) -> type[SectionOptions]:
    """One choice of a plugin section: the section base and the plugin's options, with
    the discriminator fixed to the plugin's name."""
    section_base, own = SECTION_BASES[section], spec.config_model
    clash = set(section_base.model_fields) & set(own.model_fields)
    if clash:
        raise PluginError(f"{section} plugin {spec.name!r} defines reserved option(s) "
                          f"{sorted(clash)}")
    # The plugin's fields come first, then the discriminator and the shared keys (the
    # base's order): pydantic orders inherited fields from the last base to the first.
    member: type[SectionOptions] = create_model(
        f"{section.title().replace('_', '')}_{spec.name}", __base__=(section_base, own),
        **{key: (Literal[spec.name], spec.name)})  # type: ignore[call-overload]
    # A plugin's model may relax its own config; a member never takes unknown keys.
    member.model_config["extra"] = "forbid"
    member.model_rebuild(force=True)
    return member


def _union(section: str, registry: Registry) -> Any:  # a type form, as pydantic takes it
    """The type of a plugin section: its one member, or a union tagged by the key."""
    category, key = PLUGIN_SECTIONS[section]
    members = [_member(section, key, s) for s in registry.specs(category)]
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
    exporter = (data.get("adapter") or {}).get("exporter") if isinstance(
        data.get("adapter"), dict) else None
    if exporter is not None and exporter not in registry.entries["exporter"]:
        problems.append(f"adapter.exporter: unknown key format {exporter!r}; installed: "
                        f"{', '.join(registry.names('exporter'))}"
                        f"{source.where(('adapter', 'exporter'))}")
    return problems


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
        lines = []
        for err in exc.errors():
            loc = data_loc(data, err["loc"])
            lines.append(f"{'.'.join(loc) or '<root>'}: {error_message(err)}{source.where(loc)}")
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


def _plain_copy(data: Any) -> Any:
    if isinstance(data, Mapping):
        return {str(k): _plain_copy(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [_plain_copy(v) for v in data]
    return data


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
