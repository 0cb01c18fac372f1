"""The original (LDM) module names of a diffusers ``UNet2DConditionModel``.

Stability's checkpoints, ComfyUI (``diffusion_model.input_blocks.1.1.proj_in``), A1111's
compvis names and sd-scripts' SDXL files (``lora_unet_input_blocks_4_1_...``) name a
UNet's layers ``input_blocks`` / ``middle_block`` / ``output_blocks``; diffusers names
them ``down_blocks`` / ``mid_block`` / ``up_blocks``.

The map is not typed out per model: the block layout of the model itself (its config's
``layers_per_block`` and which blocks have attention and resamplers) gives every
original name, and diffusers' own single-file converter (the one ``from_single_file``
reads these checkpoints with) is then run on placeholder tensors under those names: a
name enters the map only where the converter puts it back on the model's own module.
One map per config (cached).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Collection, Mapping
from functools import lru_cache
from typing import Any

import torch
from torch import nn

#: Layout names a UNet's module map is offered under (``ExporterSpec.layouts``).
LDM = "ldm"   # the original names: ComfyUI, A1111/Forge, Stability's checkpoints
SAI = "sai"   # the same names, in the SDXL files sd-scripts writes (SDXL only)
SDXL_DOWN = ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D")
SDXL_UP = ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D")

_RESNET = (("norm1", "in_layers.0"), ("conv1", "in_layers.2"),
           ("time_emb_proj", "emb_layers.1"), ("norm2", "out_layers.0"),
           ("conv2", "out_layers.3"), ("conv_shortcut", "skip_connection"))
_TOP = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
        "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
        "class_embedding.linear_1": "label_emb.0.0",
        "class_embedding.linear_2": "label_emb.0.2",
        "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}
_PREFIX = "model.diffusion_model."
#: a UNet's layers outside its down, mid and up blocks (the embeddings, the first and
#: last convolutions, the output norm), in diffusers' and the original names
TOP_LEVEL = frozenset(_TOP) | frozenset(_TOP.values())
#: first parts of the names of a UNet's blocks, in diffusers' and the original layout
BLOCK_ROOTS = frozenset({"down_blocks", "mid_block", "up_blocks", "input_blocks",
                         "middle_block", "output_blocks"})


def is_unet(module: nn.Module) -> bool:
    """Whether ``module`` is a diffusers UNet2DConditionModel (or has its layout)."""
    config = getattr(module, "config", None)
    return (config is not None and "down_block_types" in config
            and "layers_per_block" in config and hasattr(module, "down_blocks"))


def _resnet(rest: str) -> str:
    for new, old in _RESNET:
        if rest == new or rest.startswith(new + "."):
            return old + rest[len(new):]
    return rest


def _candidate(path: str, per_block: list[int], up_attn: set[int]) -> str | None:
    """The original name the block layout gives a module path (``None``: no rule)."""
    for new, old in _TOP.items():
        if path == new or path.startswith(new + "."):
            return old + path[len(new):]
    parts = path.split(".")
    if parts[0] == "down_blocks" and len(parts) >= 4:
        i, kind, j = int(parts[1]), parts[2], int(parts[3])
        rest = ".".join(parts[4:])
        first = 1 + sum(n + 1 for n in per_block[:i])
        if kind == "resnets":
            return f"input_blocks.{first + j}.0.{_resnet(rest)}"
        if kind == "attentions":
            return f"input_blocks.{first + j}.1.{rest}"
        if kind == "downsamplers":  # downsamplers.0.conv
            return f"input_blocks.{first + per_block[i]}.0.op"
    if parts[0] == "mid_block" and len(parts) >= 3:
        kind, j, rest = parts[1], int(parts[2]), ".".join(parts[3:])
        if kind == "resnets":
            return f"middle_block.{2 * j}.{_resnet(rest)}"
        if kind == "attentions":
            return f"middle_block.{2 * j + 1}.{rest}"
    if parts[0] == "up_blocks" and len(parts) >= 4:
        i, kind, j = int(parts[1]), parts[2], int(parts[3])
        rest = ".".join(parts[4:])
        ups = [n + 1 for n in reversed(per_block)]
        first = sum(ups[:i])
        if kind == "resnets":
            return f"output_blocks.{first + j}.0.{_resnet(rest)}"
        if kind == "attentions":
            return f"output_blocks.{first + j}.1.{rest}"
        if kind == "upsamplers":  # upsamplers.0.conv: after the last resnet (+ attention)
            return f"output_blocks.{first + ups[i] - 1}.{2 if i in up_attn else 1}.conv"
    return None


def _strip(name: str) -> str:
    return name.rsplit(".", 1)[0]


@lru_cache(maxsize=16)
def _map_for(config_json: str, weights: tuple[str, ...]) -> tuple[tuple[str, str], ...]:
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    config = json.loads(config_json)
    layers = config["layers_per_block"]
    n_blocks = len(config["down_block_types"])
    per_block = [int(x) for x in layers] if isinstance(layers, list) else [int(layers)] * n_blocks
    up_attn = {i for i, name in enumerate(config["up_block_types"]) if "Attn" in name}
    candidates: dict[str, str] = {}
    for module in weights:
        old = _candidate(module, per_block, up_attn)
        if old is not None:
            candidates[f"{_PREFIX}{old}.weight"] = module
            candidates[f"{_PREFIX}{old}.bias"] = module  # the converter moves op/conv biases
    markers = {key: torch.tensor([float(i)]) for i, key in enumerate(candidates)}
    # the converter reads one ``layers_per_block`` for every block
    conv_config = dict(config, layers_per_block=per_block[0])
    level = logging.getLogger("diffusers").level
    logging.getLogger("diffusers").setLevel(logging.ERROR)
    try:
        converted = convert_ldm_unet_checkpoint(dict(markers), conv_config)
    finally:
        logging.getLogger("diffusers").setLevel(level)
    names = list(candidates)
    pairs: dict[str, str] = {}
    for key, value in converted.items():
        if value is None or not key.endswith(".weight"):
            continue
        ldm_key = names[int(value.item())]
        module = _strip(key)
        if candidates[ldm_key] == module:
            pairs[module] = _strip(ldm_key[len(_PREFIX):])
    return tuple(sorted(pairs.items()))


def ldm_names(unet: nn.Module) -> dict[str, str]:
    """``{diffusers module path: original module path}`` for every module of ``unet``
    that holds a weight (Linear, Conv, norms), both sides without ``.weight``; empty
    when ``unet`` is not a UNet2DConditionModel or the block layout is irregular."""
    if not is_unet(unet):
        return {}
    config: Mapping[str, Any] = unet.config  # type: ignore[assignment]
    layers = config["layers_per_block"]
    if isinstance(layers, (list, tuple)) and len(set(layers)) > 1:
        return {}  # the converter (and the original layout) has one count per model
    weights = tuple(sorted(name for name, mod in unet.named_modules()
                           if isinstance(getattr(mod, "weight", None), torch.Tensor)))
    text = json.dumps({k: v for k, v in dict(config).items() if not k.startswith("_")},
                      sort_keys=True, default=str)
    return dict(_map_for(text, weights))


def unet_layouts(unet: nn.Module) -> dict[str, dict[str, str]]:
    """The other layouts a UNet's module paths are known under: ``ldm`` always (when the
    map is complete), and ``sai`` for a UNet with SDXL's block layout and ``text_time``
    conditioning, the names sd-scripts' SDXL files use."""
    names = ldm_names(unet)
    if not names:
        return {}
    out = {LDM: names}
    config = getattr(unet, "config", {})
    # sd-scripts' SDXL UNet has SDXL's block layout built in; a UNet laid out otherwise
    # cannot come from it, and readers of SAI names (diffusers' among them) assume it
    if (config.get("addition_embed_type") == "text_time"
            and tuple(config.get("down_block_types", ())) == SDXL_DOWN
            and tuple(config.get("up_block_types", ())) == SDXL_UP):
        out[SAI] = names
    return out




