"""What the ComfyUI node pack (``integrations/comfyui``) does, without ComfyUI.

The node module stays thin: it hands ComfyUI's values (a ``MODEL``'s ``BaseModel``, a
``LATENT`` dict, a ``CONDITIONING`` list, the widget values) to the functions here and
returns what they give back. Here they become a loraengine config, in-memory latents
and per-sample conditioning, one ``loraengine.train`` run on the ``comfyui`` model
family (ComfyUI's own network through its ``apply_model``), and the three outputs of
ComfyUI's ``TrainLoraNode``: ``LORA_MODEL`` (a state dict in ComfyUI's own keys, what
``LoraModelLoader`` and ``SaveLoRA`` take), ``LOSS_MAP`` (``{"loss": [...], ...}``, what
``LossGraphNode`` plots) and the step count.

Differences from ComfyUI's trainer, on purpose: each latent trains with its own
conditioning (a batch pairs sample i with caption i, never an average over the batch);
noise, timesteps and batch order come from ``training.seed`` through the engine, so a
run resumed from a checkpoint continues exactly; non-finite steps are skipped and rolled
back by the engine's watchdog.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from loraengine.core.config.source import deep_merge, load_yaml
from loraengine.core.errors import ConfigError, DataError
from loraengine.core.plugins.hookspecs import hookimpl

#: ComfyUI's names of TrainLoraNode's choices -> loraengine's plugin names
OPTIMIZERS = {"AdamW": "adamw", "Adam": "adam", "SGD": "sgd", "RMSprop": "rmsprop"}
LOSSES = {"MSE": "mse", "L1": "l1", "Huber": "huber", "SmoothL1": "smooth_l1"}
ALGORITHMS = {"LoRA": "lora", "LoHa": "loha", "LoKr": "lokr", "OFT": "oft"}
DTYPES = ("bf16", "fp32")
LR_SCHEDULES = ("constant", "linear", "cosine", "cosine_with_restarts", "polynomial")
LOSS_TARGETS = ("x0", "native")
#: the step counter's largest value ComfyUI's INT widget holds
SEED_MAX = 0xFFFFFFFFFFFFFFFF
#: the ``existing_lora`` choice meaning "start a new adapter"
NO_LORA = "[None]"


def train_lora_input_types(lora_files: Sequence[str] = ()) -> dict[str, dict[str, Any]]:
    """The node's ``INPUT_TYPES``: TrainLoraNode's inputs with its names, types,
    defaults and ranges (``required``; ``existing_lora`` lists ``lora_files``), the
    inputs newer ComfyUI releases added to it, then loraengine's own (``optional``)."""
    def integer(default: int, low: int, high: int, tip: str, **more: Any
                ) -> tuple[str, dict[str, Any]]:
        return ("INT", {"default": default, "min": low, "max": high, "tooltip": tip, **more})

    def boolean(default: bool, tip: str) -> tuple[str, dict[str, Any]]:
        return ("BOOLEAN", {"default": default, "tooltip": tip})

    def choice(options: Sequence[str], default: str, tip: str) -> tuple[list[str],
                                                                          dict[str, Any]]:
        return (list(options), {"default": default, "tooltip": tip})

    required: dict[str, Any] = {
        "model": ("MODEL", {"tooltip": "ComfyUI's diffusion model to train an adapter "
                                       "for."}),
        "latents": ("LATENT", {"tooltip": "Training latents, one sample per row."}),
        "positive": ("CONDITIONING", {"tooltip": "One conditioning per latent (row i "
                                                 "trains with entry i), or one for all."}),
        "batch_size": integer(1, 1, 10000, "Samples per micro-batch.", step=1),
        "grad_accumulation_steps": integer(1, 1, 1024, "Micro-batches per optimizer "
                                                       "step.", step=1),
        "steps": integer(16, 1, 100000, "Optimizer steps to train."),
        "learning_rate": ("FLOAT", {"default": 0.0005, "min": 0.0000001, "max": 1.0,
                                    "step": 0.000001, "tooltip": "Learning rate."}),
        "rank": integer(8, 1, 128, "Adapter rank."),
        "optimizer": choice(list(OPTIMIZERS), "AdamW", "Optimizer (more through the "
                                                       "config input)."),
        "loss_function": choice(list(LOSSES), "MSE", "Loss function."),
        "seed": integer(0, 0, SEED_MAX, "Seeds adapter init, batch order, noise and "
                                        "timesteps."),
        "training_dtype": choice(DTYPES, "bf16", "Compute dtype of the base model."),
        "lora_dtype": choice(DTYPES, "bf16", "Dtype of the adapter weights."),
        "algorithm": choice(list(ALGORITHMS), "LoRA", "Adapter algorithm."),
        "gradient_checkpointing": boolean(True, "Recompute block activations in the "
                                                "backward pass to save memory."),
        "existing_lora": choice([*lora_files, NO_LORA], NO_LORA,
                                "A LoRA of ComfyUI's loras folder to continue training."),
    }
    optional: dict[str, Any] = {
        # inputs later ComfyUI releases gave TrainLoraNode (same names and defaults)
        "quantized_backward": boolean(False, "With a quantized base: compute the input "
                                             "gradient with the quantized matmul."),
        "checkpoint_depth": integer(1, 1, 5, "Checkpointing depth: 1 wraps each top-level "
                                             "block, each further level their children."),
        "offloading": boolean(False, "Keep the frozen weights on the CPU, moved to the "
                                     "device block by block."),
        "bucket_mode": boolean(False, "Resolution buckets: each LATENT (e.g. from "
                                      "ResolutionBucket) is one bucket, batches drawn "
                                      "within a bucket."),
        "bypass_mode": boolean(False, "Apply adapters as forward hooks; base weights are "
                                      "never changed."),
        # loraengine's own
        "alpha": ("FLOAT", {"default": 1.0, "min": 0.0001, "max": 1024.0, "step": 0.01,
                            "tooltip": "Scale numerator (delta scaled by alpha/rank); 1 "
                                       "as ComfyUI's trainer."}),
        "norm_and_bias_deltas": boolean(True, "Also train every norm and bias as a full "
                                              "delta (diff / diff_b), as ComfyUI's trainer "
                                              "does."),
        "loss_target": choice(LOSS_TARGETS, "x0", "x0: compare denoised and clean "
                                                  "latents, as ComfyUI's trainer; native: "
                                                  "the model's own target (eps/v/flow)."),
        "algorithm_options": ("STRING", {"default": "", "multiline": True,
                                         "tooltip": "YAML mapping of the algorithm's "
                                                    "options (dora: weight_decompose: "
                                                    "true, with weight_decompose_norm: "
                                                    "comfyui for DoRA exactly as ComfyUI "
                                                    "applies it; lokr: factor: 4, ...)."}),
        "lr_schedule": choice(LR_SCHEDULES, "constant", "Learning-rate schedule."),
        "warmup_steps": integer(0, 0, 100000, "Linear warmup steps."),
        "output_folder": ("STRING", {"default": "", "tooltip": "Folder for checkpoints, the "
                                                               "loss map and the file; empty: "
                                                               "nothing written."}),
        "save_every": integer(0, 0, 100000, "Write a resumable checkpoint every N steps "
                                            "to output_folder (0: none)."),
        "resume": boolean(True, "Continue from the newest checkpoint in output_folder "
                                "when there is one."),
        "validation_latents": ("LATENT", {"tooltip": "Held-out latents for a validation "
                                                     "loss."}),
        "validation_positive": ("CONDITIONING", {"tooltip": "Their conditioning."}),
        "validation_every": integer(0, 0, 100000, "Steps between validation losses "
                                                  "(0: at the end only)."),
        "config": ("LORAENGINE_CONFIG", {"tooltip": "A loraengine config (Load loraengine "
                                                    "config); its keys win over the "
                                                    "widgets."}),
    }
    return {"required": required, "optional": optional}


