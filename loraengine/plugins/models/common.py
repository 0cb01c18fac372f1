"""What the diffusion-model families share: finding and loading a denoiser from a local
pipeline folder, a model folder or a single original-layout ``.safetensors`` file, and
reading the pipeline's scheduler and VAE settings. Nothing is ever fetched from a hub.

A family is described by a :class:`Family` record; :func:`make_spec` turns it into the
``ModelFamilySpec`` the registry sees.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, Literal, cast

from pydantic import Field
from torch import nn

from loraengine.core.config.root import ConfigPath
from loraengine.core.errors import ConfigError, DataError
from loraengine.core.model import LoadedModel, ModelLayout, PredictFn
from loraengine.core.plugins.specs import ModelFamilySpec, PluginOptions
from loraengine.core.schedule import NoiseSchedule

if TYPE_CHECKING:
    from loraengine.plugins.models.flow import FlowCall, ShiftRule

SINGLE_FILE_SUFFIXES = (".safetensors", ".sft")
#: The prediction types of a DDPM schedule.
DDPMKind = Literal["epsilon", "v_prediction"]


class FamilyOptions(PluginOptions):
    """Where the model is. Shared by every diffusers-based family."""

    path: ConfigPath = Field(description="A diffusers pipeline folder, its unet/transformer "
                             "folder, or a single original-layout .safetensors file.")
    subfolder: str | None = Field(None, description="Model subfolder of a pipeline folder "
                                  "(default: the family's, unet or transformer).")
    config: ConfigPath | None = Field(None, description="For a single-file checkpoint: a "
                                      "local diffusers folder with the model's config.json "
                                      "(a pipeline folder or the model folder itself).")


class DDPMOptions(FamilyOptions):
    """Options of the UNet families (discrete DDPM schedule)."""

    prediction_type: Literal["auto", "epsilon", "v_prediction"] = Field(
        "auto", description="auto: the pipeline's scheduler config, else the family's "
        "default.")


class FlowOptions(FamilyOptions):
    """Options of the rectified-flow families."""

    flow_shift: float | None = Field(None, gt=0, description="Timestep shift s: "
                                     "σ' = s·σ/(1+(s−1)·σ), the one shift of this model: "
                                     "training timesteps and sampling both use it. "
                                     "Default: the scheduler config's shift (when it "
                                     "shifts by resolution, each batch's own size's, see "
                                     "shift_resolution), else the family's.")
    shift_resolution: int | None = Field(
        None, gt=0, description="For a scheduler that shifts by resolution "
        "(use_dynamic_shifting): train and sample every batch with the shift its "
        "pipeline uses for a square image of this many pixels a side. Default: each "
        "batch with the shift of its own latent size (its bucket), as the pipeline "
        "computes it for that size. flow_shift wins.")


class GuidanceOptions(FlowOptions):
    """Options of the families whose transformer may embed a guidance value (FLUX.1,
    FLUX.2)."""

    guidance: float = Field(1.0, ge=0, description="Guidance value fed to a guidance-"
                            "distilled model (Flux dev) while training.")


#: (latent channels, conditioning widths by tensor name) a denoiser takes; ``None`` /
#: absent where its config does not say.
ModelInputs = tuple[int | None, dict[str, int]]


def config_int(module: nn.Module, key: str) -> int | None:
    """An integer setting of a diffusers model's config (one shared by every block
    when the config lists one per block); ``None`` when absent or not one number."""
    value = getattr(getattr(module, "config", None), key, None)
    if isinstance(value, (list, tuple)):
        value = value[0] if value and len(set(value)) == 1 else None
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def unet_inputs(module: nn.Module) -> ModelInputs:
    """A ``UNet2DConditionModel``'s latent channels and text-sequence width: the
    projection's input width when it projects the text first, else the
    cross-attention width. SDXL's pooled and size embeddings are only checked as a sum
    by the model, so they are left unchecked here."""
    cfg = getattr(module, "config", None)
    width = config_int(module, "cross_attention_dim")
    if getattr(cfg, "encoder_hid_dim", None) is not None:
        kind = getattr(cfg, "encoder_hid_dim_type", None)
        width = config_int(module, "encoder_hid_dim") if kind in (None, "text_proj") else None
    return config_int(module, "in_channels"), {} if width is None else {"cond": width}


def transformer_inputs(module: nn.Module, tokens_per_channel: int = 1) -> ModelInputs:
    """A flow transformer's (SD3, Flux) latent channels (``in_channels`` counts
    ``tokens_per_channel`` packed values per latent channel) and the widths of its text
    sequence (``joint_attention_dim``) and pooled embedding."""
    channels = config_int(module, "in_channels")
    if channels is not None:
        channels = channels // tokens_per_channel if channels % tokens_per_channel == 0 \
            else None
    widths = {key: w for key, w in (("cond", config_int(module, "joint_attention_dim")),
                                    ("pooled", config_int(module, "pooled_projection_dim")))
              if w is not None}
    return channels, widths


@dataclass(frozen=True)
class Family:
    """Everything that makes one model family what it is."""

    name: str
    model_class: str                 # the diffusers class of the denoiser
    subfolder: str                   # its folder inside a pipeline folder
    pipeline_classes: tuple[str, ...]
    prediction_type: str             # epsilon / v_prediction / flow when nothing says
    vae_scale: float
    vae_shift: float
    vae_factor: int                  # pixels per latent cell of the real VAE
    default_include: tuple[str, ...]
    default_exporter: str
    base_model_version: str          # ss_base_model_version, as kohya writes it
    cond_keys: tuple[str, ...]
    default_resolution: int
    options: type[FamilyOptions]
    #: predictor(options, module, schedule, vae_factor) -> the family's predict function
    predictor: Callable[[Any, nn.Module, NoiseSchedule, int], PredictFn]
    blocks: Callable[[nn.Module], list[nn.Module]]
    description: str
    flow_shift: float = 1.0
    #: σ's distribution before the shift when ``timestep_sampler`` is ``family``
    timestep_sampling: Literal["uniform", "logit_normal"] = "logit_normal"
    #: What the loaded denoiser takes (checked against the data before training).
    inputs: Callable[[nn.Module], ModelInputs] = unet_inputs
    #: How a flow transformer's forward is called (makes ``predictor`` and ``inputs``).
    call: FlowCall | None = None
    #: How the pipeline picks its shift from the resolution (dynamic shifting).
    shift_rule: ShiftRule | None = None
    #: The latent's dimensions: 4 (``[N,C,H,W]``) or 5 (video, ``[N,C,T,H,W]``).
    latent_ndim: int = 4
    #: pipeline folder -> a loader of the VAE that decodes the training latents
    #: (previews, ``loraengine sample``); ``None``: the folder's ``AutoencoderKL``
    latent_vae: Callable[[Path | None], Any] | None = None
    #: The model's name, with its article, in errors about files made for it ("a
    #: FLUX.1": "the file looks made for a FLUX.1 transformer"), and the module names of its layers in every layout files use
    #: (``family_marks``): ``.`` separated, ``N`` for a block index, regular expressions
    #: otherwise; a name matches when it starts with one up to a ``.``/``_`` or its end.
    known_as: str = ""
    marks: tuple[str, ...] = ()


@dataclass
class Located:
    """A denoiser's weights and the pipeline folder its settings come from."""

    model: Path                      # model folder or single file
    root: Path | None                # pipeline folder (scheduler/, vae/), if any
    config: Path | None = None       # for single files: the folder passed as ``config=``
    config_subfolder: str | None = None

    @property
    def single_file(self) -> bool:
        return self.model.is_file()


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: cannot read JSON: {exc}") from None
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a JSON object")
    return data