# -- which family a file's module names come from ---------------------------------------

#: Published UNet configs, the parts that decide the module names (sizes do not).
_SD1_CONFIG = dict(layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
                   down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                   up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
                   cross_attention_dim=768, attention_head_dim=8)
_SDXL_CONFIG = dict(layers_per_block=2, block_out_channels=(320, 640, 1280),
                    down_block_types=SDXL_DOWN, up_block_types=SDXL_UP,
                    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20),
                    cross_attention_dim=2048, use_linear_projection=True,
                    addition_embed_type="text_time", addition_time_embed_dim=256,
                    projection_class_embeddings_input_dim=2816)
#: name prefixes of the UNet's layers in the key formats (compared without them)
_PREFIXES = ("lora_unet_", "diffusion_model_", "model_diffusion_model_", "unet_")


def flat_name(name: str) -> str:
    """A module name in any key format and layout, prefix dropped, ``.`` as ``_``."""
    flat = name.replace(".", "_")
    for prefix in _PREFIXES:
        if flat.startswith(prefix):
            return flat[len(prefix):]
    return flat


@lru_cache(maxsize=2)
def reference_names(which: str) -> frozenset[str]:
    """Every module name (diffusers and original layout, flattened) of the full-size
    SD1.x/2.x (``sd15``) or SDXL (``sdxl``) UNet, built on the meta device."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet: Any = UNet2DConditionModel(**(_SD1_CONFIG if which == "sd15" else _SDXL_CONFIG))
    names = ldm_names(unet)
    return frozenset({flat_name(n) for pair in names.items() for n in pair})


def unet_family_of(names: Collection[str]) -> str | None:
    """``sd15`` (SD1.x/2.x) or ``sdxl`` when most of ``names`` are that UNet's layers
    and fewer are the other's; ``None`` otherwise."""
    flat = {flat_name(n) for n in names}
    if not flat:
        return None
    scores = {which: len(flat & reference_names(which)) for which in ("sd15", "sdxl")}
    best = max(scores, key=lambda k: scores[k])
    other = min(scores, key=lambda k: scores[k])
    if scores[best] * 2 < len(flat) or scores[best] == scores[other]:
        return None
    return best


def unet_looks_like(names: Collection[str]) -> str | None:
    """A few words on which UNet family ``names`` (modules a model lacks) belong to."""
    found = unet_family_of(names)
    return {"sd15": "an SD1.x/2.x UNet", "sdxl": "an SDXL UNet"}.get(found or "")


__all__ = ["BLOCK_ROOTS", "LDM", "SAI", "TOP_LEVEL", "flat_name", "is_unet", "ldm_names",
           "reference_names", "unet_family_of", "unet_layouts", "unet_looks_like"]
