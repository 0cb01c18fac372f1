"""Configuration: strict pydantic models, validation and cross-key checks (reading YAML
and formatting errors live in ``config_source``).

The root model is built after plugins load: each plugin category (optimizer, loss,
adapter, model, lr_scheduler, timestep_sampler, loss_weighting) is a discriminated
union of the installed plugins' option models, and the ``memory`` and ``recipe``
sections are the union of every memory strategy's / recipe's fields. Unknown keys,
out-of-range values and unknown plugin names are errors.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
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

    batch_size: int = Field(1, ge=1, le=10000, description="Samples per micro-batch.")
    grad_accumulation_steps: int = Field(
        1, ge=1, le=1024, description="Micro-batches per optimizer step.")
    steps: int = Field(16, ge=1, le=100000, description="Optimizer steps to train.")
    seed: int = Field(0, ge=0, le=SEED_MAX,
                      description="Seeds adapter init, batch order, noise and timesteps.")
    dtype: Literal["bf16", "fp32", "none"] = Field(
        "bf16", description="Compute dtype of the base model; none keeps the model's own "
        "(an fp16 model then trains with a gradient scaler).")
    max_grad_norm: float | None = Field(
        None, gt=0, description="Clip the adapter gradients' global norm to this value.")
    device: str = Field("auto", description="auto (cuda when available), cpu, cuda, cuda:N.")
    dist_timeout: float = Field(
        600.0, gt=0, description="Seconds a process waits for the others (torchrun) before "
        "the run stops with an error.")
    fsdp: bool = Field(False, description="Under torchrun, shard the frozen base over the "
                       "processes (FSDP2) for models that do not fit one device; adapters "
                       "stay replicated.")
    max_bad_steps: int = Field(
        5, ge=1, description="Consecutive non-finite steps (each skipped) after which "
        "training rolls back to the last good checkpoint and stops.")


class ValidationData(Strict):
    """Held-out latents and conditioning for the validation loss."""

    latents: ConfigPath = Field(description="safetensors file with `latents`.")
    conditioning: ConfigPath = Field(description="safetensors file with `cond`.")


class DataConfig(Strict):
    """Pre-encoded training data."""

    latents: ConfigPath | None = Field(
        None, description="safetensors file with `latents` [N,C,H,W] (or [N,C,T,H,W]).")
    conditioning: ConfigPath | None = Field(
        None, description="safetensors file with `cond` [N|1,L,D] plus family extras.")
    bucket_mode: bool = Field(False, description="Latents are pre-bucketed by resolution: "
                              "`latents.<i>` with `cond.<i>`; each batch comes from one bucket.")
    validation: ValidationData | None = Field(None, description="Held-out data for a "
                                              "deterministic validation loss.")


class ValidationConfig(Strict):
    """When to compute the validation loss."""

    every: int | None = Field(None, ge=1, description="Steps between validation losses "
                              "(and after the last step); needs data.validation.")


class EarlyStopConfig(Strict):
    """Stop when the validation loss stops improving."""

    patience: int | None = Field(None, ge=1, description="Validations without an "
                                 "improvement of at least min_delta before stopping.")
    min_delta: float = Field(0.0, ge=0)


class SamplesConfig(Strict):
    """Preview images rendered while training (``<name>.samples/``); off unless set."""

    every: int | None = Field(None, ge=1, description="Steps between preview grids "
                              "(step_<n>.png); the last step always gets one.")
    conditioning: ConfigPath | None = Field(
        None, description="safetensors file with the prompts' conditioning (`cond` "
        "[P,L,D] plus family extras); default: the distinct training conditionings.")
    count: int = Field(4, ge=1, le=64, description="At most this many prompts (grid rows).")
    per_prompt: int = Field(2, ge=1, le=16, description="Images per prompt, one seed each "
                            "(grid columns).")
    negative: ConfigPath | None = Field(
        None, description="safetensors file with the negative conditioning for guidance "
        "(one entry); default: zeros, an empty conditioning.")
    seed: int = Field(0, ge=0, le=SEED_MAX, description="Seeds the starting noise; the same "
                      "every time, so grids compare across steps.")
    steps: int = Field(20, ge=1, le=1000, description="Sampler steps.")
    guidance: float = Field(1.0, ge=0.0, le=100.0, description="Classifier-free guidance "
                            "scale; 1 uses the conditional prediction alone.")
    sampler: str = Field("auto", min_length=1, description="A sampler plugin (ddim, "
                         "euler, ...); auto: ddim for epsilon/v models, euler for flow.")
    sampler_options: dict[str, Any] = Field(
        default_factory=dict, description="The sampler's own options (ddim: eta; euler: "
        "karras, rho, shift).")
    size: tuple[int, int] | None = Field(None, description="Latent height and width; "
                                         "default: the training latents'.")
    compare: bool = Field(True, description="At the end also write compare.png: the base "
                          "model beside the adapted one, same prompts and seeds.")


class OutputConfig(Strict):
    """Where and what to write."""

    dir: ConfigPath = Field(Path("output"), description="Output folder.")
    name: str = Field("lora", min_length=1, pattern=r"^[^/\\]+$",
                      description="Base name of the written files.")
    plot: bool = Field(True, description="Write <name>.loss.png.")
    save_every: int | None = Field(None, ge=1, description="Write a resumable checkpoint "
                                   "every N steps to <dir>/<name>.checkpoints/.")
    keep_last: int | None = Field(None, ge=1, description="Keep only the newest K "
                                  "checkpoints.")
    keep_best: bool = Field(False, description="Also write <name>.best.safetensors at the "
                            "lowest validation loss.")
    samples: SamplesConfig | None = Field(None, description="Render preview images during "
                                          "training (off by default).")


PLUGIN_SECTIONS: dict[str, tuple[str, str]] = {
    # section -> (registry category, discriminator key)
    "model": ("model", "family"),
    "optimizer": ("optimizer", "name"),
    "loss": ("loss", "name"),
    "adapter": ("adapter", "algorithm"),
    "lr_scheduler": ("lr_scheduler", "name"),
    "timestep_sampler": ("timestep_sampler", "name"),
    "loss_weighting": ("loss_weighting", "name"),
}

DEFAULT_NAMES = {"timestep_sampler": "family", "loss_weighting": "none",
                 "optimizer": "adamw", "loss": "mse", "adapter": "lora",
                 "lr_scheduler": "constant", "model": "diffusers"}


def _common_fields(section: str) -> dict[str, Any]:
    """Fields every member of a plugin section carries besides the plugin's own."""
    if section == "optimizer":
        return {"lr": (float, Field(5e-4, ge=1e-7, le=1.0, description="Learning rate."))}
    if section == "loss":
        return {"target": (Literal["native", "x0"], Field(
            "native", description="native: the family's own target (eps/v/flow); x0: "
            "compare predicted and clean latents."))}
    if section == "model":
        return {"quantize": (Literal["none", "fp8", "int8"], Field(
            "none", description="Store the frozen base's Linear weights quantized "
            "(per-output-channel scales)."))}
    if section == "adapter":
        return {
            "rank": (int, Field(8, ge=1, le=128, description="Adapter rank.")),
            "alpha": (float | None, Field(None, gt=0, description="Scale numerator; "
                      "the delta is scaled by alpha/rank. Default: rank (scale 1).")),
            "dtype": (Literal["bf16", "fp32"], Field("bf16", description="Adapter dtype "
                      "(the saved file's dtype).")),
            "master_weights": (bool, Field(True, description="Keep fp32 master weights "
                               "for a bf16 adapter.")),
            "existing": (ConfigPath | None, Field(None, description="A LoRA file to "
                         "continue training from.")),
            "include": (list[str], Field(["*"], description="Glob patterns of module "
                        "paths to adapt.")),
            "exclude": (list[str], Field([], description="Glob patterns of module paths "
                        "to leave alone.")),
            "norm_and_bias_deltas": (bool, Field(False, description="Also train full "
                                     "deltas of every bias and norm scale (diff / diff_b), "
                                     "as ComfyUI's trainer does.")),
            "exporter": (str | None, Field(None, description="Key format of the written "
                         "file (kohya, comfyui, ...); default: the model family's.")),
        }
    return {}