def model_folder(path: Path, subfolder: str, what: str) -> tuple[Path, Path | None]:
    """(model folder, pipeline root) for a pipeline folder or a model folder."""
    if (path / "model_index.json").exists():
        model_dir = path / subfolder
        if not (model_dir / "config.json").exists():
            raise DataError(f"{what}: pipeline folder {path} has no {subfolder}/config.json")
        return model_dir, path
    if not (path / "config.json").exists():
        raise DataError(f"{what}: {path} has neither model_index.json (a pipeline folder) "
                        f"nor config.json (a model folder)")
    parent = path.parent
    return path, parent if (parent / "model_index.json").exists() else None


def locate_folder(path: Path, subfolder: str | None, default: str) -> tuple[Path, Path | None]:
    """(model folder, pipeline root) of ``model.path`` when it is a folder: a pipeline
    folder (the model is its ``subfolder``, else ``default``) or a model folder (inside
    it, ``subfolder`` when given)."""
    if subfolder and not (path / "model_index.json").exists():
        path = path / subfolder
    return model_folder(path, subfolder or default, "model.path")


def locate(family: Family, options: FamilyOptions) -> Located:
    path = Path(options.path)
    sub = options.subfolder or family.subfolder
    if not path.exists():
        raise DataError(f"model.path: {path} does not exist")
    if path.is_dir():
        return Located(*locate_folder(path, options.subfolder, family.subfolder))
    if path.suffix.lower() not in SINGLE_FILE_SUFFIXES:
        raise DataError(f"model.path: {path} is not a .safetensors checkpoint or a folder")
    if options.config is None:
        raise ConfigError(f"model.config: required for the single-file checkpoint {path}: a "
                          f"local diffusers folder holding the {family.model_class} "
                          f"config.json (a pipeline folder or its {sub} folder)")
    cfg = Path(options.config)
    if not cfg.is_dir():
        raise DataError(f"model.config: {cfg} is not a folder")
    if (cfg / "model_index.json").exists():
        model_folder(cfg, sub, "model.config")  # checks that sub/config.json is there
        return Located(path, cfg, cfg, sub)
    model_dir, root = model_folder(cfg, sub, "model.config")
    return Located(path, root, model_dir, None)


