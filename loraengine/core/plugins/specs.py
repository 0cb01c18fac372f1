"""Typed records that plugins return from the registration hooks.

Every record names the thing it provides and carries a pydantic model for its own
options (``extra="forbid"``) plus a factory. The engine only ever sees these records.

A record with options is generic in its options model ``OptionsT``: the type checker ties
the factory's options argument to ``config_model`` where the record is made
(``OptimizerSpec("lion", make_lion, LionOptions)`` is ``OptimizerSpec[LionOptions]``).
The engine holds every record as ``XSpec[BaseModel]`` and calls the factory with an
instance of that record's own ``config_model`` (validated, with the section's common
keys); ``OptionsT`` is covariant so that a record of any options model fits there.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Generic, Protocol, TypeAlias, TypeVar

from pydantic import BaseModel

# The option bases are pydantic models, which mypy cannot hold to this package's no-Any
# rule; they live below it and are part of the contract through these names.
from loraengine.core.options import NoOptions as NoOptions
from loraengine.core.options import PluginOptions as PluginOptions

if TYPE_CHECKING:
    import torch
    from torch import nn

    from loraengine.core.adapter import AdapterLayer
    from loraengine.core.model import LoadedModel, ModelLayout
    from loraengine.core.options import TrainConfig
    from loraengine.core.plugins.assembly import BuildContext, Recipe, RunConfig, StrategyResult
    from loraengine.core.schedule import NoiseSchedule


#: The options model of a record. Covariant: the engine reads records of every options
#: model as ``XSpec[BaseModel]`` and passes each factory its own model's instance.
OptionsT = TypeVar("OptionsT", bound=BaseModel, covariant=True)


@dataclass(frozen=True)
class OptimizerSpec(Generic[OptionsT]):
    """An optimizer. ``factory(params, lr, options) -> torch.optim.Optimizer``."""

    name: str
    factory: Callable[[Iterable[torch.nn.Parameter], float, OptionsT], torch.optim.Optimizer]
    # mypy cannot check a default against a TypeVar; NoOptions is right for the records
    # that leave config_model out, whose factories take no options of their own.
    config_model: type[OptionsT] = NoOptions  # type: ignore[assignment]
    description: str = ""


class ElementwiseLossFn(Protocol):
    """An elementwise loss: ``fn(pred, target)``, same shape as ``pred``."""

    def __call__(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor: ...


class TimestepLossFn(Protocol):
    """An elementwise loss that depends on the timestep: ``fn(pred, target, t, schedule)``."""

    def __call__(self, pred: torch.Tensor, target: torch.Tensor, t: torch.Tensor,
                 schedule: NoiseSchedule) -> torch.Tensor: ...


#: What a ``LossSpec`` factory returns: which of the two is the record's
#: ``timestep_aware`` flag.
LossFn: TypeAlias = "ElementwiseLossFn | TimestepLossFn"


@dataclass(frozen=True)
class LossSpec(Generic[OptionsT]):
    """A loss. ``factory(options)`` returns ``fn(pred, target)`` giving the elementwise
    loss (same shape as ``pred``); the engine reduces it. With ``timestep_aware`` the
    function is called ``fn(pred, target, t, schedule)`` instead (``t``: the batch's
    timesteps, ``schedule``: the model's ``NoiseSchedule``).

    """

    name: str
    factory: Callable[[OptionsT], LossFn]
    config_model: type[OptionsT] = NoOptions  # type: ignore[assignment]  # see OptimizerSpec
    description: str = ""
    timestep_aware: bool = False


@dataclass(frozen=True)
class AdapterSpec(Generic[OptionsT]):
    """An adapter algorithm.

    ``create(layer, rank, alpha, options, generator)`` builds a fresh adapter for one
    base layer (its delta weight must be exactly zero); ``load(layer, tensors, options)``
    rebuilds one from saved tensors keyed by parameter name (``lora_down.weight``...),
    inferring shapes; ``owns_keys(param_names)`` says whether a saved module is in this
    algorithm's format. ``network_module`` is written to ``ss_network_module``.
    """

    name: str
    create: Callable[[nn.Module, int, float, OptionsT, torch.Generator], AdapterLayer]
    load: Callable[[nn.Module, dict[str, torch.Tensor], OptionsT], AdapterLayer]
    owns_keys: Callable[[set[str]], bool]
    config_model: type[OptionsT] = NoOptions  # type: ignore[assignment]  # see OptimizerSpec
    network_module: str = ""
    layer_types: tuple[type[nn.Module], ...] = ()
    description: str = ""
    #: ``file_metadata(options) -> {key: value}``: notes the algorithm adds to the
    #: file's metadata (e.g. how to read its ``alpha``).
    file_metadata: Callable[[OptionsT], dict[str, str]] | None = None
    #: ``file_options(metadata) -> {option: value}``: the reverse of ``file_metadata``,
    #: the options a file's metadata records that change how its tensors read (DoRA's
    #: norm); every reader passes them to ``load`` (``core/files.py``'s
    #: ``load_options``). Raises ``ValueError`` for a value it does not know.
    file_options: Callable[[Mapping[str, str]], dict[str, object]] | None = None
    #: ``full_rank(adapter) -> rank | None``: for a built adapter, the rank at which an
    #: adapter of this algorithm on that base layer can already reach any update of
    #: the layer's weight, so a larger ``adapter.rank`` adds parameters and nothing
    #: more it can learn (LoRA: min(out, in·kernel)). ``None``, as the field or as
    #: the answer for one layer, where the algorithm has no such clear bound. ``train``
    #: warns when ``adapter.rank`` is above it (``core/checks.py``).
    full_rank: Callable[[AdapterLayer], int | None] | None = None


@dataclass(frozen=True)
class MemoryStrategySpec:
    """A memory strategy. Its ``config_model`` fields become keys of the ``memory``
    section (so ``gradient_checkpointing`` and ``checkpoint_depth`` sit there as in the
    node). ``enabled(config)`` (the whole validated config) says whether it is switched
    on; ``apply(context, memory)`` installs it on the model and adapters of the
    ``BuildContext`` and returns a ``StrategyResult`` (its undo, the attach mode it
    switched to...), a bare undo callable, or ``None``.
    Strategies apply in ascending ``order``."""

    name: str
    config_model: type[BaseModel]
    enabled: Callable[[RunConfig], bool]
    apply: Callable[[BuildContext, BaseModel],
                    StrategyResult | Callable[[], None] | None]
    order: int = 100
    description: str = ""
    #: ``validate(config) -> [problem, ...]`` checks combinations across sections
    #: before anything is built; each problem reads ``key.path: message``.
    validate: Callable[[RunConfig], list[str]] | None = None
    #: True when the strategy puts the frozen base on the compute device itself (block
    #: by block); the engine then leaves the loaded model where it is.
    places_weights: bool = False
    #: ``prepare_base(config) -> transform(path, module)``: a change to the frozen base
    #: made on the host while it loads, before it moves to the device (quantizing
    #: layers as their weights are read). The loader calls the transform for a module
    #: after each of its own tensors arrives, and the build then once for every module;
    #: it must act only on what is loaded and leave done modules alone.
    prepare_base: Callable[[RunConfig], Callable[[str, nn.Module], None]] | None = None
    #: ``describe(config) -> label``: how plans and reports name the strategy with its
    #: settings (e.g. ``gradient_checkpointing(depth 2)``); the name when unset.
    describe: Callable[[RunConfig], str] | None = None
    #: Keys the strategy adds to another plugin section, by section name: each options
    #: model's fields join every member of that section (``{"model": QuantizeOptions}``
    #: gives ``model.quantize``), so an option sits where users look for it while its
    #: declaration stays with the one plugin that reads it.
    extends: Mapping[str, type[BaseModel]] = field(default_factory=dict)

    def label(self, config: RunConfig) -> str:
        """The strategy's name as plans and reports show it for ``config``."""
        return self.describe(config) if self.describe is not None else self.name


@dataclass(frozen=True)
class ModelFamilySpec(Generic[OptionsT]):
    """A model family. ``load(options, context) -> LoadedModel``. ``context`` has
    ``base_dir`` (for relative paths), ``dtype`` (the floating dtype to load in, or
    ``None``), ``prepare`` (the memory strategies' per-module transform of the base to
    apply as weights are read, see ``MemoryStrategySpec.prepare_base``, or ``None``),
    ``looks_like`` (``looks_like(names) -> str | None``: which model, by every
    registered family, the module or tensor names of a file that does not fit were made
    for; also given to ``describe``) and, for in-memory use, ``module``."""

    name: str
    load: Callable[[OptionsT, Mapping[str, object]], LoadedModel]
    config_model: type[OptionsT] = NoOptions  # type: ignore[assignment]  # see OptimizerSpec
    description: str = ""
    #: For ``loraengine prepare``: ``make_encoder(path, options) -> DataEncoder`` builds
    #: the family's VAE + text-encoder front end from a local pipeline folder
    #: (``options``: ``device``, ``dtype``, ``max_sequence_length``); ``None`` when the
    #: family cannot prepare data.
    make_encoder: Callable[[Path, Mapping[str, object]], DataEncoder] | None = None
    #: ``detect(path) -> bool``: whether a pipeline folder holds this family's model.
    detect: Callable[[Path], bool] | None = None
    #: ``layouts(module) -> {layout: {module path: name in that layout}}``: other names
    #: consumers give this family's layers (a UNet's original ``input_blocks.*`` names as
    #: ``ldm``); empty for a module that is not this family's. Files in any of them are
    #: read, and exporters that ask for one (``ExporterSpec.layouts``) write it.
    layouts: Callable[[nn.Module], Mapping[str, Mapping[str, str]]] | None = None
    #: ``looks_like(names) -> str | None``: a few words naming the model of this family
    #: that module names from a file (in any layout) belong to (``"an SDXL UNet"``), or
    #: ``None``; errors about files made for another model use it.
    looks_like: Callable[[Collection[str]], str | None] | None = None
    #: ``describe(options, context) -> ModelLayout``: what the model takes, read from its
    #: config files without loading weights (``loraengine validate``); raises the error
    #: ``load`` would for a missing or unreadable model; with a ``skeleton`` (the model
    #: on the meta device) validate also resolves the adapter targets. ``None``: not
    #: checkable unloaded.
    describe: Callable[[OptionsT, Mapping[str, object]], ModelLayout] | None = None


class DataEncoder(Protocol):
    """What ``loraengine prepare`` needs from a model family.

    ``bucket_multiple``: image sides are multiples of it (VAE factor × what the
    denoiser needs); ``default_resolution``: the side of a square training image;
    ``fingerprint``: changes whenever the encoders or their settings do (keys the cache).
    """

    family: str
    bucket_multiple: int
    default_resolution: int
    fingerprint: str

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """``[B,3,H,W]`` in [-1, 1] -> scaled, shifted latents ``[B,C,h,w]`` (float32)."""
        ...

    def encode_captions(self, captions: list[str]) -> dict[str, torch.Tensor]:
        """Captions -> conditioning tensors, first dimension ``len(captions)``."""
        ...

    def image_conditioning(self, original_hw: tuple[int, int], crop_tl: tuple[int, int],
                           target_hw: tuple[int, int]) -> dict[str, torch.Tensor]:
        """Per-image conditioning that depends on its geometry (SDXL ``time_ids``)."""
        ...


@dataclass(frozen=True)
class LRSchedulerSpec(Generic[OptionsT]):
    """A learning-rate schedule. ``factory(optimizer, total_steps, options)`` returns a
    ``torch.optim.lr_scheduler.LRScheduler`` stepped once per optimizer step."""

    name: str
    factory: Callable[[torch.optim.Optimizer, int, OptionsT],
                      torch.optim.lr_scheduler.LRScheduler]
    config_model: type[OptionsT] = NoOptions  # type: ignore[assignment]  # see OptimizerSpec
    description: str = ""


class ExporterLimits(Protocol):
    """``ExporterSpec.limits``: the lines naming what a consumer cannot express."""

    def __call__(self, modules: Mapping[str, tuple[str, Collection[str]]], *,
                 metadata: Mapping[str, str] | None = None) -> list[str]: ...


@dataclass(frozen=True)
class ExporterSpec:
    """A key format for LoRA files.

    ``to_file(modules)`` maps ``{module_path: {param: tensor}}`` to flat file keys;
    ``from_file(tensors, module_paths)`` maps file keys back, returning ``None`` when the
    file is not in this format. ``module_paths`` are the adaptable paths of the model.
    """

    name: str
    to_file: Callable[[Mapping[str, Mapping[str, torch.Tensor]]], dict[str, torch.Tensor]]
    from_file: Callable[
        [Mapping[str, torch.Tensor], Iterable[str]], dict[str, dict[str, torch.Tensor]] | None
    ]
    description: str = ""
    #: Module-name layouts this format writes, best first (``ModelFamilySpec.layouts``):
    #: the first one the model's family offers renames the module paths before
    #: ``to_file``; with none offered, the model's own paths are written.
    layouts: tuple[str, ...] = ()
    #: ``limits(modules, metadata=...) -> lines``: what the format's consumer cannot
    #: express of a file, given ``{module name: (algorithm, parameter names)}`` (names
    #: as the file will have them, in the layout ``layouts`` picks; the parameter names
    #: may be a mapping of name -> shape, for limits that depend on a shape) and the
    #: file's metadata (what the algorithm's ``file_metadata`` records, e.g. DoRA's
    #: norm); one line each, naming the consumer. ``train`` warns with them
    #: (``core/checks.py``), ``convert`` measures them.
    limits: ExporterLimits | None = None


@dataclass(frozen=True)
class TimestepSamplerSpec(Generic[OptionsT]):
    """A training-timestep distribution. ``factory(options, schedule)`` returns
    ``draw(generator) -> t``: one timestep (a 0-dim tensor in the schedule's units: an
    integer step for DDPM schedules, sigma in [0, 1] for flow) per call, drawn only from
    ``generator``."""

    name: str
    factory: Callable[[OptionsT, NoiseSchedule], Callable[[torch.Generator], torch.Tensor]]
    config_model: type[OptionsT] = NoOptions  # type: ignore[assignment]  # see OptimizerSpec
    description: str = ""


@dataclass(frozen=True)
class LossWeightingSpec(Generic[OptionsT]):
    """Per-sample loss weights. ``factory(options, schedule, loss_target)`` returns
    ``weights(t) -> w``: a float tensor ``[B]`` for the timesteps ``[B]``, multiplying
    each sample's loss. ``loss_target`` is ``native`` or ``x0`` (``loss.target``)."""

    name: str
    factory: Callable[[OptionsT, NoiseSchedule, str], Callable[[torch.Tensor], torch.Tensor]]
    config_model: type[OptionsT] = NoOptions  # type: ignore[assignment]  # see OptimizerSpec
    description: str = ""


@dataclass(frozen=True)
class RecipeSpec:
    """A training tweak (noise offset, EMA...). Its ``config_model`` fields become keys
    of the ``recipe`` section. ``enabled(config)`` says whether it is switched on;
    ``build(config, pipeline)`` returns a ``loraengine.core.recipe.Recipe`` whose hooks
    the trainer calls. Recipes run in ascending ``order``.

    ``pipeline`` is the assembled ``loraengine.core.build.Pipeline``, which is made
    from this registry and so cannot be named here."""

    name: str
    config_model: type[BaseModel]
    enabled: Callable[[TrainConfig], bool]
    build: Callable[[TrainConfig, object], Recipe]
    order: int = 100
    description: str = ""


class SampleFn(Protocol):
    """What a ``SamplerSpec`` factory returns (see there)."""

    def __call__(self, model_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                 noise: torch.Tensor, schedule: NoiseSchedule, steps: int,
                 generator: list[torch.Generator]) -> torch.Tensor: ...


@dataclass(frozen=True)
class SamplerSpec(Generic[OptionsT]):
    """A sampler for preview images and ``loraengine sample``.

    ``factory(options)`` returns ``sample(model_fn, noise, schedule, steps, generator)
    -> x0``. ``model_fn(x_t, t)`` gives the model's native prediction (guidance already
    applied) for ``x_t`` at ``t``, a 0-dim float64 tensor in the schedule's units (a DDPM
    timestep, possibly fractional, or σ for flow); ``noise`` is the unit-variance start
    ``[B, ...]``; ``generator`` feeds any stochastic part: a list of one
    ``torch.Generator`` per row, so that row ``i`` draws only from ``generator[i]``
    (an image must not depend on what is sampled beside it). ``prediction_types`` lists the
    schedule kinds (``epsilon``, ``v_prediction``, ``flow``) it can sample."""

    name: str
    factory: Callable[[OptionsT], SampleFn]
    config_model: type[OptionsT] = NoOptions  # type: ignore[assignment]  # see OptimizerSpec
    prediction_types: tuple[str, ...] = ("epsilon", "v_prediction", "flow")
    description: str = ""
    #: Prediction types for which this sampler is what ``sampler: auto`` picks.
    default_for: tuple[str, ...] = ()


@dataclass(frozen=True)
class LoggerSpec:
    """A logger that ``output.loggers`` names (TensorBoard, MLflow, the JSON-lines
    event stream...).

    ``factory()`` is called just before ``loraengine_on_train_start`` on the first rank
    of a run that writes files; it returns a plugin object whose lifecycle hooks
    (``loraengine_on_train_start``, where it opens what it writes to,
    ``loraengine_on_step_end``, ``loraengine_on_save``, ``loraengine_on_train_end``)
    receive that run only: it is unregistered after the run. ``missing()`` is asked when
    the config is read: ``None`` when the logger can run here, else what to install
    (e.g. ``"the tensorboard package: pip install 'loraengine[tensorboard]'"``),
    which makes the config error."""

    name: str
    factory: Callable[[], object]
    missing: Callable[[], str | None] | None = None
    description: str = ""


#: Any record a registration hook may return.
AnySpec: TypeAlias = (
    OptimizerSpec[BaseModel] | LossSpec[BaseModel] | AdapterSpec[BaseModel]
    | MemoryStrategySpec | ModelFamilySpec[BaseModel] | LRSchedulerSpec[BaseModel]
    | ExporterSpec | TimestepSamplerSpec[BaseModel] | LossWeightingSpec[BaseModel]
    | RecipeSpec | SamplerSpec[BaseModel] | LoggerSpec)


@dataclass(frozen=True)
class ProvidedSpec:
    """A spec together with where it came from (for listings and clash errors)."""

    category: str
    spec: AnySpec
    plugin: str
    distribution: str | None = None
    version: str | None = None

    @property
    def name(self) -> str:
        return self.spec.name