def _member(section: str, key: str, spec: Any) -> type[BaseModel]:
    base = spec.config_model
    common = _common_fields(section)
    clash = (set(common) | {key}) & set(base.model_fields)
    if clash:
        raise PluginError(f"{section} plugin {spec.name!r} defines reserved option(s) "
                          f"{sorted(clash)}")
    fields = {key: (Literal[spec.name], spec.name), **common}
    member = create_model(f"{section.title().replace('_', '')}_{spec.name}", __base__=base,
                          **fields)
    member.model_config["extra"] = "forbid"
    member.model_rebuild(force=True)
    return member


def _union(section: str, registry: Registry) -> Any:
    category, key = PLUGIN_SECTIONS[section]
    members = [_member(section, key, s) for s in registry.specs(category)]
    if not members:
        raise PluginError(f"no {category} plugin is installed")
    if len(members) == 1:
        return members[0]
    return Annotated[Union[tuple(members)], Field(discriminator=key)]  # noqa: UP007


def _memory_model(registry: Registry, category: str = "memory",
                  model_name: str = "MemoryConfig") -> type[BaseModel]:
    """A section merged from the option fields of every plugin of ``category``."""
    fields: dict[str, Any] = {}
    owners: dict[str, str] = {}
    for spec in sorted(registry.specs(category), key=lambda s: s.order):
        for fname, finfo in spec.config_model.model_fields.items():
            if fname in owners:
                raise PluginError(f"{category} option {fname!r} is defined by both "
                                  f"plugins {owners[fname]!r} and {spec.name!r}")
            owners[fname] = spec.name
            fields[fname] = (finfo.annotation, finfo)
    return create_model(model_name, __base__=Strict, **fields)