def load_module(family: Family, where: Located, dtype: Any = None,
                prepare: Any = None, looks_like: Any = None) -> nn.Module:
    """Load the denoiser with diffusers, from local files only, its floating tensors
    in ``dtype`` when given. A model folder of safetensors weights is read holding one
    copy of the weights (:mod:`loraengine.plugins.models.weights`), with ``prepare``
    (the memory strategies' transform of the base) applied as each tensor arrives; so
    is a single file (:mod:`loraengine.plugins.models.single_file`, its names through
    diffusers' converter, checked against the model; ``looks_like`` names the model a
    file that does not fit was made for)."""
    import diffusers

    from loraengine.plugins.models import single_file
    from loraengine.plugins.models.weights import load_folder

    diffusers.utils.logging.set_verbosity_error()  # the engine reports what matters itself
    cls = getattr(diffusers, family.model_class)
    if where.single_file:
        cfg_dir = single_file_config(family, where, cls)
        try:
            return single_file.load(cls, cfg_dir, where.model, _holds(family, cfg_dir),
                                    dtype, prepare, looks_like)
        except DataError:
            raise
        except Exception as exc:  # an unreadable file, a config diffusers rejects
            raise DataError(f"model.path: cannot load {family.model_class} from the "
                            f"single file {where.model} with config {cfg_dir}: "
                            f"{_first_line(exc)}") from None
    _check_class(family, where.model)
    try:
        module = load_folder(cls, where.model, dtype, prepare)
        if module is None:  # .bin weights or names of an older layout
            module = cls.from_pretrained(str(where.model), local_files_only=True)
            if dtype is not None:
                module.to(dtype)
        return cast(nn.Module, module)
    except DataError:  # a weight file that cannot be read, named already
        raise
    except Exception as exc:
        raise DataError(f"model.path: cannot load {family.model_class} from {where.model}: "
                        f"{_first_line(exc)}") from None


