"""Config -> Pipeline: the model, data, adapters, memory strategies, optimizer, loss."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import torch
from pydantic import BaseModel, PydanticUserError, TypeAdapter, ValidationError
from torch import nn

from loraengine.core.adapter import (
    ADAPTABLE,
    NORMS,
    AdapterLayer,
    AdapterNetwork,
    AttachMode,
    ChannelDelta,
    select_layers,
)
from loraengine.core.compile import apply_compile
from loraengine.core.config.root import PLUGIN_SECTIONS
from loraengine.core.data import (
    DataExpectations,
    Dataset,
    first_nonfinite,
    make_bucketed_dataset,
    make_dataset,
    read_safetensors,
    read_safetensors_layout,
)
from loraengine.core.devices import (
    DTYPES,
    resolve_device,
    return_freed_host_memory,
    set_host_memory,
)
from loraengine.core.distributed import DistContext, shard_base, wrap_ddp
from loraengine.core.errors import ConfigError, DataError, LoraEngineError
from loraengine.core.files import (
    looks_like,
    option_conflicts,
    read_adapter_file,
    text_encoder_note,
    unplaced_message,
    unread_message,
)
from loraengine.core.model import LoadedModel
from loraengine.core.plugins.assembly import BuildContext, HostStreaming, StrategyResult
from loraengine.core.plugins.host import PluginHost
from loraengine.core.plugins.registry import Registry
from loraengine.core.plugins.specs import LossFn
from loraengine.core.preflight import preflight
from loraengine.core.recipe import Recipe, build_recipes
from loraengine.core.seeding import make_generator


@dataclass(frozen=True)
class Pipeline:
    """Everything the trainer needs, built and wired; frozen once assembled (memory
    strategies and recipes report what they change through records that the assembly
    folds in, see ``_assemble``)."""

    config: Any
    host: PluginHost
    loaded: LoadedModel
    dataset: Dataset
    network: AdapterNetwork
    adapter_spec: Any
    optimizer: torch.optim.Optimizer
    lr_scheduler: Any
    loss_fn: LossFn
    device: torch.device
    compute_dtype: torch.dtype
    save_dtype: torch.dtype
    previous_steps: int = 0
    attach_mode: AttachMode = "weight"
    validation: Dataset | None = None
    dist: DistContext = field(default_factory=DistContext)
    denoise: Callable[..., torch.Tensor] | None = None  # the DDP-wrapped model call
    sharded: bool = False  # FSDP2 base: the trainer averages adapter gradients itself
    #: What ``close`` undoes, last first; it empties as it goes, so closing twice is safe.
    undo: list[Callable[[], None]] = field(default_factory=list)
    # Training recipes (core/recipe.py): None/empty keep the family's own behaviour.
    timestep_sampler: Callable[[torch.Generator], torch.Tensor] | None = None
    loss_weighting: Callable[[torch.Tensor], torch.Tensor] | None = None
    loss_timestep_aware: bool = False
    recipes: list[Recipe] = field(default_factory=list)
    #: The record name of each of ``recipes`` (what an error in one of its hooks names).
    recipe_names: tuple[str, ...] = ()
    #: Tensors a memory strategy keeps on the host (offloading's copies of the base).
    host_resident: tuple[torch.Tensor, ...] = ()
    #: The transfer counter of a strategy that streams the base from the host.
    offloader: HostStreaming | None = None

    @property
    def model(self) -> nn.Module:
        return self.loaded.module

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.network.parameters() if p.requires_grad]

    def per_sample_loss(self, pred: torch.Tensor, target: torch.Tensor, t: torch.Tensor
                        ) -> torch.Tensor:
        """Each sample's loss ``[B]``: the elementwise loss averaged over all but the
        batch dimension. The loss plugin is named when its function raises or breaks
        its contract (a tensor of ``pred``'s shape that gradients flow through)."""
        fn: Any = self.loss_fn
        try:
            elem = fn(pred, target, t, self.loaded.schedule) if self.loss_timestep_aware \
                else fn(pred, target)
            if not isinstance(elem, torch.Tensor) or elem.shape != pred.shape or (
                    pred.requires_grad and not elem.requires_grad):
                raise loss_contract_error(elem, pred)
        except torch.OutOfMemoryError:
            raise
        except Exception:
            with self.host.registry.blame("loss", self.config.loss.name, "function"):
                raise
        result: torch.Tensor = elem.flatten(1).mean(dim=1)
        return result

    def loss_weights(self, t: torch.Tensor) -> torch.Tensor:
        """Per-sample loss weights ``[B]`` for the timesteps ``t`` (ones by default); the
        weighting plugin is named when it raises or returns anything but ``[B]``."""
        if self.loss_weighting is None:
            return torch.ones(t.shape[0], device=t.device)
        try:
            weights = self.loss_weighting(t)
            if not isinstance(weights, torch.Tensor) or weights.shape != t.shape[:1]:
                got = (f"shape {list(weights.shape)}" if isinstance(weights, torch.Tensor)
                       else _returned(weights))
                raise TypeError(f"it returned {got} for {t.shape[0]} timesteps; weights(t) "
                                f"returns a tensor [B], one weight per sample")
        except torch.OutOfMemoryError:
            raise
        except Exception:
            with self.host.registry.blame("loss_weighting", self.config.loss_weighting.name,
                                          "weights"):
                raise
        return weights

    def close(self) -> None:
        """Remove every hook and patch the pipeline put on the model."""
        _undo_all(self.undo, self.network)
        self.dist.close()


def _returned(value: object) -> str:
    """``None``, or ``a float``: what a plugin returned, for its error."""
    return "None" if value is None else f"a {type(value).__name__}"


def loss_contract_error(elem: object, pred: torch.Tensor) -> TypeError:
    """What is wrong with ``elem``, a loss function's output for ``pred``."""
    if not isinstance(elem, torch.Tensor):
        return TypeError(f"it returned {_returned(elem)}, not a tensor; fn(pred, target) returns "
                         f"the elementwise loss, a tensor of pred's shape")
    if elem.shape != pred.shape:
        return TypeError(f"it returned shape {list(elem.shape)} for a prediction of shape "
                         f"{list(pred.shape)}; fn(pred, target) returns the elementwise "
                         f"loss in pred's shape, unreduced (the engine averages it)")
    return TypeError("it returned a tensor no gradient flows back through (detached, or "
                     "computed under torch.no_grad); the loss must stay differentiable")


def check_optimizer(optimizer: object) -> None:
    """A ``TypeError`` (the factory's ``blame`` names the plugin) when what an optimizer
    factory returned lacks what the trainer uses: ``step``, ``zero_grad`` and
    ``param_groups``, a non-empty list of groups each with its ``lr``."""
    missing = [a for a in ("step", "zero_grad") if not callable(getattr(optimizer, a, None))]
    groups = getattr(optimizer, "param_groups", None)
    if not (isinstance(groups, Sequence) and groups
            and all(isinstance(g, Mapping) and "lr" in g for g in groups)):
        missing.append("param_groups")
    if missing:
        named = " or ".join([", ".join(missing[:-1]), missing[-1]] if len(missing) > 1
                            else missing)
        raise TypeError(f"it returned {_returned(optimizer)}, which has no usable {named}; the "
                        f"factory returns a torch.optim.Optimizer over the parameters it is "
                        f"given")


def check_lr_scheduler(scheduler: object) -> None:
    """A ``TypeError`` (the factory's ``blame`` names the plugin) when what a learning
    rate schedule factory returned has no ``step``."""
    if not callable(getattr(scheduler, "step", None)):
        hint = (" (a function of the step goes in torch.optim.lr_scheduler.LambdaLR("
                "optimizer, fn))" if callable(scheduler) else "")
        raise TypeError(f"it returned {_returned(scheduler)}, which has no step(); the factory "
                        f"returns a torch.optim.lr_scheduler.LRScheduler{hint}")


def _undo_all(undo: list[Callable[[], None]], network: AdapterNetwork) -> None:
    while undo:
        undo.pop()()
    network.detach()


def load_model(config: Any, host: PluginHost, module: nn.Module | None = None,
               base_dir: Path | None = None,
               prepare: Callable[[str, nn.Module], None] | None = None) -> LoadedModel:
    spec = host.registry.get("model", config.model.family)
    with host.registry.blame("model", spec.name, "load"):
        # dtype: what training.dtype converts the model to, so that a family can load
        # the weights in it directly instead of converting a full-precision copy
        tdtype = config.training.dtype
        loaded: LoadedModel = spec.load(config.model, {
            "base_dir": base_dir, "module": module,
            "dtype": None if tdtype == "none" else DTYPES[tdtype], "prepare": prepare,
            "looks_like": lambda names: looks_like(host.registry, names)})
    loaded.family = loaded.family or spec.name
    return loaded


def load_data(config: Any, loaded: LoadedModel, latents: Any = None,
              conditioning: Any = None) -> Dataset:
    """The training data (given in memory, else read from ``data.latents`` /
    ``data.conditioning``), checked against what ``loaded`` takes."""
    latents, lat_name = _given_or_read(latents, config.data.latents, "latents", "latents")
    conditioning, cond_name = _given_or_read(conditioning, config.data.conditioning,
                                             "conditioning", "cond")
    expect = data_expectations(config, loaded)
    if config.data.bucket_mode:
        if not isinstance(latents, Mapping) or not isinstance(conditioning, Mapping):
            raise DataError("data.bucket_mode: give latents and conditioning as mappings "
                            "with latents.<i> / cond.<i> per bucket")
        return make_bucketed_dataset(latents, conditioning, required=loaded.cond_keys,
                                     latents_name=lat_name, cond_name=cond_name,
                                     expect=expect)
    return make_dataset(latents, conditioning, required=loaded.cond_keys,
                        latents_name=lat_name, cond_name=cond_name, expect=expect)


def load_validation(config: Any, loaded: LoadedModel) -> Dataset | None:
    """The held-out set of ``data.validation`` (checked like the training data), or
    ``None`` when there is none."""
    val = config.data.validation
    if val is None:
        return None
    return make_dataset(read_safetensors(val.latents, "validation latents"),
                        read_safetensors(val.conditioning, "validation conditioning"),
                        required=loaded.cond_keys, latents_name=str(val.latents),
                        cond_name=str(val.conditioning),
                        expect=data_expectations(config, loaded))


def data_expectations(config: Any, loaded: LoadedModel) -> DataExpectations:
    """What the data must look like for ``loaded``'s denoiser, from its family."""
    return DataExpectations(latent_ndim=loaded.latent_ndim,
                            latent_channels=loaded.latent_channels,
                            cond_widths=dict(loaded.cond_widths),
                            allow_nonfinite=bool(config.data.allow_nonfinite))


def _given_or_read(given: Any, path: Path | None, key: str, tensor: str
                   ) -> tuple[Any, str]:
    """In-memory data as given, else read from the ``data.<key>`` file; with the name
    errors use for it."""
    if given is not None:
        return given, key
    if path is None:
        raise ConfigError(f"data.{key}: required (a safetensors file with '{tensor}')")
    return read_safetensors(path, key), str(path)


def adapter_include(acfg: Any, default_include: Sequence[str] | None) -> list[str]:
    """The target patterns of the adapter section ``acfg``: ``adapter.include`` as set,
    else the family's own default targets where it has them."""
    if "include" not in acfg.model_fields_set and default_include:
        return list(default_include)
    return list(acfg.include)


def build_adapters(config: Any, host: PluginHost, loaded: LoadedModel, device: torch.device
                   ) -> tuple[AdapterNetwork, Any, int]:
    """Create (or restore from ``adapter.existing``) one adapter per selected layer."""
    acfg = config.adapter
    spec = host.registry.get("adapter", acfg.algorithm)
    include = adapter_include(acfg, getattr(loaded, "default_include", None))
    layers = select_layers(loaded.module, include, acfg.exclude,
                           spec.layer_types or ADAPTABLE)
    alpha = float(acfg.alpha) if acfg.alpha is not None else float(acfg.rank)
    param_dtype = torch.float32 if (acfg.dtype == "fp32" or acfg.master_weights) else \
        DTYPES[acfg.dtype]
    saved: dict[str, dict[str, torch.Tensor]] = {}
    saved_deltas: dict[str, dict[str, torch.Tensor]] = {}
    previous_steps = 0
    norms = _norm_layers(loaded.module, include, acfg.exclude)
    if acfg.existing is not None:
        saved, saved_deltas, previous_steps = _read_existing(
            acfg.existing, host, layers, norms, spec, loaded.module, acfg)
    g = make_generator(config.training.seed, "init")
    built: dict[str, AdapterLayer] = {}
    fresh: list[str] = []
    for path in sorted(layers):
        base = layers[path]
        if saved.get(path):
            try:
                layer = spec.load(base, saved[path], acfg)
            except LoraEngineError:
                raise
            except Exception as exc:
                raise DataError(f"{acfg.existing}: module {path}: cannot restore "
                                f"{spec.name} adapter: {exc}") from None
            with host.registry.blame("adapter", spec.name, "load"):
                check_adapter_layer(layer, path)
        else:
            with host.registry.blame("adapter", spec.name, "create"):
                layer = spec.create(base, acfg.rank, alpha, acfg, g)
                check_adapter_layer(layer, path)
            if saved:
                fresh.append(path)
        layer.algorithm = spec.name
        layer.path = acfg.path
        built[path] = layer.to(device=device, dtype=param_dtype)
    if fresh:
        warnings.warn(f"{acfg.existing}: {len(fresh)} layer(s) not in the file start fresh: "
                      f"{', '.join(fresh[:10])}{' ...' if len(fresh) > 10 else ''}",
                      stacklevel=2)
    # a layer whose adapter trains its own bias delta (``full``'s diff_b) gets no second
    # one: both would be saved under the same key
    own_bias = {p for p, layer in built.items() if layer.delta_bias() is not None}
    deltas = _build_deltas(acfg, {**norms, **{p: m for p, m in layers.items()
                                              if p not in own_bias}}, saved_deltas)
    for delta in deltas.values():
        delta.to(device=device, dtype=param_dtype)
    return AdapterNetwork(built, deltas), spec, previous_steps


def check_adapter_layer(layer: object, path: str) -> None:
    """A ``TypeError`` (the ``blame`` around ``create``/``load`` names the plugin) for
    a layer that could not train: not an ``AdapterLayer``, without a trainable
    parameter, or holding a tensor that asks for gradients as a plain attribute (it is
    no registered parameter, so the optimizer never sees it and it never learns)."""
    if not isinstance(layer, AdapterLayer):
        raise TypeError(f"it returned {_returned(layer)} for layer {path}, not a loraengine "
                        f"AdapterLayer")
    kind = type(layer).__name__
    for owner, module in layer.named_modules():
        for attr, value in vars(module).items():
            if isinstance(value, torch.Tensor) and value.requires_grad and not isinstance(
                    value, nn.Parameter):
                where = f"{owner}.{attr}" if owner else attr
                raise TypeError(f"its {kind} for layer {path} holds tensor {where!r} with "
                                f"requires_grad=True as a plain attribute, not an "
                                f"nn.Parameter: the optimizer never sees it and it never "
                                f"learns (assign nn.Parameter(tensor) instead)")
    if not any(p.requires_grad for p in layer.parameters()):
        raise TypeError(f"its {kind} for layer {path} has no trainable parameter (none "
                        f"registered as an nn.Parameter with requires_grad=True), so "
                        f"there is nothing to train")


def _norm_layers(model: nn.Module, include: list[str], exclude: list[str]
                 ) -> dict[str, nn.Module]:
    try:
        return select_layers(model, include, exclude, NORMS)
    except ConfigError:
        return {}  # a model without norm layers


def _build_deltas(acfg: Any, candidates: Mapping[str, nn.Module],
                  saved: Mapping[str, dict[str, torch.Tensor]]) -> dict[str, ChannelDelta]:
    """``diff``/``diff_b`` deltas: restored from the file, and fresh ones for every
    bias and norm scale when ``adapter.norm_and_bias_deltas`` is on."""
    out: dict[str, ChannelDelta] = {}
    for path in sorted(candidates):
        base = candidates[path]
        if path in saved:
            try:
                out[path] = ChannelDelta.from_tensors(base, saved[path])
            except ValueError as exc:
                raise DataError(f"{acfg.existing}: module {path}: {exc}") from None
        elif acfg.norm_and_bias_deltas:
            delta = ChannelDelta.fresh(base)
            if delta is not None:
                out[path] = delta
    return out


def _read_existing(path: Path, host: PluginHost, layers: Mapping[str, nn.Module],
                   norms: Mapping[str, nn.Module], spec: Any, model: nn.Module | None = None,
                   options: Any = None) -> tuple[dict[str, dict[str, torch.Tensor]],
                                                 dict[str, dict[str, torch.Tensor]], int]:
    """Split a file into algorithm tensors and ``diff``/``diff_b`` deltas per module,
    read the way ``apply`` reads it; each module must be ``spec``'s algorithm, and the
    options its metadata records (``AdapterSpec.file_options``: DoRA's norm) must be
    those of ``options`` (the adapter section), which then rebuild it as ``apply``
    would."""
    if not read_safetensors_layout(path, "adapter.existing"):  # the header alone
        raise DataError(f"adapter.existing: {path} holds no tensors")
    file = read_adapter_file(path, host.registry, [*layers, *norms], model=model)
    bad = first_nonfinite(file.tensors)
    if bad is not None:  # training from it would turn every step non-finite
        raise DataError(f"adapter.existing: {path}: tensor {bad!r} holds NaN or inf values")
    unknown = file.not_in({**layers, **norms})
    if unknown:
        raise DataError(unplaced_message(file, unknown, host.registry, model,
                                         "adapted layers"))
    unread = unread_message(file, host.registry, model)
    if unread:
        raise DataError(unread)
    note = text_encoder_note(file, "trained or written to the output")
    if note:
        warnings.warn(note, stacklevel=2)
    for mod_path, module in file.modules.items():
        if not module.params:
            continue
        if mod_path not in layers:
            raise DataError(f"{path}: module {mod_path} is a norm layer; only diff/diff_b "
                            f"can be applied to it (found {sorted(module.params)})")
        if spec.name not in {s.name for s in module.owners}:
            found = (f"a {module.algorithm} adapter" if module.algorithm
                     else "an adapter of unknown algorithm")
            raise DataError(f"{path}: module {mod_path} holds {found} "
                            f"(keys {sorted(module.params)}), but adapter.algorithm is "
                            f"{spec.name!r}")
    grouped = {p: m.params for p, m in file.modules.items() if m.params}
    if grouped and options is not None:
        conflicts = option_conflicts(spec, file, options, str(path))
        if conflicts:
            raise ConfigError(conflicts[0])
    deltas = {p: m.deltas for p, m in file.modules.items() if m.deltas}
    return grouped, deltas, file.steps


def build_pipeline(config: Any, host: PluginHost, *, model: nn.Module | None = None,
                   latents: Any = None, conditioning: Any = None,
                   base_dir: Path | None = None) -> Pipeline:
    """Build the pipeline; on any failure the model is left unpatched and a process
    group opened here is closed."""
    preflight(config)  # outputs first: a run that cannot write them fails before loading
    device = resolve_device(config.training.device)
    if device.type == "cpu":
        # loading: what the loader frees (a layer's weight once quantized, read buffers)
        # goes back to the system, so the build's peak is that of the live tensors
        return_freed_host_memory()
    dist_ctx = DistContext.from_env(config.training.dist_timeout, device.type)
    if dist_ctx.enabled and device.type == "cuda":
        device = torch.device("cuda", dist_ctx.local_rank)
        torch.cuda.set_device(device)
    try:
        pipe = _assemble(config, host, device, dist_ctx, model, latents, conditioning,
                         base_dir)
    except BaseException:
        dist_ctx.close()
        raise
    if device.type == "cpu":
        set_host_memory(config.training.host_memory)  # the steps: as the config says
    return pipe


def check_option_defaults(config: Any, registry: Registry) -> None:
    """The defaults of every option this config leaves unset, validated as a value
    written in the config would be (pydantic takes a plugin's defaults unchecked): a
    default its own field refuses (``Field(-1.0, gt=0)``) is the error of the plugin
    that declares it, which the message names with the option."""
    for section, (category, key) in PLUGIN_SECTIONS.items():
        options = getattr(config, section, None)
        if options is not None:
            name = getattr(options, key)
            _check_defaults(registry, category, name, section,
                            registry.get(category, name).config_model, options)
    memory = getattr(config, "memory", None)
    for strategy in registry.specs("memory"):
        if memory is not None:
            _check_defaults(registry, "memory", strategy.name, "memory",
                            strategy.config_model, memory)
        for section, extra in strategy.extends.items():
            options = getattr(config, section, None)
            if options is not None:
                _check_defaults(registry, "memory", strategy.name, section, extra, options)
    recipe_section = getattr(config, "recipe", None)
    if recipe_section is not None:
        for recipe in registry.specs("recipe"):
            _check_defaults(registry, "recipe", recipe.name, "recipe", recipe.config_model,
                            recipe_section)


def _check_defaults(registry: Registry, category: str, name: str, section: str,
                    model: type[BaseModel], options: BaseModel) -> None:
    for field_name, info in model.model_fields.items():
        if field_name in options.model_fields_set or info.is_required():
            continue
        value = getattr(options, field_name, None)
        form: Any = Annotated[info.annotation, info]  # a type form, as pydantic takes it
        try:
            check: TypeAdapter[object] = TypeAdapter(form)
        except PydanticUserError:  # a type pydantic takes only inside its model
            continue
        try:
            check.validate_python(value)
        except ValidationError as exc:
            why = exc.errors()[0]["msg"]
            with registry.blame(category, name, "options"):
                raise ValueError(f"option {field_name!r} defaults to {value!r}, which its "
                                 f"own field refuses: {why} (the plugin's default is "
                                 f"wrong; setting {section}.{field_name} in the config "
                                 f"avoids it)") from None


def _assemble(config: Any, host: PluginHost, device: torch.device, dist_ctx: DistContext,
              model: nn.Module | None, latents: Any, conditioning: Any,
              base_dir: Path | None) -> Pipeline:
    reg = host.registry
    check_option_defaults(config, reg)
    strategies = []
    for strategy in reg.specs("memory"):
        with reg.blame("memory", strategy.name, "enabled"):
            if strategy.enabled(config):
                strategies.append(strategy)
    strategies.sort(key=lambda s: s.order)
    prepare = _base_transform(config, strategies)
    loaded = load_model(config, host, model, base_dir, prepare)
    module = loaded.module
    module.requires_grad_(False)
    module.eval()  # no dropout: all randomness comes from the seeded generators
    tdtype = config.training.dtype
    if tdtype != "none":
        module.to(dtype=DTYPES[tdtype])
    compute_dtype = next((p.dtype for p in module.parameters() if p.is_floating_point()),
                         torch.float32)
    if prepare is not None:
        # on the host, before the move: what the loader did not transform (a model
        # given in memory, one diffusers loaded) changes here, one module at a time
        for path, sub in module.named_modules():
            prepare(path, sub)
    if device.type == "meta" or not any(s.places_weights for s in strategies):
        module.to(device)  # else a strategy streams the base to the device itself
    dataset = load_data(config, loaded, latents, conditioning)
    validation = load_validation(config, loaded)
    network, adapter_spec, previous = build_adapters(config, host, loaded, device)
    opt_name, sched_name, loss_name = (config.optimizer.name, config.lr_scheduler.name,
                                       config.loss.name)
    with reg.blame("optimizer", opt_name, "factory"):
        optimizer = reg.get("optimizer", opt_name).factory(
            list(p for p in network.parameters() if p.requires_grad), config.optimizer.lr,
            config.optimizer)
        check_optimizer(optimizer)
    with reg.blame("lr_scheduler", sched_name, "factory"):
        lr_scheduler = reg.get("lr_scheduler", sched_name).factory(
            optimizer, config.training.steps, config.lr_scheduler)
        check_lr_scheduler(lr_scheduler)
    with reg.blame("loss", loss_name, "factory"):
        loss_fn = reg.get("loss", loss_name).factory(config.loss)
        if not callable(loss_fn):
            raise TypeError(f"it returned {_returned(loss_fn)}, not a function; the factory "
                            f"returns fn(pred, target), the elementwise loss")
    ctx = BuildContext(config=config, loaded=loaded, network=network, device=device)
    undo: list[Callable[[], None]] = []
    attach_mode: AttachMode = "weight"
    host_resident: list[torch.Tensor] = []
    offloader: HostStreaming | None = None
    denoise = None
    sharded = False
    try:
        network.attach("weight")
        for spec in strategies:
            with reg.blame("memory", spec.name, "apply"):
                done = _as_result(spec.apply(ctx, config.memory))
            if done.undo is not None:
                undo.append(done.undo)
            attach_mode = done.attach_mode or attach_mode
            host_resident.extend(done.host_resident)
            offloader = done.streaming or offloader
        # last: the compiled forwards wrap what the strategies installed
        undo.append(apply_compile(config.training.compile, loaded, device, offloader))
        parts = build_recipes(ctx, reg)
        if dist_ctx.enabled:
            dist_ctx.slice_of(config.training.batch_size)  # checks the split early
            if config.training.fsdp:
                shard_base(module, loaded.blocks, device)
                sharded = True
            else:
                denoise = wrap_ddp(module, network, loaded.predict, device)
    except BaseException:
        _undo_all(undo, network)  # the caller's model leaves as it came
        raise
    return Pipeline(config=config, host=host, loaded=loaded, dataset=dataset,
                    network=network, adapter_spec=adapter_spec, optimizer=optimizer,
                    lr_scheduler=lr_scheduler, loss_fn=loss_fn, device=device,
                    compute_dtype=compute_dtype, save_dtype=DTYPES[config.adapter.dtype],
                    previous_steps=previous, attach_mode=attach_mode,
                    validation=validation, dist=dist_ctx, denoise=denoise, sharded=sharded,
                    undo=undo, timestep_sampler=parts.timestep_sampler,
                    loss_weighting=parts.loss_weighting,
                    loss_timestep_aware=parts.loss_timestep_aware, recipes=parts.recipes,
                    recipe_names=parts.recipe_names,
                    host_resident=tuple(host_resident), offloader=offloader)


def _base_transform(config: Any, strategies: list[Any]
                    ) -> Callable[[str, nn.Module], None] | None:
    """The enabled strategies' ``prepare_base`` transforms as one, in their order."""
    steps = [s.prepare_base(config) for s in strategies if s.prepare_base is not None]
    if not steps:
        return None

    def prepare(path: str, module: nn.Module) -> None:
        for step in steps:
            step(path, module)

    return prepare


def _as_result(returned: StrategyResult | Callable[[], None] | None) -> StrategyResult:
    """A strategy's ``apply`` result as a record (a bare callable is its undo)."""
    if returned is None:
        return StrategyResult()
    if isinstance(returned, StrategyResult):
        return returned
    return StrategyResult(undo=returned)
