"""The ``diffusers`` family: a denoiser saved with diffusers' ``save_pretrained``,
loaded from a local folder (a pipeline folder or its ``unet`` subfolder), never from a
hub. The noise schedule comes from the pipeline's scheduler config when there is one."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, cast

import torch
from pydantic import Field
from torch import nn

from loraengine.core.config.root import ConfigPath
from loraengine.core.errors import ConfigError, DataError
from loraengine.core.model import LoadedModel, ModelLayout
from loraengine.core.plugins.specs import ModelFamilySpec
from loraengine.core.schedule import NoiseSchedule
from loraengine.plugins.models.common import (
    DDPMKind,
    check_weights_readable,
    config_view,
    ddpm_from_config,
    locate_folder,
    read_json,
    skeleton_of,
    unet_blocks,
    unet_inputs,
)
from loraengine.plugins.models.module import ScheduleOptions

SUPPORTED = {"UNet2DConditionModel"}


class DiffusersOptions(ScheduleOptions):
    path: ConfigPath = Field(description="A diffusers pipeline folder, or a model folder "
                             "with config.json and its weights.")
    subfolder: str | None = Field(None, description="Model subfolder of a pipeline "
                                  "folder (default: unet).")
    prediction_type: Literal["auto", "epsilon", "v_prediction", "flow"] = Field(  # type: ignore[assignment]
        "auto", description="auto: from the pipeline's scheduler config, else epsilon.")


def locate(options: DiffusersOptions) -> tuple[Path, Path | None]:
    """(model folder, scheduler config or None)."""
    root = Path(options.path)
    if not root.exists():
        raise DataError(f"model.path: {root} does not exist")
    if not root.is_dir():
        raise DataError(f"model.path: {root} is not a folder (single-file checkpoints need "
                        f"a model family that reads them)")
    model_dir, pipeline = locate_folder(root, options.subfolder, "unet")
    # a model folder's scheduler is its sibling, whether or not a model_index.json says so
    sched = (pipeline or model_dir.parent) / "scheduler" / "scheduler_config.json"
    return model_dir, sched if sched.exists() else None


def schedule_from(options: DiffusersOptions, sched_path: Path | None) -> NoiseSchedule:
    """The scheduler config's schedule; an explicit ``prediction_type`` overrides only
    the prediction type (the betas and step count stay the config's)."""
    if sched_path is None:
        return options.schedule("epsilon" if options.prediction_type == "auto"
                                else options.prediction_type)
    sc = read_json(sched_path)
    is_flow = "FlowMatch" in str(sc.get("_class_name", ""))
    kind: str = options.prediction_type
    if kind == "flow" or (kind == "auto" and is_flow):
        shift = float(sc.get("shift", options.flow_shift)) if is_flow and \
            "flow_shift" not in options.model_fields_set else options.flow_shift
        return NoiseSchedule.flow(shift)
    if kind == "auto":
        kind = sc.get("prediction_type", "epsilon")
    if kind in ("epsilon", "v_prediction"):
        return ddpm_from_config(cast(DDPMKind, kind), sc)
    raise ConfigError(f"model.prediction_type: {kind!r} cannot be trained; use "
                      f"epsilon, v_prediction or flow")


def _predict_unet(module: nn.Module, x_t: torch.Tensor, t: torch.Tensor,
                  cond: Mapping[str, torch.Tensor]) -> torch.Tensor:
    added = None
    if "text_embeds" in cond and "time_ids" in cond:
        added = {"text_embeds": cond["text_embeds"], "time_ids": cond["time_ids"]}
    return module(x_t, t, encoder_hidden_states=cond["cond"], added_cond_kwargs=added,
                  return_dict=False)[0]


def load(options: DiffusersOptions, context: Mapping[str, Any]) -> LoadedModel:
    import diffusers

    diffusers.utils.logging.set_verbosity_error()  # the engine reports what matters itself
    model_dir, sched_path = locate(options)
    cls_name = _supported_class(model_dir)
    cls = getattr(diffusers, cls_name)
    from loraengine.plugins.models.weights import load_folder

    try:
        # one copy of the weights, in training.dtype, with the memory strategies'
        # transform applied as they are read; other folders through diffusers
        module = load_folder(cls, model_dir, cast(Any, context.get("dtype")),
                             cast(Any, context.get("prepare")))
        if module is None:
            module = cls.from_pretrained(str(model_dir), local_files_only=True)
    except (OSError, ValueError, RuntimeError) as exc:
        raise DataError(f"model.path: cannot load {cls_name} from {model_dir}: "
                        f"{str(exc).splitlines()[0]}") from None
    channels, widths = unet_inputs(module)
    return LoadedModel(module=module, predict=_predict_unet,
                       schedule=schedule_from(options, sched_path), blocks=unet_blocks(module),
                       family="diffusers", default_exporter="kohya",
                       cond_keys=_cond_keys(module),
                       base_model_version=f"diffusers:{cls_name}", latent_ndim=4,
                       latent_channels=channels, cond_widths=widths)


def _supported_class(model_dir: Path) -> str:
    cls_name = str(read_json(model_dir / "config.json").get("_class_name", ""))
    if cls_name not in SUPPORTED:
        raise ConfigError(f"model.path: {model_dir} holds a {cls_name or 'unknown'} model; "
                          f"the 'diffusers' family reads {', '.join(sorted(SUPPORTED))}")
    return cls_name


def _cond_keys(module: Any) -> tuple[str, ...]:
    """SDXL-style UNets (``addition_embed_type: text_time``) also take the pooled text
    embedding and the size ids."""
    if getattr(module.config, "addition_embed_type", None) == "text_time":
        return ("cond", "text_embeds", "time_ids")
    return ("cond",)


def describe(options: DiffusersOptions, context: Mapping[str, Any]) -> ModelLayout:
    """What ``load`` would find, from the config files alone (no weights loaded)."""
    model_dir, sched_path = locate(options)
    cls_name = _supported_class(model_dir)
    check_weights_readable(model_dir)
    schedule_from(options, sched_path)
    view = config_view(model_dir)
    channels, widths = unet_inputs(view)
    return ModelLayout(source=str(model_dir), cond_keys=_cond_keys(view), latent_ndim=4,
                       latent_channels=channels, cond_widths=widths,
                       skeleton=skeleton_of(cls_name, model_dir))


__all__ = ["SPEC", "DiffusersOptions", "describe", "load", "locate", "schedule_from", "unet_blocks"]

SPEC = ModelFamilySpec("diffusers", load, DiffusersOptions,
                       "A diffusers UNet2DConditionModel from a local folder.",
                       describe=describe)