def single_file_config(family: Family, where: Located, cls: Any) -> Path:
    """The model folder of a single file's config (``model.config``), checked to be
    of the family's class, which diffusers must read single files of."""
    from loraengine.plugins.models.single_file import converter

    assert where.config is not None  # locate() requires model.config for a single file
    cfg_dir = where.config / where.config_subfolder if where.config_subfolder else \
        where.config
    _check_class(family, cfg_dir)
    if converter(cls) is None:
        raise ConfigError(f"model.path: family {family.name!r} reads no single-file "
                          f"checkpoint (diffusers has no converter for "
                          f"{family.model_class}); give its diffusers folder")
    return cfg_dir


def _holds(family: Family, cfg_dir: Path) -> str:
    """What a single file should hold, in errors: "the Flux.2 model
    (Flux2Transformer2DModel) of DIR"."""
    name = family.known_as.partition(" ")[2] if family.known_as else ""
    kind = f"{name} model ({family.model_class})" if name else family.model_class
    return f"the {kind} of {cfg_dir}"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _check_class(family: Family, model_dir: Path) -> None:
    found = read_json(model_dir / "config.json").get("_class_name", "")
    if found and found != family.model_class:
        raise ConfigError(f"model.family: {model_dir} holds a {found}, but family "
                          f"{family.name!r} needs a {family.model_class}")


def scheduler_config(root: Path | None) -> dict[str, Any] | None:
    if root is None:
        return None
    path = root / "scheduler" / "scheduler_config.json"
    return read_json(path) if path.exists() else None


def vae_settings(family: Family, root: Path | None) -> tuple[float, float, int]:
    """(scale, shift, pixels per latent cell) from the pipeline's VAE config, falling
    back to the family's values."""
    scale, shift, factor = family.vae_scale, family.vae_shift, family.vae_factor
    path = None if root is None else root / "vae" / "config.json"
    if path is not None and path.exists():
        cfg = read_json(path)
        if cfg.get("scaling_factor") is not None:
            scale = float(cfg["scaling_factor"])
        if cfg.get("shift_factor") is not None:
            shift = float(cfg["shift_factor"])
        if cfg.get("block_out_channels"):
            factor = 2 ** (len(cfg["block_out_channels"]) - 1)
    return scale, shift, factor


def ddpm_schedule(family: Family, options: DDPMOptions, sched: Mapping[str, Any] | None
                  ) -> NoiseSchedule:
    """The UNet families' schedule: the scheduler config's betas (SD's when absent) and
    prediction type (the option, else the config, else the family's)."""
    sched = sched or {}
    kind: str = options.prediction_type
    if kind == "auto":
        kind = sched.get("prediction_type") or family.prediction_type
    if kind in ("epsilon", "v_prediction"):
        return ddpm_from_config(cast(DDPMKind, kind), sched)
    raise ConfigError(f"model.prediction_type: the scheduler config says {kind!r}; "
                      f"family {family.name!r} trains epsilon or v_prediction")


def ddpm_from_config(kind: DDPMKind, sched: Mapping[str, Any] | None) -> NoiseSchedule:
    """A DDPM schedule with a scheduler config's betas and step count (Stable
    Diffusion's when a key is absent)."""
    sched = sched or {}
    return NoiseSchedule.ddpm(kind, int(sched.get("num_train_timesteps", 1000)),
                              float(sched.get("beta_start", 0.00085)),
                              float(sched.get("beta_end", 0.012)),
                              str(sched.get("beta_schedule", "scaled_linear")),
                              bool(sched.get("rescale_betas_zero_snr", False)))