#: the outputs, as ComfyUI's TrainLoraNode returns them (without its first, the model)
RETURN_TYPES = ("LORA_MODEL", "LOSS_MAP", "INT")
RETURN_NAMES = ("lora", "loss_map", "steps")


# -- ComfyUI values -> tensors ------------------------------------------------------------

def latents_tensor(latent: Any, what: str = "latents") -> torch.Tensor:
    """A ComfyUI ``LATENT`` (``{"samples": [N,C,H,W]}``) as the tensor of samples."""
    samples = latent.get("samples") if isinstance(latent, Mapping) else None
    if not isinstance(samples, torch.Tensor):
        got = (f"a dict whose 'samples' is {type(samples).__name__}"
               if isinstance(latent, Mapping) and "samples" in latent
               else f"{type(latent).__name__}" + (" without 'samples'"
                                                  if isinstance(latent, Mapping) else ""))
        raise DataError(f"{what}: expected a ComfyUI LATENT, a dict with a 'samples' "
                        f"tensor; got {got}")
    if samples.ndim not in (4, 5) or samples.shape[0] < 1:
        raise DataError(f"{what}: 'samples' must be [N,C,H,W] (or [N,C,T,H,W]); got "
                        f"shape {list(samples.shape)}")
    return samples.detach().float().cpu().clone()


