"""What a model-family plugin hands the engine."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from loraengine.core.errors import LoraEngineError
from loraengine.core.schedule import NoiseSchedule

#: predict(module, x_t, model_timesteps, cond) -> model output shaped like x_t
PredictFn = Callable[[nn.Module, torch.Tensor, torch.Tensor, dict[str, torch.Tensor]],
                     torch.Tensor]


@dataclass
class LoadedModel:
    """A denoiser ready to train.

    ``module`` is the network adapters go on; ``predict`` calls it with a batch;
    ``blocks`` are its top-level blocks (gradient checkpointing depth 1 wraps each);
    ``cond_keys`` the conditioning tensors it needs.
    """

    module: nn.Module
    predict: PredictFn
    schedule: NoiseSchedule
    blocks: list[nn.Module] = field(default_factory=list)
    family: str = ""
    default_exporter: str = "kohya"
    base_model_version: str = ""
    cond_keys: tuple[str, ...] = ("cond",)
    #: Latents are ``(vae_mean - vae_shift) * vae_scale``; decode with the inverse.
    vae_scale: float = 1.0
    vae_shift: float = 0.0
    #: The family's default adapter targets (globs over module paths), used when the
    #: config leaves ``adapter.include`` unset; empty means every adaptable layer.
    default_include: tuple[str, ...] = ()
    #: Where the denoiser's weights were read from ("" for an in-memory module).
    source: str = ""
    #: The diffusers pipeline folder the model belongs to, when there is one: samplers
    #: find its ``vae/`` and the text encoders there.
    pipeline_root: Path | None = None
    #: True when the weights came from one single-file checkpoint.
    single_file: bool = False
    #: The VAE that decodes this model's latents: a module with ``decode``, a callable
    #: that loads one, or ``None`` (previews then look in ``pipeline_root``).
    vae: Any = None
    # What the denoiser takes, checked against the data before training starts (a
    # mismatch is one error naming the file and tensor instead of a failure deep in a
    # conv or linear layer). ``None`` / empty: the family cannot tell, nothing checked.
    #: Dimensions of the latents tensor: 4 for image models ``[N,C,H,W]``, 5 for video.
    latent_ndim: int | None = None
    #: Channels ``C`` of one latent.
    latent_channels: int | None = None
    #: Last-dimension width of conditioning tensors by name, e.g. ``{"cond": 768}`` (the
    #: cross-attention width) or the pooled embedding's width.
    cond_widths: dict[str, int] = field(default_factory=dict)
    #: A model of several separately used parts (Wan 2.2's two experts) is written as
    #: one file per part: ``{"high_noise": "high_noise."}`` writes the adapters under
    #: module prefix ``high_noise.`` (named without it) to ``<name>.high_noise.safetensors``.
    #: Empty: one file of every adapter.
    file_parts: dict[str, str] = field(default_factory=dict)


def top_level_blocks(module: nn.Module) -> list[nn.Module]:
    """Direct children of ``module``, with containers (ModuleList/Sequential without a
    forward of their own that matters) opened up."""
    out: list[nn.Module] = []
    for child in module.children():
        if isinstance(child, (nn.ModuleList, nn.ModuleDict)):
            out.extend(child.children())
        else:
            out.append(child)
    return out


@dataclass(frozen=True)
class ModelLayout:
    """What a family reads from a model's config files alone, without loading its
    weights (``loraengine validate``): the same facts ``LoadedModel`` carries about the
    data the denoiser takes. ``None`` / empty: the family cannot tell from its config."""

    #: Where the denoiser's weights are.
    source: str
    cond_keys: tuple[str, ...] = ("cond",)
    latent_ndim: int | None = None
    latent_channels: int | None = None
    cond_widths: dict[str, int] = field(default_factory=dict)
    #: Builds the denoiser the run would adapt from its config alone, its parameters on
    #: the ``meta`` device (no weights read, no memory taken), with the module paths
    #: loading gives it: ``validate`` resolves the adapter targets on it. ``None``:
    #: the family cannot build it so.
    skeleton: Callable[[], nn.Module] | None = None
    #: The family's default adapter targets, as ``LoadedModel.default_include``.
    default_include: tuple[str, ...] = ()


def checked_prediction(pred: object, x_t: torch.Tensor, what: str = "the model"
                       ) -> torch.Tensor:
    """``pred``, the prediction ``what`` made for the noisy input ``x_t``, refused
    (``LoraEngineError``) unless it is a floating-point tensor of ``x_t``'s shape: any
    other shape would be broadcast into the loss and train on a number that means
    nothing."""
    if not isinstance(pred, torch.Tensor):
        raise LoraEngineError(f"{what} returned {type(pred).__name__}, not a tensor: it "
                              f"must return its prediction for x_t {list(x_t.shape)}")
    if pred.shape != x_t.shape or not pred.is_floating_point():
        problem = (f"shape {list(pred.shape)}" if pred.shape != x_t.shape
                   else f"dtype {pred.dtype}")
        raise LoraEngineError(f"{what} returned a prediction of {problem}; it must be a "
                              f"floating-point tensor of the noisy input's shape "
                              f"{list(x_t.shape)}, one value per latent element")
    return pred


def forward_failed(exc: BaseException, x_t: torch.Tensor,
                   cond: Mapping[str, torch.Tensor]) -> LoraEngineError:
    """The error for a model forward that raised on a batch: the inputs' shapes and
    dtypes (most such failures are data that does not fit the model, a conditioning
    width or a latent channel count) and the first line of what was raised."""
    shown = ", ".join(f"{k} {list(v.shape)} {str(v.dtype).removeprefix('torch.')}"
                      for k, v in cond.items())
    text = str(exc).strip()
    first = text.splitlines()[0][:300] if text else ""
    return LoraEngineError(f"the model's forward failed on x_t {list(x_t.shape)} with "
                           f"{shown or 'no conditioning'}: {type(exc).__name__}"
                           f"{': ' + first if first else ''} (does the data fit the model?)")