def flow_schedule(family: Family, options: FlowOptions, sched: Mapping[str, Any] | None,
                  vae_factor: int = 8) -> NoiseSchedule:
    """Rectified flow. With a scheduler that shifts by resolution
    (``use_dynamic_shifting``) each batch trains with the shift its pipeline computes
    for that batch's latent size (``shift_by_shape``; ``shift`` stays 1 where no latent
    is at hand), unless ``shift_resolution`` names one resolution for every batch or
    ``flow_shift`` one shift."""
    from loraengine.plugins.models.flow import ShiftRule, shape_shift

    shift = options.flow_shift
    dynamic = bool(sched and sched.get("use_dynamic_shifting", False))
    by_shape = None
    if shift is None and not options.shift_resolution and dynamic:
        assert sched is not None
        by_shape = shape_shift(family.shift_rule or ShiftRule(), sched)
    if shift is None and options.shift_resolution and sched and \
            sched.get("use_dynamic_shifting", False):
        from loraengine.plugins.models.flow import resolution_shift

        side = options.shift_resolution // vae_factor
        shift = resolution_shift(family.shift_rule or ShiftRule(), sched, side, side)
    if shift is None:
        if sched and not sched.get("use_dynamic_shifting", False) and "shift" in sched:
            shift = float(sched["shift"])
        elif sched and sched.get("use_dynamic_shifting", False):
            shift = 1.0
        else:
            shift = family.flow_shift
    scale = float((sched or {}).get("num_train_timesteps", 1000))
    # the family's own training distribution (``timestep_sampler: family``); another is
    # chosen in the timestep_sampler section, never here
    return NoiseSchedule("flow", shift=float(shift), timestep_scale=scale,
                         sampling=family.timestep_sampling, shift_by_shape=by_shape)


def load_family(family: Family, options: FamilyOptions, context: Mapping[str, Any]
                ) -> LoadedModel:
    given = context.get("module")
    if isinstance(given, nn.Module) and type(given).__name__ == family.model_class:
        # a denoiser built by the caller (memory planning builds real-size ones on the
        # meta device): settings come from model.path when it is a folder
        path = Path(options.path)
        where = locate(family, options) if path.exists() else Located(path, None)
        module = given
    else:
        where = locate(family, options)
        module = load_module(family, where, context.get("dtype"), context.get("prepare"),
                             context.get("looks_like"))
    sched = scheduler_config(where.root)
    scale, shift, factor = vae_settings(family, where.root)
    if family.prediction_type == "flow":
        schedule = flow_schedule(family, options, sched, factor)  # type: ignore[arg-type]
    else:
        schedule = ddpm_schedule(family, options, sched)  # type: ignore[arg-type]
    channels, widths = family.inputs(module)
    return LoadedModel(
        module=module, predict=family.predictor(options, module, schedule, factor),
        schedule=schedule, blocks=family.blocks(module), family=family.name,
        default_exporter=family.default_exporter,
        base_model_version=family.base_model_version, cond_keys=family.cond_keys,
        source=str(where.model), pipeline_root=where.root, single_file=where.single_file,
        vae_scale=scale, vae_shift=shift, default_include=family.default_include,
        latent_ndim=family.latent_ndim, latent_channels=channels, cond_widths=widths,
        vae=family.latent_vae(where.root) if family.latent_vae else None)


def config_view(config_dir: Path) -> Any:
    """A stand-in for a loaded denoiser that has only its ``config`` (read from
    ``config.json``): what the ``inputs`` functions read, without loading weights."""
    return SimpleNamespace(config=SimpleNamespace(**read_json(config_dir / "config.json")))


#: File names diffusers saves a model's weights under (sharded ones have an index).
_WEIGHT_GLOBS = ("*.safetensors", "*.safetensors.index.json", "*.bin", "*.bin.index.json")


