"""Option models with no tie to the installed plugins: the base of every plugin's own
options, the keys each plugin section shares (``AdapterOptions.rank``...), the fixed
sections, and ``TrainConfig``, the static shape of a validated config.

They sit below both the plugin contracts (records name ``TrainConfig`` and default to
``NoOptions``) and the config builder (``loraengine.core.config``, which makes the model
that validates for the installed plugins), so neither has to import the other.
"""

from __future__ import annotations

import collections.abc
import functools
import math
import types
import typing
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    AllowInfNan,
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    model_validator,
)


def _numeric_only(annotation: Any) -> bool:
    try:
        return _numeric_only_cached(annotation)
    except TypeError:  # an unhashable annotation: work it out each time
        return _numeric_only_cached.__wrapped__(annotation)


@functools.cache
def _numeric_only_cached(annotation: Any) -> bool:
    """Whether a field of this type takes numbers and nothing else but None (``int``,
    ``float | None``...): pydantic would read ``true`` there as 1."""
    members: list[Any] = []

    def visit(tp: Any) -> None:
        origin = typing.get_origin(tp)
        if origin is Annotated:
            visit(typing.get_args(tp)[0])
        elif origin in (typing.Union, types.UnionType):
            for arg in typing.get_args(tp):
                visit(arg)
        elif tp is not type(None):
            members.append(tp)

    visit(annotation)
    return bool(members) and all(tp in (int, float) for tp in members)


def _members(annotation: Any) -> list[Any]:
    """The types a field of this annotation may hold (unions and ``Annotated`` opened,
    ``None`` left out)."""
    origin = typing.get_origin(annotation)
    if origin is Annotated:
        return _members(typing.get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType):
        return [m for arg in typing.get_args(annotation) for m in _members(arg)]
    return [] if annotation is type(None) else [annotation]


_SEQUENCES = (list, tuple, set, frozenset, collections.abc.Sequence)


def _spell_bools(value: Any, annotation: Any) -> Any:
    """``value`` with every boolean that stands where only a number may go replaced by
    its YAML spelling (``"true"``), inside lists, tuples and mappings too, so that the
    field's own validation refuses it naming the key and index."""
    if isinstance(value, bool):
        return str(value).lower() if _numeric_only(annotation) else value
    if isinstance(value, (list, tuple)):
        for member in _members(annotation):
            origin, args = typing.get_origin(member), typing.get_args(member)
            if origin in _SEQUENCES and args:
                if origin is tuple and not (len(args) == 2 and args[1] is Ellipsis):
                    if len(args) != len(value):
                        return value  # the field reports the wrong length itself
                    return type(value)(_spell_bools(v, a) for v, a in zip(value, args, strict=True))
                return type(value)(_spell_bools(v, args[0]) for v in value)
        return value
    if isinstance(value, dict):
        for member in _members(annotation):
            origin, args = typing.get_origin(member), typing.get_args(member)
            if origin in (dict, collections.abc.Mapping) and len(args) == 2:
                return {k: _spell_bools(v, args[1]) for k, v in value.items()}
    return value


def _numbers_not_bools(cls: type[BaseModel], data: Any) -> Any:
    """Hand a boolean given for a number (also one inside a list, tuple or mapping of
    numbers) on as its YAML spelling, so the field's own validation refuses it (with
    the key in the error) instead of reading 1 or 0."""
    if not isinstance(data, dict):
        return data
    fields = cls.model_fields
    spelled = {k: _spell_bools(v, fields[k].annotation) if k in fields else v
               for k, v in data.items()}
    if all(spelled[k] is data[k] for k in data):
        return data
    return spelled


def _infinite_defaults_allowed(cls: type[BaseModel]) -> None:
    """Let a float field whose default is infinite (which stands for "no limit") take
    an infinite value too: the base models refuse NaN and inf everywhere else."""
    changed = False
    for info in cls.model_fields.values():
        default = info.default
        if isinstance(default, float) and math.isinf(default) and not any(
                isinstance(m, AllowInfNan) for m in info.metadata):
            info.metadata.append(AllowInfNan(True))
            changed = True
    if changed:
        cls.model_rebuild(force=True)


class PluginOptions(BaseModel):
    """Base for a plugin's own options: unknown keys are errors.

    A record with options is generic in its options model ``OptionsT`` (a pydantic
    model, usually a subclass of this one): its factory receives an instance of that
    model, validated, with the keys its config section adds (``optimizer.lr``...)."""

    # NaN and inf are refused where a number goes, unless the field's default is inf
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    _no_bools = model_validator(mode="before")(_numbers_not_bools)

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs: Any) -> None:
        super().__pydantic_init_subclass__(**kwargs)
        _infinite_defaults_allowed(cls)


class NoOptions(PluginOptions):
    """For plugins that take no options."""


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
    """Base of the fixed sections: unknown keys, NaN and inf are errors."""

    model_config = ConfigDict(extra="forbid", validate_default=True, allow_inf_nan=False)

    _no_bools = model_validator(mode="before")(_numbers_not_bools)

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs: Any) -> None:
        super().__pydantic_init_subclass__(**kwargs)
        _infinite_defaults_allowed(cls)


def _real_device(value: str) -> str:
    """A device that holds values: ``meta`` is for ``plan``'s own dry runs only."""
    if value.strip().lower().startswith("meta"):
        raise ValueError("'meta' holds no values to train on (loraengine plan estimates a "
                         "run without one)")
    return value