def latent_list(latents: Any, what: str = "latents") -> list[torch.Tensor]:
    """One ``LATENT`` or a list of them (what a node with list inputs receives, one per
    upstream item, e.g. a bucket of ComfyUI's ResolutionBucket) as their sample
    tensors, in order."""
    items = list(latents) if isinstance(latents, Sequence) and not isinstance(
        latents, (str, Mapping)) else [latents]
    if not items:
        raise DataError(f"{what}: expected a ComfyUI LATENT; got an empty list")
    return [latents_tensor(item, what if len(items) == 1 else f"{what}[{i}]")
            for i, item in enumerate(items)]


def _is_entry(entry: Any) -> bool:
    return (isinstance(entry, Sequence) and len(entry) == 2
            and isinstance(entry[0], torch.Tensor))


def flat_conditioning(conditioning: Any) -> list[Any]:
    """A ``CONDITIONING`` (a list of ``[tensor, dict]`` entries) or a list of them (one
    per upstream item) as one list of entries, in order."""
    if (isinstance(conditioning, Sequence) and conditioning
            and not _is_entry(conditioning[0])
            and all(isinstance(c, Sequence) and c and _is_entry(c[0])
                    for c in conditioning)):
        return [entry for c in conditioning for entry in c]
    return list(conditioning) if isinstance(conditioning, Sequence) else conditioning


def _rows(conditioning: Any, what: str) -> list[tuple[torch.Tensor, dict[str, Any]]]:
    """A ComfyUI ``CONDITIONING`` (``[[cond [B,L,D], {extras}], ...]``, or a list of
    them) as one ``(cond [L,D], extras of that row)`` per row, entries in order."""
    conditioning = flat_conditioning(conditioning)
    if not isinstance(conditioning, Sequence) or not conditioning:
        raise DataError(f"{what}: expected a ComfyUI CONDITIONING, a non-empty list of "
                        f"[tensor, dict] pairs")
    out: list[tuple[torch.Tensor, dict[str, Any]]] = []
    for i, entry in enumerate(conditioning):
        if (not isinstance(entry, Sequence) or len(entry) != 2
                or not isinstance(entry[0], torch.Tensor)):
            raise DataError(f"{what}: entry {i} is not a [tensor, dict] pair")
        if entry[1] is not None and not isinstance(entry[1], Mapping):
            raise DataError(f"{what}: entry {i}'s second item is {type(entry[1]).__name__}; "
                            f"it must be the dict of the conditioning's extras")
        if entry[0].device.type == "meta":
            raise DataError(f"{what}: entry {i}'s tensor is on the meta device and holds no "
                            f"values")
        cond, extras = entry[0], dict(entry[1] or {})
        if cond.ndim == 2:
            cond = cond.unsqueeze(0)
        if cond.ndim != 3:
            raise DataError(f"{what}: entry {i}'s tensor must be [B,L,D]; got "
                            f"{list(cond.shape)}")
        for b in range(cond.shape[0]):
            row = {k: (v[b:b + 1] if isinstance(v, torch.Tensor) and v.ndim >= 1
                       and v.shape[0] == cond.shape[0] else v) for k, v in extras.items()}
            out.append((cond[b], row))
    return out