def check_weights_readable(where: Path, key: str = "model.path") -> None:
    """The weights at ``where`` (a single file, or a model folder's files) exist and a
    safetensors header reads; no tensor is loaded."""
    from safetensors import safe_open

    from loraengine.plugins.models.weights import header_of

    if where.is_dir():
        files = sorted({f for pattern in _WEIGHT_GLOBS for f in where.glob(pattern)})
        if not files:
            raise DataError(f"{key}: {where} has a config.json but no weights "
                            f"(diffusion_pytorch_model.safetensors or .bin)")
        headers = [f for f in files if f.suffix == ".safetensors"]
    else:
        headers = [where]
    for file in headers:
        header_of(file, key)  # a reason of our own for what safetensors says tersely
        try:
            with safe_open(str(file), framework="pt") as fh:
                if not list(fh.keys()):
                    raise DataError(f"{key}: {file} holds no tensors")
        except DataError:
            raise
        except Exception as exc:  # safetensors raises its own kinds for a bad header
            raise DataError(f"{key}: {file} is not a readable safetensors file: "
                            f"{_first_line(exc)}") from None


def describe_family(family: Family, options: FamilyOptions, context: Mapping[str, Any]
                    ) -> ModelLayout:
    """What ``load_family`` would find, from the config files alone: the model and its
    config are located and read, the weights' header checked, the schedule built."""
    where = locate(family, options)
    if where.single_file:
        import diffusers

        from loraengine.plugins.models import single_file

        cfg_dir = single_file_config(family, where, getattr(diffusers, family.model_class))
        check_weights_readable(where.model)
        try:
            single_file.check(getattr(diffusers, family.model_class), cfg_dir, where.model,
                              _holds(family, cfg_dir), context.get("looks_like"))
        except DataError:
            raise
        except Exception as exc:  # a config diffusers rejects
            raise DataError(f"model.config: cannot build {family.model_class} from "
                            f"{cfg_dir}: {_first_line(exc)}") from None
    else:
        cfg_dir = where.model
        _check_class(family, cfg_dir)
        check_weights_readable(where.model)
    sched = scheduler_config(where.root)
    if family.prediction_type == "flow":
        flow_schedule(family, options, sched)  # type: ignore[arg-type]
    else:
        ddpm_schedule(family, options, sched)  # type: ignore[arg-type]
    channels, widths = family.inputs(config_view(cfg_dir))
    return ModelLayout(source=str(where.model), cond_keys=family.cond_keys,
                       latent_ndim=family.latent_ndim,
                       latent_channels=channels, cond_widths=widths,
                       skeleton=skeleton_of(family.model_class, cfg_dir),
                       default_include=family.default_include)


def skeleton_of(model_class: str, cfg_dir: Path) -> Callable[[], nn.Module]:
    """``ModelLayout.skeleton`` of the diffusers ``model_class`` configured in
    ``cfg_dir``: the model built from its ``config.json`` as loading starts it (a
    folder's weights or a single file's fill that very skeleton), parameters on the
    ``meta`` device."""
    def build() -> nn.Module:
        import diffusers

        from loraengine.plugins.models.single_file import skeleton

        diffusers.utils.logging.set_verbosity_error()  # as load_module
        cls = getattr(diffusers, model_class)
        return skeleton(cls, cls.load_config(str(cfg_dir)))

    return build


def unet_blocks(unet: nn.Module) -> list[nn.Module]:
    """A diffusers UNet's down, mid and up blocks: the units memory strategies work on."""
    blocks: list[nn.Module] = list(unet.get_submodule("down_blocks").children())
    mid = getattr(unet, "mid_block", None)
    if mid is not None:
        blocks.append(mid)
    blocks.extend(unet.get_submodule("up_blocks").children())
    return blocks


def submodules(model: nn.Module, *names: str) -> list[nn.Module]:
    """The children of each of ``model``'s module lists ``names``, in order."""
    return [block for name in names for block in model.get_submodule(name).children()]


def blocks_of(*names: str) -> Callable[[nn.Module], list[nn.Module]]:
    """A family's ``blocks``: the children of the model's module lists ``names``."""
    def blocks(model: nn.Module) -> list[nn.Module]:
        return submodules(model, *names)

    return blocks


