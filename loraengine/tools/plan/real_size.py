"""Memory plans of the released models at their real size, before downloading them.

``loraengine/plugins/models/real_sizes.json`` carries the ``config.json`` values of the
released denoisers. :func:`real_model` builds one on the ``meta`` device (no storage,
nothing read); :func:`plan_scenarios` runs the dry-run :func:`~loraengine.tools.plan.
logic.estimate` on it at a resolution (and, for a video model, a clip length) under a
few memory set-ups: bf16, with checkpointing, with an fp8 base and with blocks offloaded.
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass
from importlib import resources
from typing import Any

import torch

from loraengine.core.errors import ConfigError, LoraEngineError
from loraengine.core.plugins.host import PluginHost
from loraengine.tools.plan.logic import MemoryPlan, MiB, estimate


def real_sizes() -> dict[str, dict[str, Any]]:
    """Every real-size record by name (``qwen_image``, ``flux2_dev``, ...)."""
    text = resources.files("loraengine.plugins.models").joinpath("real_sizes.json").read_text(
        encoding="utf-8")
    return {k: v for k, v in json.loads(text).items() if not k.startswith("_")}


def record(name: str) -> dict[str, Any]:
    known = real_sizes()
    if name not in known:
        raise ConfigError(f"--real: unknown model {name!r}; known: {', '.join(known)}")
    return known[name]


def parse_resolution(text: str | None) -> tuple[int, int] | None:
    """``--resolution``: ``1024`` (square) or ``HxW`` (``480x832``); ``None`` stays."""
    if text is None:
        return None
    parts = text.lower().replace("×", "x").split("x")
    try:
        sides = [int(p) for p in parts]
    except ValueError:
        sides = []
    if len(sides) not in (1, 2) or min(sides) <= 0:
        raise ConfigError(f"--resolution: {text!r} is neither a side in pixels (1024) nor "
                          f"HxW (480x832)")
    return (sides[0], sides[-1])


def latent_shape(name: str, resolution: int | tuple[int, int] | None = None,
                 frames: int | None = None) -> list[int]:
    """The latent of one sample of ``name``: ``[C, H, W]`` for an image model at
    ``resolution`` (default: the record's ``image_size``, else 1024²), ``[C, T, H, W]``
    for a video model with ``frames``
    frames (a first latent frame, then one per ``temporal_factor`` frames) at
    ``resolution`` (default: the record's)."""
    rec = record(name)
    if isinstance(resolution, int):
        resolution = (resolution, resolution)
    factor = int(rec["vae_factor"])
    if "frames" not in rec:
        if frames is not None:
            raise ConfigError(f"--frames: {name} is an image model")
        height, width = resolution or tuple(rec.get("image_size", (1024, 1024)))
    else:
        height, width = resolution or tuple(rec["resolution"])
    for side in (height, width):
        if side % factor:
            raise ConfigError(f"--resolution: {height}x{width} is not a multiple of "
                              f"{factor}, {name}'s VAE factor")
    shape = [int(rec["latent_channels"]), height // factor, width // factor]
    if "frames" in rec:
        frames = int(rec["frames"]) if frames is None else frames
        step = int(rec["temporal_factor"])
        if frames < 1 or (frames - 1) % step:
            raise ConfigError(f"--frames: {frames} is not 1 + a multiple of {step} "
                              f"({name}'s VAE packs {step} frames per latent frame after "
                              f"the first)")
        shape.insert(1, (frames - 1) // step + 1)
    return shape


#: The most values of latents and conditioning a dry run holds for its batch: they
#: (and the step's noise) are real tensors on the host, 1 GiB in fp32 at this limit.
MAX_HOST_VALUES = 1 << 28


def check_host_size(name: str, shape: list[int], batch: int) -> None:
    """Refuse a ``--batch``, ``--resolution`` or ``--frames`` whose data would not fit in
    host memory (the model itself is on the meta device and takes none)."""
    values = batch * (math.prod(shape) + sum(math.prod(s) for s in _cond_shapes(name).values()))
    if values > MAX_HOST_VALUES:
        raise ConfigError(f"--batch/--resolution/--frames: a batch of {batch} latents "
                          f"{shape} with their conditioning holds {values:,} values, more "
                          f"than the {MAX_HOST_VALUES:,} a dry run keeps in host memory; "
                          f"plan a smaller batch or size")


def real_model(name: str, blocks: dict[str, int] | None = None) -> torch.nn.Module:
    """The released denoiser ``name`` on the meta device; ``blocks`` overrides the
    counts of its repeated blocks (config keys of the record's ``blocks``)."""
    import diffusers

    rec = record(name)
    cls = getattr(diffusers, rec["class"])
    config = {**rec["config"], **(blocks or {})}
    if blocks:
        # lists with one entry per block (HiDream's llama_layers) follow the block count
        count = sum(int(config[k]) for k in rec["blocks"])
        for key in rec.get("per_block", ()):
            config[key] = list(config[key])[:count]
    with torch.device("meta"):
        model: torch.nn.Module = cls.from_config(config)
    return model


def conditioning(name: str, batch: int) -> dict[str, torch.Tensor]:
    """Zero conditioning of ``batch`` samples as ``prepare`` writes it for ``name``: the
    record's ``cond`` shapes per key (a ``mask`` is int64, as a tokenizer's), else one
    ``cond`` of ``text_tokens`` × ``text_width``."""
    return {key: torch.zeros(batch, *shape,
                             dtype=torch.long if key == "mask" else torch.float32)
            for key, shape in _cond_shapes(name).items()}


def _cond_shapes(name: str) -> dict[str, list[int]]:
    """One sample's conditioning shapes by key, as ``conditioning`` makes them."""
    rec = record(name)
    shapes = rec.get("cond") or {"cond": [rec["text_tokens"], rec["text_width"]]}
    return {key: [int(n) for n in shape] for key, shape in shapes.items()}


@dataclass
class Scenario:
    label: str
    model: dict[str, Any]
    memory: dict[str, Any]


def scenarios(blocks: int, offload: int) -> list[Scenario]:
    """The set-ups planned: ``offload`` of the model's ``blocks`` blocks offloaded."""
    ck = {"gradient_checkpointing": True}
    part = {**ck, "offloading": True, "offload_blocks": offload}
    fp8 = {"quantize": "fp8"}
    bypass = {"bypass_mode": True}
    return [Scenario("bf16", {}, {"gradient_checkpointing": False}),
            Scenario("bf16 + checkpointing", {}, ck),
            Scenario("fp8 base + checkpointing", fp8, {**ck, **bypass}),
            Scenario(f"bf16 + checkpointing + {offload}/{blocks} blocks offloaded", {}, part),
            Scenario(f"fp8 base + checkpointing + {offload}/{blocks} blocks offloaded", fp8,
                     {**part, **bypass}),
            Scenario("bf16 + checkpointing + all blocks offloaded", {},
                     {**ck, "offloading": True})]


#: The fields of a plan that are extrapolated (the others are taken from the base run).
_LINEAR = ("weights_device", "weights_host", "adapter", "optimizer_state", "gradients",
           "other_resident", "activations", "peak", "transfer_bytes")


def _plan_at(name: str, host: PluginHost, sc: Scenario, blocks: dict[str, int],
             offload: int | None, resolution: int | tuple[int, int] | None, rank: int,
             batch: int, frames: int | None = None) -> MemoryPlan:
    from loraengine.core.config.root import parse_config

    rec = record(name)
    latents = torch.zeros(batch, *latent_shape(name, resolution, frames))
    cond = conditioning(name, batch)
    memory = dict(sc.memory)
    if "offload_blocks" in memory:
        memory["offload_blocks"] = offload
    cfg = {"model": {"family": rec["family"], "path": f"<real:{name}>",
                     **rec.get("model", {}), **sc.model},
           "training": {"steps": 3, "batch_size": batch, "dtype": "bf16", "seed": 0,
                        "device": "cuda"},
           "adapter": {"rank": rank, "alpha": rank, "dtype": "bf16"},
           "memory": memory}
    conf = parse_config(cfg, host.registry)
    from diffusers.utils import logging as diffusers_logging

    # casting a model with float32 modules (Wan's norms) to bf16 warns on each dry run
    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    try:
        return estimate(conf, host, model=real_model(name, blocks),
                        latents={"latents": latents}, conditioning=cond, count_flops=False)
    except (RuntimeError, NotImplementedError, LoraEngineError) as exc:
        # the training step reports a failed forward as an engine error, caused by it
        cause = exc.__cause__ if isinstance(exc, LoraEngineError) else exc
        if "meta tensor" not in str(cause).lower():
            raise
        # a forward that branches on tensor values (HunyuanVideo 1.5 tests its image
        # embedding for zeros and selects its text tokens by mask, Lumina 2 reads its
        # mask's lengths, HiDream routes tokens to experts by count) has no dry run
        raise ConfigError(f"--real: {name}: {rec['class']}'s forward reads tensor values, "
                          f"which a dry run on the meta device does not have; plan a "
                          f"config of a local model folder instead") from None
    finally:
        diffusers_logging.set_verbosity(level)


#: Resident blocks of the partial-offload fit's base point: on Wan 2.1 14B at 81×480×832
#: a fit from 2 misses the 40-block plan's peak by 18%, one from 6 or 8 matches it.
_RESIDENT = 6


def _affine(points: list[tuple[list[int], MemoryPlan]], at: list[int]) -> MemoryPlan:
    """Each extrapolated field of the plans at ``points`` (a base point, then one per
    variable, each one higher in that variable) fitted as c + Σ aᵢ·xᵢ, read at ``at``."""
    (x0, base), rest = points[0], points[1:]
    fields = {}
    for key in _LINEAR:
        value = float(getattr(base, key))
        for i, (_, plan) in enumerate(rest):
            value += (getattr(plan, key) - getattr(base, key)) * (at[i] - x0[i])
        fields[key] = max(int(round(value)), 0)
    out = copy.copy(base)
    for key, value in fields.items():
        setattr(out, key, value)
    return out


def plan_scenarios(name: str, host: PluginHost,
                   resolution: int | tuple[int, int] | None = None, rank: int = 16,
                   batch: int = 1, offload: int | None = None, labels: list[str] | None = None,
                   frames: int | None = None) -> list[tuple[str, MemoryPlan | None]]:
    """(label, plan) of each scenario for the real-size model ``name`` training a LoRA
    of ``rank`` at ``resolution`` (a side or (height, width); default 1024², or a video
    record's own) with batch ``batch``, bf16 compute, AdamW; a video model on clips of
    ``frames`` frames (default: the record's). A record with two experts (Wan 2.2)
    plans the one expert its ``model`` options pick.

    A dry run of a 60-block model is slow, and the blocks repeat: the plan is an
    affine function of each block count (weights, optimizer state, saved activations
    all grow by one block's worth per block; the transient peak inside a block does not
    grow). So each scenario is planned at 2 and 3 blocks of each kind (2 and 3 resident,
    2 and 3 offloaded) and read at the real counts. Partial offloading, affine in the resident and the offloaded blocks,
    is planned for a model with one kind of block (else ``None``)."""
    rec = record(name)
    # a bad size fails before any dry run
    check_host_size(name, latent_shape(name, resolution, frames), batch)
    keys = list(rec["blocks"])
    real = [int(rec["config"][k]) for k in keys]
    total = sum(real)
    if offload is not None and (len(keys) != 1 or not 1 <= offload <= total):
        kinds = {0: "a UNet, whose levels are offloaded all or none",
                 1: f"{total} blocks"}.get(len(keys), "two kinds of block, whose "
                                                      "partial offloading is not planned")
        raise ConfigError(f"--offload-blocks: {offload} for {name}, which has {kinds}")
    offload = total * 16 // 60 if offload is None else offload
    out: list[tuple[str, MemoryPlan | None]] = []
    for sc in scenarios(total, offload):
        if labels is not None and sc.label not in labels:
            continue
        args = (resolution, rank, batch, frames)
        if "offload_blocks" in sc.memory:
            if not keys:  # a UNet: its levels do not repeat, offloading is all or none
                continue
            if len(keys) != 1:
                out.append((sc.label, None))
                continue
            # variables: resident blocks, offloaded blocks
            # from 2 offloaded blocks on, the one in use and the one prefetched are
            # all that is ever loaded at once; with few resident blocks the peak comes
            # while the offloaded ones run (and does not grow with the resident ones),
            # so the fit starts at _RESIDENT resident blocks
            r0 = _RESIDENT
            pts = [([r0, 2], _plan_at(name, host, sc, {keys[0]: r0 + 2}, 2, *args)),
                   ([r0 + 1, 2], _plan_at(name, host, sc, {keys[0]: r0 + 3}, 2, *args)),
                   ([r0, 3], _plan_at(name, host, sc, {keys[0]: r0 + 3}, 3, *args))]
            out.append((sc.label, _affine(pts, [total - offload, offload])))
            continue
        base = {k: 2 for k in keys}
        pts = [([2] * len(keys), _plan_at(name, host, sc, base, None, *args))]
        for i, k in enumerate(keys):
            x = [2] * len(keys)
            x[i] = 3
            pts.append((x, _plan_at(name, host, sc, {**base, k: 3}, None, *args)))
        out.append((sc.label, _affine(pts, real)))
    return out


def format_scenarios(name: str, rows: list[tuple[str, MemoryPlan | None]],
                     resolution: int | tuple[int, int] | None, rank: int, batch: int,
                     frames: int | None = None) -> str:
    rec = record(name)
    params = sum(p.numel() for p in real_model(name).parameters())
    shape = latent_shape(name, resolution, frames)
    factor = int(rec["vae_factor"])
    size = f"{shape[-2] * factor}×{shape[-1] * factor}"
    if len(shape) == 4:
        clip = int(rec["frames"]) if frames is None else frames
        size = f"{clip} frames of {size} (latent {shape})"
    lines = [f"{name} ({rec['class']}, {params / 1e9:.2f} B parameters) at {size}, "
             f"batch {batch}, LoRA rank {rank}, bf16, AdamW"]
    experts = int(rec.get("experts", 1))
    if experts > 1:
        lines.append(f"  the pipeline holds {experts} experts of this size; planned: one "
                     f"(model.expert: {rec.get('model', {}).get('expert')}); training "
                     f"them together (model.expert: both) holds {experts}× the weights, "
                     f"adapters and optimizer states")
    lines.append(f"  {'set-up':<58}{'peak GiB':>10}{'weights GiB':>13}"
                 f"{'activations GiB':>17}")
    for label, p in rows:
        if p is None:
            lines.append(f"  {label:<58}{'n/a (two kinds of block)':>40}")
            continue
        lines.append(f"  {label:<58}{p.peak / 1024 / MiB:>10.1f}"
                     f"{p.weights_device / 1024 / MiB:>13.1f}"
                     f"{p.activations / 1024 / MiB:>17.1f}")
    return "\n".join(lines)