#: ``model.extra_conds(**params) -> {name: cond object with .cond}`` (ComfyUI's
#: ``BaseModel.extra_conds``), or None: the cross-attention tensor alone
ExtraConds = Callable[..., Mapping[str, Any]] | None


def conditioning_tensors(conditioning: Any, latents: torch.Tensor,
                         extra_conds: ExtraConds = None, what: str = "positive"
                         ) -> dict[str, torch.Tensor]:
    """Per-sample conditioning for the engine: ``cond`` ``[N,L,D]`` (ComfyUI's
    ``c_crossattn``) and the model's other inputs (SDXL's ``y``), row i for latent i.

    One conditioning row is used for every latent; otherwise the rows must be as many
    as the latents. With ``extra_conds`` (ComfyUI's ``BaseModel.extra_conds``) each row
    becomes the model's inputs as ComfyUI's samplers build them (pooled output and
    sizes into ``y``, ...), given that row's latent."""
    rows = _rows(conditioning, what)
    n = int(latents.shape[0])
    if len(rows) not in (1, n):
        raise DataError(f"{what}: {len(rows)} conditioning rows for {n} latents; give one "
                        f"per latent (row i trains with latent i) or one for all")
    return _model_inputs(rows, latents, extra_conds, what)


def bucket_tensors(latents: Sequence[torch.Tensor], conditioning: Any,
                   extra_conds: ExtraConds = None, what: str = "positive"
                   ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """``bucket_mode``: each LATENT of ``latents`` is one bucket (``[B_i,C,H_i,W_i]``,
    as ComfyUI's ResolutionBucket makes them), and the conditioning rows, flattened in
    order, go with the latents in the same order (row k with the k-th latent counting
    across the buckets; one row for all). Returns loraengine's in-memory buckets:
    ``latents.<i>`` and ``<input>.<i>`` (``cond.<i>``, SDXL's ``y.<i>`` built for
    bucket i's size, ...)."""
    rows = _rows(conditioning, what)
    sizes = [int(t.shape[0]) for t in latents]
    total = sum(sizes)
    if len(rows) not in (1, total):
        raise DataError(f"{what}: {len(rows)} conditioning rows for {total} latents in "
                        f"{len(sizes)} buckets ({', '.join(map(str, sizes))}); give one "
                        f"per latent, in the buckets' order, or one for all")
    out_latents: dict[str, torch.Tensor] = {}
    out_cond: dict[str, torch.Tensor] = {}
    start = 0
    for i, bucket in enumerate(latents):
        part = rows if len(rows) == 1 else rows[start:start + sizes[i]]
        start += sizes[i]
        out_latents[f"latents.{i}"] = bucket
        made = _model_inputs(part, bucket, extra_conds, f"{what} (bucket {i})")
        out_cond.update({f"{key}.{i}": value for key, value in made.items()})
    return out_latents, out_cond


def _model_inputs(rows: list[tuple[torch.Tensor, dict[str, Any]]], latents: torch.Tensor,
                  extra_conds: ExtraConds, what: str) -> dict[str, torch.Tensor]:
    n = int(latents.shape[0])
    per_sample: list[dict[str, torch.Tensor]] = []
    for i, (cond, extras) in enumerate(rows):
        if extra_conds is None:
            per_sample.append({"cond": cond.detach().float().cpu().clone()})
            continue
        latent = latents[i:i + 1] if len(rows) == n else latents[:1]
        params = dict(extras)
        params.update(cross_attn=cond.unsqueeze(0), device=torch.device("cpu"),
                      noise=torch.zeros_like(latent), input=latent)
        params.setdefault("width", int(latent.shape[-1]) * 8)
        params.setdefault("height", int(latent.shape[-2]) * 8)
        made = extra_conds(**params)
        sample: dict[str, torch.Tensor] = {}
        for key, value in made.items():
            tensor = getattr(value, "cond", value)
            if not isinstance(tensor, torch.Tensor):
                continue
            name = "cond" if key == "c_crossattn" else key
            sample[name] = tensor[0].detach().float().cpu().clone()
        if "cond" not in sample:
            sample["cond"] = cond.detach().float().cpu().clone()
        per_sample.append(sample)
    keys = set(per_sample[0])
    for i, sample in enumerate(per_sample):
        if set(sample) != keys:
            raise DataError(f"{what}: row {i} gives the model {sorted(sample)}, row 0 "
                            f"{sorted(keys)}; every row must give the same inputs")
    out: dict[str, torch.Tensor] = {}
    for key in sorted(keys):
        shapes = {tuple(s[key].shape) for s in per_sample}
        if len(shapes) != 1:
            raise DataError(f"{what}: tensor {key!r} differs in shape between rows "
                            f"({sorted(shapes)[:3]}); encode the prompts to one length")
        out[key] = torch.stack([s[key] for s in per_sample])
    return out


#: the inputs that stay lists when ComfyUI hands every input as a list (the node's
#: ``INPUT_IS_LIST``, as its Train LoRA has): one item per upstream LATENT/CONDITIONING
LIST_INPUTS = ("latents", "positive", "validation_latents", "validation_positive")


def unwrap_list_inputs(values: Mapping[str, Any]) -> dict[str, Any]:
    """The node's inputs as ComfyUI passes them to a node with ``INPUT_IS_LIST`` (each
    a list): the data inputs kept as lists, every other input its single value."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        if key in LIST_INPUTS or not isinstance(value, list):
            out[key] = value
        elif len(value) != 1:
            raise ConfigError(f"{key}: got {len(value)} values; this input takes one")
        else:
            out[key] = value[0]
    return out


# -- widget values -> a loraengine config ------------------------------------------------

@dataclass
class NodeInputs:
    """The Train LoRA node's widget values (ComfyUI's names)."""

    batch_size: int = 1
    grad_accumulation_steps: int = 1
    steps: int = 16
    learning_rate: float = 0.0005
    rank: int = 8
    optimizer: str = "AdamW"
    loss_function: str = "MSE"
    seed: int = 0
    training_dtype: str = "bf16"
    lora_dtype: str = "bf16"
    algorithm: str = "LoRA"
    gradient_checkpointing: bool = True
    existing_lora: str | Path | None = None
    quantized_backward: bool = False
    checkpoint_depth: int = 1
    offloading: bool = False
    bucket_mode: bool = False
    bypass_mode: bool = False
    alpha: float = 1.0
    norm_and_bias_deltas: bool = True
    loss_target: str = "x0"
    algorithm_options: str | Mapping[str, Any] = ""
    lr_schedule: str = "constant"
    warmup_steps: int = 0
    output_folder: str | Path = ""
    save_every: int = 0
    resume: bool = True
    validation_every: int = 0


def _pick(table: Mapping[str, str], value: str, key: str) -> str:
    if not isinstance(value, str) or value not in table:
        raise ConfigError(f"{key}: {value!r} is not one of {', '.join(table)}")
    return table[value]


def _mapping(text: str | Mapping[str, Any] | None, key: str) -> dict[str, Any]:
    if text is None or (isinstance(text, str) and not text.strip()):
        return {}
    if isinstance(text, Mapping):
        return dict(text)
    if not isinstance(text, str):
        raise ConfigError(f"{key}: expected YAML text or a mapping, got {type(text).__name__}")
    try:  # the config reader's own limits (nesting, aliases, size) hold here too
        data, _ = load_yaml(text, key)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{key}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{key}: expected a YAML mapping, got {type(data).__name__}")
    return data


def config_from_inputs(inputs: NodeInputs, config: Mapping[str, Any] | None = None
                       ) -> dict[str, Any]:
    """The loraengine config of one node run: the widgets, with ``config`` (a mapping
    from the Load loraengine config node) laid over them; ``model`` and ``data`` come
    from the graph whatever ``config`` says."""
    options = _mapping(inputs.algorithm_options, "algorithm_options")
    for key, widget in (("algorithm", "the algorithm widget"),
                        ("exporter", "the node (ComfyUI's keys)")):
        if key in options:
            raise ConfigError(f"algorithm_options: {key!r} is set by {widget}; this field "
                              f"takes the algorithm's own options")
    adapter: dict[str, Any] = {
        "algorithm": _pick(ALGORITHMS, inputs.algorithm, "algorithm"),
        "rank": inputs.rank, "alpha": inputs.alpha, "dtype": inputs.lora_dtype,
        "norm_and_bias_deltas": inputs.norm_and_bias_deltas, "exporter": "comfyui",
        **options,
    }
    if inputs.existing_lora:
        adapter["existing"] = str(inputs.existing_lora)
    if inputs.lora_dtype not in DTYPES or inputs.training_dtype not in DTYPES:
        raise ConfigError(f"training_dtype / lora_dtype: one of {', '.join(DTYPES)}")
    memory: dict[str, Any] = {
        "gradient_checkpointing": inputs.gradient_checkpointing,
        "checkpoint_depth": inputs.checkpoint_depth,
        "offloading": inputs.offloading, "bypass_mode": inputs.bypass_mode,
    }
    if inputs.quantized_backward:
        memory["quantized_backward"] = True
    if inputs.lr_schedule not in LR_SCHEDULES:
        raise ConfigError(f"lr_schedule: {inputs.lr_schedule!r} is not one of "
                          f"{', '.join(LR_SCHEDULES)}")
    if inputs.loss_target not in LOSS_TARGETS:
        raise ConfigError(f"loss_target: {inputs.loss_target!r} is not one of "
                          f"{', '.join(LOSS_TARGETS)}")
    cfg: dict[str, Any] = {
        "training": {"batch_size": inputs.batch_size,
                     "grad_accumulation_steps": inputs.grad_accumulation_steps,
                     "steps": inputs.steps, "seed": inputs.seed,
                     "dtype": inputs.training_dtype, "device": "auto"},
        "optimizer": {"name": _pick(OPTIMIZERS, inputs.optimizer, "optimizer"),
                      "lr": inputs.learning_rate},
        "loss": {"name": _pick(LOSSES, inputs.loss_function, "loss_function"),
                 "target": inputs.loss_target},
        "lr_scheduler": {"name": inputs.lr_schedule, "warmup_steps": inputs.warmup_steps},
        "adapter": adapter,
        "memory": memory,
    }
    if str(inputs.output_folder):
        cfg["output"] = {"dir": str(inputs.output_folder), "plot": False}
        if inputs.save_every:
            cfg["output"]["save_every"] = inputs.save_every
    elif inputs.save_every:
        raise ConfigError("save_every: needs output_folder, where the checkpoints go")
    if inputs.validation_every:
        cfg["validation"] = {"every": inputs.validation_every}
    cfg = deep_merge(cfg, _mapping(config, "config"))
    section = cfg.get("adapter")
    exporter = section.get("exporter", "comfyui") if isinstance(section, Mapping) else "comfyui"
    if exporter != "comfyui":
        raise ConfigError(f"config: adapter.exporter: {exporter!r} would give the LORA_MODEL "
                          f"another program's keys; the node writes ComfyUI's (convert a "
                          f"saved file with loraengine convert)")
    cfg["model"] = {"family": "comfyui"}
    given = cfg.get("data") or {}
    if not isinstance(given, Mapping):
        raise ConfigError(f"config: data: expected a mapping of data options, got "
                          f"{type(given).__name__}")
    data = {k: v for k, v in given.items() if k not in ("latents", "conditioning")}
    if inputs.bucket_mode:
        data["bucket_mode"] = True
    cfg["data"] = data
    return cfg


def load_config_text(text: str = "", path: str | Path = "") -> dict[str, Any]:
    """The Load loraengine config node: a YAML file (``path``) and/or YAML text laid
    over it, checked against the engine's options (with a placeholder for the model and
    data the graph gives) so a wrong key fails here, naming it."""
    from loraengine.core.config.root import parse_config
    from loraengine.plugins import build_plugin_manager

    data: dict[str, Any] = {}
    if str(path):
        file = Path(path).expanduser()
        if file.is_dir():
            raise ConfigError(f"config: {file} is a folder, not a config file")
        if not file.is_file():
            raise ConfigError(f"config: no file {file}")
        try:
            text_of_file = file.read_bytes().decode("utf-8")
        except OSError as exc:
            raise ConfigError(f"config: cannot read {file} ({exc.strerror or exc})") from None
        except UnicodeDecodeError as exc:
            raise ConfigError(f"config: {file} is not UTF-8 text (byte {exc.start})") from None
        data = _mapping(text_of_file, str(file))
    data = deep_merge(data, _mapping(text, "config text"))
    probe = deep_merge(data, {"model": {"family": "comfyui"}})
    probe.setdefault("data", {})
    parse_config(probe, build_plugin_manager().registry, base_dir=Path.cwd())
    return data


# -- a run ----------------------------------------------------------------------------------

class ProgressCallback:
    """A plugin reporting each step to ``callback(step, total)`` (ComfyUI's progress
    bar; it may raise ComfyUI's interruption to stop the run)."""

    def __init__(self, callback: Callable[[int, int], None]):
        self.callback = callback

    @hookimpl
    def loraengine_on_step_end(self, run: Any, step: int, metrics: dict[str, float]) -> None:
        self.callback(step, run.total_steps)


class LoraModel(dict[str, torch.Tensor]):
    """A ``LORA_MODEL``: ComfyUI's state dict of the adapter (what its LoraModelLoader
    and SaveLoRA take), carrying the metadata loraengine writes into its files."""

    metadata: dict[str, str]

    def __init__(self, tensors: Mapping[str, torch.Tensor],
                 metadata: Mapping[str, str] | None = None):
        super().__init__(tensors)
        self.metadata = dict(metadata or {})


@dataclass
class NodeResult:
    lora: LoraModel
    loss_map: dict[str, list[float]]
    steps: int
    result: Any = None


def _safetensors_file(folder: Path, name: str, tensors: Mapping[str, torch.Tensor]) -> Path:
    from safetensors.torch import save_file

    path = folder / name
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return path


def train_lora(model: Any, latents: Any, positive: Any, inputs: NodeInputs | None = None,
               *, config: Mapping[str, Any] | None = None, validation_latents: Any = None,
               validation_positive: Any = None,
               progress: Callable[[int, int], None] | None = None) -> NodeResult:
    """One Train LoRA (loraengine) node run.

    ``model`` is ComfyUI's ``BaseModel`` (a ``MODEL``'s ``.model``) or anything with its
    ``diffusion_model``, ``model_sampling`` and ``apply_model``; ``latents`` a
    ``LATENT``; ``positive`` a ``CONDITIONING``. Returns ``LORA_MODEL`` (ComfyUI's
    keys, in ``lora_dtype``), ``LOSS_MAP`` and the step count, existing steps included.
    The model comes back as it came (``loraengine.train``)."""
    # ComfyUI runs nodes under inference mode: train outside it, on tensors made here
    with torch.inference_mode(False), torch.enable_grad():
        return _train_lora(model, latents, positive, inputs or NodeInputs(), config,
                           validation_latents, validation_positive, progress)


def plain_tensors(model: Any) -> int:
    """Replace ``model``'s inference-mode parameters and buffers (ComfyUI loads models
    inside its inference mode, and autograd cannot save such tensors for the backward
    pass) with ordinary copies of the same values, one at a time; returns how many."""
    if not isinstance(model, torch.nn.Module):
        return 0
    count = 0
    for mod in model.modules():
        for name, p in list(mod._parameters.items()):
            if p is not None and p.is_inference():
                mod._parameters[name] = torch.nn.Parameter(p.detach().clone(),
                                                           requires_grad=p.requires_grad)
                count += 1
        for name, b in list(mod._buffers.items()):
            if b is not None and b.is_inference():
                mod._buffers[name] = b.clone()
                count += 1
    return count


def _train_lora(model: Any, latents: Any, positive: Any, inputs: NodeInputs,
                config: Mapping[str, Any] | None, validation_latents: Any,
                validation_positive: Any, progress: Callable[[int, int], None] | None
                ) -> NodeResult:
    import loraengine
    from loraengine.plugins import build_plugin_manager

    cfg = config_from_inputs(inputs, config)
    plain_tensors(model)
    extra = getattr(model, "extra_conds", None)
    parts = latent_list(latents)
    samples: torch.Tensor | dict[str, torch.Tensor]
    cond: dict[str, torch.Tensor]
    if inputs.bucket_mode:
        samples, cond = bucket_tensors(parts, positive, extra)
    else:
        shapes = sorted({tuple(p.shape[1:]) for p in parts})
        if len(shapes) > 1:
            raise DataError(f"latents: {len(parts)} LATENTs of {len(shapes)} sizes "
                            f"({', '.join('x'.join(map(str, s)) for s in shapes[:4])}); "
                            f"turn on bucket_mode to train each size as a bucket")
        samples = torch.cat(parts) if len(parts) > 1 else parts[0]
        cond = conditioning_tensors(positive, samples, extra)
    extras = [ProgressCallback(progress)] if progress is not None else []
    host = build_plugin_manager(extra=extras)
    with tempfile.TemporaryDirectory(prefix="loraengine-comfyui-") as tmp:
        if validation_latents is not None:
            if validation_positive is None:
                raise DataError("validation_positive: needed with validation_latents")
            val_parts = latent_list(validation_latents, "validation_latents")
            if len({tuple(v.shape[1:]) for v in val_parts}) > 1:
                raise DataError("validation_latents: LATENTs of several sizes; give "
                                "validation latents of one size")
            val = torch.cat(val_parts)
            val_cond = conditioning_tensors(validation_positive, val, extra,
                                            "validation_positive")
            folder = Path(tmp)
            cfg["data"]["validation"] = {
                "latents": str(_safetensors_file(folder, "val_latents.safetensors",
                                                 {"latents": val})),
                "conditioning": str(_safetensors_file(folder, "val_cond.safetensors",
                                                      val_cond))}
            cfg.setdefault("validation", {}).setdefault("every", inputs.steps)
        writes = "output" in cfg
        resume = None
        if writes and inputs.resume:
            out = cfg["output"]
            folder = Path(out["dir"]) / f"{out.get('name', 'lora')}.checkpoints"
            resume = "latest" if folder.is_dir() and any(folder.iterdir()) else None
        result = loraengine.train(cfg, model=model, latents=samples, conditioning=cond,
                                  host=host, write_files=writes, resume=resume)
    meta = dict(result.metadata)
    meta["loraengine.format"] = "comfyui"
    return NodeResult(LoraModel(result.lora, meta),
                      {k: list(v) for k, v in result.loss_map.items()}, int(result.steps),
                      result)


def existing_steps(name: str) -> int:
    """The step count ComfyUI's SaveLoRA writes into a file name
    (``<prefix>_<steps>_steps_<counter>_.safetensors``), 0 when it has none."""
    stem = Path(name).name
    if "_steps_" not in stem:
        return 0
    head = stem.split("_steps_")[0].rsplit("_", 1)[-1]
    return int(head) if head.isdigit() else 0


def save_lora_file(lora: Mapping[str, torch.Tensor], path: str | Path,
                   steps: int | None = None) -> Path:
    """Write a ``LORA_MODEL`` in ComfyUI's keys as it is, with loraengine's metadata
    when it came from our node (``LoraModel.metadata``: algorithm, rank, alpha, steps,
    config, as ``loraengine inspect`` shows them); ``steps`` updates the step count."""
    from loraengine.core.files import save_lora

    for key, value in lora.items():
        if not isinstance(key, str):
            raise DataError(f"lora: key {key!r} is {type(key).__name__}; a LORA_MODEL maps "
                            f"key names (text) to tensors")
        if not isinstance(value, torch.Tensor):
            raise DataError(f"lora: {key} is {type(value).__name__}; a LORA_MODEL maps key "
                            f"names to tensors")
        if value.device.type == "meta":
            raise DataError(f"lora: {key} is on the meta device and holds no values")
    meta = dict(getattr(lora, "metadata", {}) or {})
    meta.setdefault("loraengine.format", "comfyui")
    if steps is not None:
        meta["loraengine.steps"] = meta["ss_steps"] = str(int(steps))
    out = Path(path)
    # a copy of each: keys that share one tensor (an alpha used twice) are stored apart
    save_lora(out, {k: v.detach().clone() for k, v in lora.items()}, meta)
    return out
