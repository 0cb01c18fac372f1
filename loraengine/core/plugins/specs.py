"""Typed records that plugins return from the registration hooks.

Every record names the thing it provides and carries a pydantic model for its own
options (``extra="forbid"``) plus a factory. The engine only ever sees these records.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from pydantic import BaseModel, ConfigDict

if TYPE_CHECKING:
    import torch

    from loraengine.core.adapter import AdapterLayer
    from loraengine.core.model import LoadedModel
    from loraengine.core.plugins.assembly import BuildContext, RunConfig, StrategyResult


class PluginOptions(BaseModel):
    """Base for a plugin's own options: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid")


class NoOptions(PluginOptions):
    """For plugins that take no options."""


@dataclass(frozen=True)
class OptimizerSpec:
    """An optimizer. ``factory(params, lr, options) -> torch.optim.Optimizer``."""

    name: str
    factory: Callable[[Iterable[torch.nn.Parameter], float, Any], torch.optim.Optimizer]
    config_model: type[BaseModel] = NoOptions
    description: str = ""


class LossFn(Protocol):
    def __call__(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor: ...


@dataclass(frozen=True)
class LossSpec:
    """A loss. ``factory(options)`` returns ``fn(pred, target)`` giving the elementwise
    loss (same shape as ``pred``); the engine reduces it. With ``timestep_aware`` the
    function is called ``fn(pred, target, t, schedule)`` instead (``t``: the batch's
    timesteps, ``schedule``: the model's ``NoiseSchedule``)."""

    name: str
    factory: Callable[[Any], LossFn]
    config_model: type[BaseModel] = NoOptions
    description: str = ""
    timestep_aware: bool = False


@dataclass(frozen=True)
class AdapterSpec:
    """An adapter algorithm.

    ``create(layer, rank, alpha, options, generator)`` builds a fresh adapter for one
    base layer (its delta weight must be exactly zero); ``load(layer, tensors, options)``
    rebuilds one from saved tensors keyed by parameter name (``lora_down.weight``...),
    inferring shapes; ``owns_keys(param_names)`` says whether a saved module is in this
    algorithm's format. ``network_module`` is written to ``ss_network_module``.
    """

    name: str
    create: Callable[..., AdapterLayer]
    load: Callable[..., AdapterLayer]
    owns_keys: Callable[[set[str]], bool]
    config_model: type[BaseModel] = NoOptions
    network_module: str = ""
    layer_types: tuple[type, ...] = ()
    description: str = ""
    #: ``file_metadata(options) -> {key: value}``: notes the algorithm adds to the
    #: file's metadata (e.g. how to read its ``alpha``).
    file_metadata: Callable[[Any], dict[str, str]] | None = None


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
    #: ``describe(config) -> label``: how plans and reports name the strategy with its
    #: settings (e.g. ``gradient_checkpointing(depth 2)``); the name when unset.
    describe: Callable[[RunConfig], str] | None = None

    def label(self, config: RunConfig) -> str:
        """The strategy's name as plans and reports show it for ``config``."""
        return self.describe(config) if self.describe is not None else self.name


@dataclass(frozen=True)
class ModelFamilySpec:
    """A model family. ``load(options, context) -> LoadedModel``. ``context`` has
    ``base_dir`` (for relative paths) and, for in-memory use, ``module``."""

    name: str
    load: Callable[[Any, Mapping[str, Any]], LoadedModel]
    config_model: type[BaseModel] = NoOptions
    description: str = ""
    #: For ``loraengine prepare``: ``make_encoder(path, options) -> DataEncoder`` builds
    #: the family's VAE + text-encoder front end from a local pipeline folder
    #: (``options``: ``device``, ``dtype``, ``max_sequence_length``); ``None`` when the
    #: family cannot prepare data.
    make_encoder: Callable[[Any, Mapping[str, Any]], DataEncoder] | None = None
    #: ``detect(path) -> bool``: whether a pipeline folder holds this family's model.
    detect: Callable[[Any], bool] | None = None


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
class LRSchedulerSpec:
    """A learning-rate schedule. ``factory(optimizer, total_steps, options)`` returns a
    ``torch.optim.lr_scheduler.LRScheduler`` stepped once per optimizer step."""

    name: str
    factory: Callable[[torch.optim.Optimizer, int, Any], Any]
    config_model: type[BaseModel] = NoOptions
    description: str = ""


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


@dataclass(frozen=True)
class TimestepSamplerSpec:
    """A training-timestep distribution. ``factory(options, schedule)`` returns
    ``draw(generator) -> t``: one timestep (a 0-dim tensor in the schedule's units: an
    integer step for DDPM schedules, sigma in [0, 1] for flow) per call, drawn only from
    ``generator``."""

    name: str
    factory: Callable[[Any, Any], Callable[[torch.Generator], torch.Tensor]]
    config_model: type[BaseModel] = NoOptions
    description: str = ""


@dataclass(frozen=True)
class LossWeightingSpec:
    """Per-sample loss weights. ``factory(options, schedule, loss_target)`` returns
    ``weights(t) -> w``: a float tensor ``[B]`` for the timesteps ``[B]``, multiplying
    each sample's loss. ``loss_target`` is ``native`` or ``x0`` (``loss.target``)."""

    name: str
    factory: Callable[[Any, Any, str], Callable[[torch.Tensor], torch.Tensor]]
    config_model: type[BaseModel] = NoOptions
    description: str = ""


@dataclass(frozen=True)
class RecipeSpec:
    """A training tweak (noise offset, EMA...). Its ``config_model`` fields become keys
    of the ``recipe`` section. ``enabled(config)`` says whether it is switched on;
    ``build(config, pipeline)`` returns a ``loraengine.core.recipe.Recipe`` whose hooks
    the trainer calls. Recipes run in ascending ``order``."""

    name: str
    config_model: type[BaseModel]
    enabled: Callable[[Any], bool]
    build: Callable[[Any, Any], Any]
    order: int = 100
    description: str = ""


@dataclass(frozen=True)
class SamplerSpec:
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
    factory: Callable[[Any], Callable[..., torch.Tensor]]
    config_model: type[BaseModel] = NoOptions
    prediction_types: tuple[str, ...] = ("epsilon", "v_prediction", "flow")
    description: str = ""
    #: Prediction types for which this sampler is what ``sampler: auto`` picks.
    default_for: tuple[str, ...] = ()


@dataclass(frozen=True)
class ProvidedSpec:
    """A spec together with where it came from (for listings and clash errors)."""

    category: str
    spec: Any
    plugin: str
    distribution: str | None = None
    version: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.spec.name