def build_config_model(registry: Registry) -> type[BaseModel]:
    """The root config model for the installed plugins."""
    cached = getattr(registry, "config_model", None)
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
    root = create_model(
        "TrainConfig", __base__=Strict,
        training=(TrainingConfig, Field(default_factory=TrainingConfig)),
        data=(DataConfig, Field(default_factory=DataConfig)),
        memory=(memory, Field(default_factory=memory)),
        recipe=(recipe, Field(default_factory=recipe)),
        output=(OutputConfig, Field(default_factory=OutputConfig)),
        validation=(ValidationConfig, Field(default_factory=ValidationConfig)),
        early_stop=(EarlyStopConfig, Field(default_factory=EarlyStopConfig)),
        **sections,
    )
    registry.config_model = root
    return root


def _default_member(union: Any, data: dict[str, Any]) -> Any:
    from pydantic import TypeAdapter

    return TypeAdapter(union).validate_python(data)


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
            note = registry.host.failure_for(category, str(name)) if registry.host else ""
            problems.append(
                f"{section}.{key}: unknown {category} {name!r}; installed: "
                f"{', '.join(registry.names(category))}{note}{source.where((section, key))}")
    exporter = (data.get("adapter") or {}).get("exporter") if isinstance(
        data.get("adapter"), dict) else None
    if exporter is not None and exporter not in registry.entries["exporter"]:
        problems.append(f"adapter.exporter: unknown key format {exporter!r}; installed: "
                        f"{', '.join(registry.names('exporter'))}"
                        f"{source.where(('adapter', 'exporter'))}")
    return problems


def parse_config(data: Mapping[str, Any], registry: Registry,
                 source: ConfigSource | None = None, base_dir: Path | None = None) -> Any:
    """Validate raw config data into the root model; raise ``ConfigError`` listing every
    problem as ``path.to.key: message (file:line)``."""
    source = source or ConfigSource()
    data = json.loads(json.dumps(data, default=str)) if not isinstance(data, dict) else \
        _plain_copy(data)
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
    from loraengine.core.samplers import check_samples  # torch-heavy; import on use

    check_samples(cfg, registry, source)
    return cfg


def check_strategies(cfg: Any, registry: Registry, source: ConfigSource) -> None:
    """Run every memory strategy's ``validate`` over the whole config (combinations
    such as a quantized base without bypass mode)."""
    problems: list[str] = []
    for spec in sorted(registry.specs("memory"), key=lambda s: s.order):
        check = getattr(spec, "validate", None)
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


def load_config(path: Path, registry: Registry, overrides: list[str] | None = None) -> Any:
    """Read, override and validate a YAML config file."""
    path = Path(path)
    data, lines = read_yaml(path)
    touched = apply_overrides(data, overrides or [])
    source = ConfigSource(path, lines, touched)
    return parse_config(data, registry, source, base_dir=path.resolve().parent)


def config_to_dict(cfg: BaseModel) -> dict[str, Any]:
    """The config as JSON-ready data (paths as strings)."""
    return json.loads(cfg.model_dump_json())


def check_consistency(cfg: Any, source: ConfigSource) -> None:
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