def _printable_name(value: str) -> str:
    """A file name free of control characters (NUL, ESC, newlines...): a file system or
    a terminal would refuse or misread them."""
    for char in value:
        if ord(char) < 32 or 127 <= ord(char) < 160:
            raise ValueError(f"control character U+{ord(char):04X} not allowed in a file name")
    return value


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
    device: Annotated[str, AfterValidator(_real_device)] = Field(
        default="auto", description="auto (cuda when available), cpu, cuda, cuda:N.")
    dist_timeout: float = Field(
        default=600.0, gt=0, description="Seconds a process waits for the others (torchrun) before "
        "the run stops with an error.")
    fsdp: bool = Field(default=False, description="Under torchrun, shard the frozen base over the "
                       "processes (FSDP2) for models that do not fit one device; adapters "
                       "stay replicated.")
    max_bad_steps: int = Field(
        default=5, ge=1, description="Consecutive non-finite steps (each skipped) after which "
        "training rolls back to the last good checkpoint and stops.")
    compile: Literal[False, "blocks", "model"] = Field(
        default=False, description="torch.compile the denoiser: blocks compiles each of the "
        "family's blocks (regional compilation: one compile per kind of block, the rest "
        "eager), model its whole forward; false runs eagerly. Composes with gradient "
        "checkpointing, bypass and (blocks only) offloading. The first step, which compiles, "
        "is reported apart and left out of it/s; shapes are static, so each new bucket "
        "shape compiles again once. The CPU needs a C++ compiler.")
    host_memory: Literal["reuse", "return"] = Field(
        default="reuse", description="Training on the CPU: reuse keeps the memory of freed "
        "tensors in the process for the next ones (the C library's own way; fastest: on "
        "the benchmark workloads a step takes half the time of return's); return gives "
        "every freed tensor of 64 KiB or more back to the system at once, so resident "
        "memory follows the live tensors, as plan predicts them (at SD1.5 size reuse "
        "held 1.4 GB more). While the model loads, freed memory goes back either way. "
        "glibc only; MALLOC_MMAP_THRESHOLD_ in the environment overrides both.")
    threads: int | None = Field(
        default=None, ge=1, description="CPU threads of torch's intra-op pool while training "
        "(at most the CPUs the process may use: a larger count is capped, with a warning); "
        "null picks the physical cores available to the process (never more than its CPU "
        "affinity; shared out among torchrun's processes on one machine) unless OMP_NUM_THREADS/MKL_NUM_THREADS or torch.set_num_threads chose a "
        "count.")


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
    allow_nonfinite: bool = Field(default=False, description="Skip (with a warning) samples "
                                  "whose latents or conditioning hold NaN or inf; by default "
                                  "such data is an error naming the file, tensor and sample.")


class ValidationConfig(Strict):
    """When to compute the validation loss."""

    every: int | None = Field(default=None, ge=1, description="Steps between validation losses "
                              "(and after the last step); needs data.validation.")


class EarlyStopConfig(Strict):
    """Stop when the validation loss stops improving."""

    patience: int | None = Field(default=None, ge=1, description="Validations without an "
                                 "improvement of at least min_delta before stopping.")
    min_delta: float = Field(default=0.0, ge=0)


#: The largest side of latents the engine renders (``output.samples.size``, ``sample
#: --size``): beyond it the starting noise of one image alone outgrows memory.
MAX_LATENT_SIDE = 2048


def _latent_size(value: tuple[int, int]) -> tuple[int, int]:
    if not all(1 <= side <= MAX_LATENT_SIDE for side in value):
        raise ValueError(f"height and width must be 1 to {MAX_LATENT_SIDE} (latent pixels), "
                         f"got {list(value)}")
    return value


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
    size: Annotated[tuple[int, int], AfterValidator(_latent_size)] | None = Field(
        default=None, description=f"Latent height and width (1 to {MAX_LATENT_SIDE} each); "
        "default: the training latents'.")
    compare: bool = Field(default=True, description="At the end also write compare.png: the base "
                          "model beside the adapted one, same prompts and seeds.")


class OutputConfig(Strict):
    """Where and what to write."""

    dir: ConfigPath = Field(default=Path("output"), description="Output folder.")
    name: Annotated[str, AfterValidator(_printable_name)] = Field(
        default="lora", min_length=1, pattern=r"^[^/\\]+$",
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
    loggers: list[str] = Field(
        default=["events"], description="Loggers the run writes to, by name (see "
        "`loraengine plugins`): events (<name>.events.jsonl, what `loraengine monitor` "
        "reads; appended by every run), tensorboard (<dir>/tensorboard/<name>/), mlflow "
        "(<dir>/mlruns/, offline). [] for none.")


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
    path: Literal["auto", "factored", "rebuild"] = Field(
        default="auto", description="How training computes each adapted layer: factored (the "
        "base op plus the adapter's own route from its factors, never building W+ΔW where "
        "the algorithm allows it), rebuild (the base op with W+ΔW), or auto (the cheaper of "
        "the two by the algorithm's cost model, per layer and input shape). Layers whose "
        "algorithm has no factored form always rebuild.")


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

    if TYPE_CHECKING:
        # Which keys exist depends on the installed plugins; each plugin reads its own.
        def __getattr__(self, name: str) -> Any: ...


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