def unet_family(**fields: Any) -> Family:
    """A ``UNet2DConditionModel`` family on a DDPM schedule (SD 1.x/2.x/XL): the fields
    they share, then ``fields``."""
    shared: dict[str, Any] = dict(
        model_class="UNet2DConditionModel", subfolder="unet", vae_shift=0.0, vae_factor=8,
        default_exporter="kohya", options=DDPMOptions, blocks=unet_blocks, inputs=unet_inputs)
    return Family(**{**shared, **fields})


def flow_transformer_family(**fields: Any) -> Family:
    """A rectified-flow transformer family: the fields they share, then ``fields``.
    With a ``call`` (a :class:`~loraengine.plugins.models.flow.FlowCall`) the
    ``predictor``, ``inputs`` and ``cond_keys`` default to what it says."""
    shared: dict[str, Any] = dict(
        subfolder="transformer", prediction_type="flow", vae_factor=8,
        default_exporter="diffusers", cond_keys=("cond", "pooled"), default_resolution=1024,
        options=FlowOptions, inputs=transformer_inputs)
    call = fields.get("call")
    if call is not None:
        from loraengine.plugins.models.flow import flow_predictor

        shared.update(predictor=flow_predictor(call), inputs=call_inputs(call),
                      cond_keys=call.cond_keys, latent_ndim=call.latent_ndim)
    return Family(**{**shared, **fields})


def call_inputs(call: FlowCall) -> Callable[[nn.Module], ModelInputs]:
    """What a transformer called as ``call`` says it takes: latent channels from
    ``in_channels`` (a 2×2 packing holds four values per channel; ``out_channels``
    when zero channels pad the latent up to ``in_channels``), conditioning widths from
    the config keys ``call.widths`` names."""
    per = 4 if call.packing == "patch2" else 1

    def inputs(module: nn.Module) -> ModelInputs:
        channels = config_int(module, "out_channels" if call.pad_channels else "in_channels")
        if channels is not None:
            channels = channels // per if channels % per == 0 else None
        from loraengine.plugins.models.flow import width_key

        config = getattr(module, "config", None)
        widths = {key: w for key, name in call.widths
                  if (w := config_int(module, width_key(config, name))) is not None}
        return channels, widths

    return inputs


def family_spec(family: Family, detect: Callable[[Any], bool] | None = None
                ) -> ModelFamilySpec:
    """The registry record of a family that can also prepare data (``loraengine
    prepare``) with its pipeline's VAE and text encoders."""
    def make_encoder(path: Any, options: Mapping[str, Any]) -> Any:
        from loraengine.plugins.models import encoders

        return encoders.make_encoder(family, Path(path), options)

    return make_spec(family, make_encoder, detect)


def pipeline_class(path: Path) -> str:
    index = Path(path) / "model_index.json"
    if not index.exists():
        return ""
    try:
        return str(read_json(index).get("_class_name", ""))
    except DataError:
        return ""


def make_spec(family: Family, make_encoder: Callable[..., Any] | None = None,
              detect: Callable[[Any], bool] | None = None) -> ModelFamilySpec:
    def load(options: Any, context: Mapping[str, Any]) -> LoadedModel:
        return load_family(family, options, context)

    def detect_default(path: Any) -> bool:
        return pipeline_class(Path(path)) in family.pipeline_classes

    def describe(options: Any, context: Mapping[str, Any]) -> ModelLayout:
        return describe_family(family, options, context)

    from loraengine.plugins.models.family_marks import looks_like_among

    # a family with marks names its files on its own (the built-in families share one
    # matcher over all their records, see ``plugins/models/__init__.py``)
    looks_like = looks_like_among([family]) if family.marks and family.known_as else None
    return ModelFamilySpec(family.name, load, family.options, family.description,
                           make_encoder=make_encoder, detect=detect or detect_default,
                           describe=describe, looks_like=looks_like)
