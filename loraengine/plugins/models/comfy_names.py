"""ComfyUI's own names for the layers of the transformer families whose ComfyUI model is
laid out as the original checkpoint (FLUX.1 and Chroma: ``double_blocks`` /
``single_blocks``; SD3: ``joint_blocks``; Lumina 2: ``layers.N.attention.qkv``; and the
released Flux.2 and Z-Image checkpoints' names, which later ComfyUI models load).

ComfyUI's trainer (TrainLoraNode/SaveLoRA) writes ``diffusion_model.<its name>`` for
every layer it trains, and its loader always reads those names. Where ComfyUI's model
fuses layers that diffusers keeps apart (q/k/v into one ``qkv``; FLUX.1's single-block
q/k/v and MLP input into ``linear1``), one diffusers layer is a band of rows of the
fused weight; where it stores (shift, scale) and diffusers (scale, shift), its rows are
the two halves swapped. A layout name carries that, after ``#``:

- ``double_blocks.0.img_attn.qkv#64,32,160@transformer_blocks.0.attn.to_k``: rows 64–95
  of a 160-row weight (and, after ``@``, the diffusers layer);
- ``final_layer.adaLN_modulation.1#swap@norm_out.linear``: the same weight, halves
  swapped (and the diffusers layer).

The ``comfyui`` key format (``exporters.PrefixedFormat``) fuses such modules into one
on writing (``fuse``) and splits a fused module back on reading (``split``), exactly
for the algorithms whose ΔW can be stacked by rows (LoRA, LoHa; reading also LoKr on
whole blocks of its large factor and full ``diff``/``diff_b``). Other algorithms on a
fused layer are written under the diffusers layer's own name, which ComfyUI's model
does not have: the exporter's limits say so before training. Qwen-Image and HiDream need none of
this: ComfyUI's models of them use diffusers' own names.

The video families (ComfyUI 0.8.0 and later): Wan's original names (``wan_keys``);
LTX-2's original names, diffusers' but for the patchify projections, the timestep
embedders and the q/k norms; HunyuanVideo 1.5 laid out as FLUX.1's double blocks, with
q/k/v fused in the blocks and in its text refiner and the final layer's halves swapped.

The tables are facts of the original checkpoints (which diffusers' single-file
converters read, and ComfyUI's ``flux_to_diffusers``/``mmdit_to_diffusers`` maps name);
``tests/fixtures/interop/make_comfyui_transformer_fixtures.py`` checks them against
ComfyUI's own model and loader (ComfyUI 0.8.0; Flux.2's and Z-Image's also against
diffusers' single-file converters), and ``make_comfyui_video_fixtures.py`` the video
families' against ComfyUI 0.8.0's.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Collection, Mapping

import torch
from torch import nn

from loraengine.core.errors import DataError

#: the layout these names are offered as (``ModelFamilySpec.layouts``)
LAYOUT = "comfyui"
#: the same names as sd-scripts' own FLUX.1 and SD3 models have them (its
#: ``networks/lora_flux.py`` / ``lora_sd3.py`` write ``lora_unet_`` + these, q/k/v fused)
SDSCRIPTS = "sd-scripts"
SDSCRIPTS_CLASSES = frozenset({"FluxTransformer2DModel", "SD3Transformer2DModel"})
SWAP = "swap"

# -- the names -----------------------------------------------------------------------

_FLUX_DOUBLE = {"attn.to_out.0": "img_attn.proj", "attn.to_add_out": "txt_attn.proj",
                "norm1.linear": "img_mod.lin", "norm1_context.linear": "txt_mod.lin",
                "ff.net.0.proj": "img_mlp.0", "ff.net.2": "img_mlp.2",
                "ff_context.net.0.proj": "txt_mlp.0", "ff_context.net.2": "txt_mlp.2",
                # q/k RMSNorms: ComfyUI's weight is ``<module>.scale``, which its loader
                # takes as the name of a module (``<name>.diff``)
                "attn.norm_q": "img_attn.norm.query_norm.scale",
                "attn.norm_k": "img_attn.norm.key_norm.scale",
                "attn.norm_added_q": "txt_attn.norm.query_norm.scale",
                "attn.norm_added_k": "txt_attn.norm.key_norm.scale"}
_FLUX_DOUBLE_FUSED = {"img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
                      "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj",
                                       "attn.add_v_proj")}
_FLUX_SINGLE = {"norm.linear": "modulation.lin", "proj_out": "linear2",
                "attn.norm_q": "norm.query_norm.scale", "attn.norm_k": "norm.key_norm.scale"}
_FLUX_SINGLE_FUSED = {"linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")}
_FLUX_TOP = {"x_embedder": "img_in", "context_embedder": "txt_in",
             "proj_out": "final_layer.linear",
             "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
             "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
             "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
             "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
             "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
             "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
             # Chroma's modulation approximator
             "distilled_guidance_layer.in_proj": "distilled_guidance_layer.in_proj",
             "distilled_guidance_layer.out_proj": "distilled_guidance_layer.out_proj"}
_FLUX_TOP_SWAPPED = {"norm_out.linear": "final_layer.adaLN_modulation.1"}
_CHROMA_LAYER = re.compile(r"^distilled_guidance_layer\.layers\.(\d+)\.linear_([12])$")

#: SD3's joint block i: diffusers module -> original (MMDiT) module; ``SD3_FUSED``: the
#: q/k/v projections it fuses into one ``qkv``; ``SD3_TOP``: the modules outside the blocks
SD3_BLOCK = {"attn.to_out.0": "x_block.attn.proj", "attn.to_add_out": "context_block.attn.proj",
             "attn2.to_out.0": "x_block.attn2.proj",
             "norm1.linear": "x_block.adaLN_modulation.1",
             "norm1_context.linear": "context_block.adaLN_modulation.1",
             "ff.net.0.proj": "x_block.mlp.fc1", "ff.net.2": "x_block.mlp.fc2",
             "ff_context.net.0.proj": "context_block.mlp.fc1",
             "ff_context.net.2": "context_block.mlp.fc2"}
SD3_FUSED = {"x_block.attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
             "context_block.attn.qkv": ("attn.add_q_proj", "attn.add_k_proj",
                                        "attn.add_v_proj"),
             "x_block.attn2.qkv": ("attn2.to_q", "attn2.to_k", "attn2.to_v")}
SD3_TOP = {"pos_embed.proj": "x_embedder.proj", "context_embedder": "context_embedder",
           "time_text_embed.timestep_embedder.linear_1": "t_embedder.mlp.0",
           "time_text_embed.timestep_embedder.linear_2": "t_embedder.mlp.2",
           "time_text_embed.text_embedder.linear_1": "y_embedder.mlp.0",
           "time_text_embed.text_embedder.linear_2": "y_embedder.mlp.2",
           "proj_out": "final_layer.linear"}

_LUMINA_BLOCK = {"attn.to_out.0": "attention.out", "feed_forward.linear_1": "feed_forward.w1",
                 "feed_forward.linear_2": "feed_forward.w2",
                 "feed_forward.linear_3": "feed_forward.w3",
                 "norm1.linear": "adaLN_modulation.1"}
#: the norms ComfyUI's trainer also trains (a ``diff`` each); a context-refiner block
#: has no modulation, so its first norm is ``norm1`` itself in diffusers
_LUMINA_NORMS = {"norm1.norm": "attention_norm1", "norm1": "attention_norm1",
                 "norm2": "attention_norm2", "ffn_norm1": "ffn_norm1",
                 "ffn_norm2": "ffn_norm2", "attn.norm_q": "attention.q_norm",
                 "attn.norm_k": "attention.k_norm"}
_LUMINA_FUSED = {"attention.qkv": ("attn.to_q", "attn.to_k", "attn.to_v")}
_LUMINA_TOP = {"x_embedder": "x_embedder",
               "time_caption_embed.caption_embedder.0": "cap_embedder.0",
               "time_caption_embed.caption_embedder.1": "cap_embedder.1",
               "time_caption_embed.timestep_embedder.linear_1": "t_embedder.mlp.0",
               "time_caption_embed.timestep_embedder.linear_2": "t_embedder.mlp.2",
               "norm_out.linear_1": "final_layer.adaLN_modulation.1",
               "norm_out.linear_2": "final_layer.linear"}


_FLUX2_DOUBLE = {"attn.to_out.0": "img_attn.proj", "attn.to_add_out": "txt_attn.proj",
                 "ff.linear_in": "img_mlp.0", "ff.linear_out": "img_mlp.2",
                 "ff_context.linear_in": "txt_mlp.0", "ff_context.linear_out": "txt_mlp.2"}
_FLUX2_SINGLE = {"attn.to_qkv_mlp_proj": "linear1", "attn.to_out": "linear2"}
_FLUX2_TOP = {"x_embedder": "img_in", "context_embedder": "txt_in",
              "proj_out": "final_layer.linear",
              "time_guidance_embed.timestep_embedder.linear_1": "time_in.in_layer",
              "time_guidance_embed.timestep_embedder.linear_2": "time_in.out_layer",
              "time_guidance_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
              "time_guidance_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
              "double_stream_modulation_img.linear": "double_stream_modulation_img.lin",
              "double_stream_modulation_txt.linear": "double_stream_modulation_txt.lin",
              "single_stream_modulation.linear": "single_stream_modulation.lin"}

#: ComfyUI's Z-Image (its NextDiT, ``comfy.utils.z_image_to_diffusers``) also names the
#: q/k norms its trainer trains (a ``diff`` each) as Lumina 2 does
_ZIMAGE_BLOCK = {"attention.to_out.0": "attention.out", "attention.norm_q": "attention.q_norm",
                 "attention.norm_k": "attention.k_norm"}
_ZIMAGE_FUSED = {"attention.qkv": ("attention.to_q", "attention.to_k", "attention.to_v")}

#: HunyuanVideo 1.5's double block i (``double_blocks.i``, laid out as FLUX.1's, with
#: q/k/v fused) and its text refiner block i (``txt_in.individual_token_refiner.blocks.i``)
_HY15_DOUBLE = {"attn.to_out.0": "img_attn.proj", "attn.to_add_out": "txt_attn.proj",
                "norm1.linear": "img_mod.lin", "norm1_context.linear": "txt_mod.lin",
                "ff.net.0.proj": "img_mlp.0", "ff.net.2": "img_mlp.2",
                "ff_context.net.0.proj": "txt_mlp.0", "ff_context.net.2": "txt_mlp.2"}
_HY15_REFINER = {"attn.to_out.0": "self_attn.proj", "ff.net.0.proj": "mlp.0",
                 "ff.net.2": "mlp.2", "norm_out.linear": "adaLN_modulation.1",
                 "norm1": "norm1", "norm2": "norm2"}
_HY15_REFINER_FUSED = {"self_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v")}
_HY15_TOP = {"x_embedder.proj": "img_in.proj", "proj_out": "final_layer.linear",
             "time_embed.timestep_embedder.linear_1": "time_in.in_layer",
             "time_embed.timestep_embedder.linear_2": "time_in.out_layer",
             "context_embedder.proj_in": "txt_in.input_embedder",
             "context_embedder.time_text_embed.timestep_embedder.linear_1":
                 "txt_in.t_embedder.in_layer",
             "context_embedder.time_text_embed.timestep_embedder.linear_2":
                 "txt_in.t_embedder.out_layer",
             "context_embedder.time_text_embed.text_embedder.linear_1":
                 "txt_in.c_embedder.in_layer",
             "context_embedder.time_text_embed.text_embedder.linear_2":
                 "txt_in.c_embedder.out_layer",
             "context_embedder_2.norm": "byt5_in.layernorm",
             "context_embedder_2.linear_1": "byt5_in.fc1",
             "context_embedder_2.linear_2": "byt5_in.fc2",
             "context_embedder_2.linear_3": "byt5_in.fc3",
             "image_embedder.norm_in": "vision_in.proj.0",
             "image_embedder.linear_1": "vision_in.proj.1",
             "image_embedder.linear_2": "vision_in.proj.3",
             "image_embedder.norm_out": "vision_in.proj.4",
             "cond_type_embed": "cond_type_embedding"}

#: LTX-2: diffusers keeps the original names but for these (whole path prefixes, and
#: the q/k norms of every attention)
_LTX2_PREFIXES = (("audio_proj_in", "audio_patchify_proj"), ("proj_in", "patchify_proj"),
                  ("audio_time_embed.", "audio_adaln_single."),
                  ("time_embed.", "adaln_single."),
                  ("av_cross_attn_video_scale_shift.", "av_ca_video_scale_shift_adaln_single."),
                  ("av_cross_attn_video_a2v_gate.", "av_ca_a2v_gate_adaln_single."),
                  ("av_cross_attn_audio_scale_shift.", "av_ca_audio_scale_shift_adaln_single."),
                  ("av_cross_attn_audio_v2a_gate.", "av_ca_v2a_gate_adaln_single."))
_LTX2_NORMS = ((".norm_q", ".q_norm"), (".norm_k", ".k_norm"))


#: a diffusers layer of Z-Image's fused q/k/v: ComfyUI's Z-Image (and Lumina 2) model
#: also reads it by that name (``diffusion_model.<path>``, its ``z_image_to_diffusers``
#: map), onto its band of ``attention.qkv``
_ZIMAGE_PART = re.compile(r"(^|\.)attention\.to_[qkv]$")


def read_by_own_name(name: str) -> bool:
    """Whether ComfyUI's loader reads a band's module (a layout name with a band) under
    its own diffusers path, as the ``comfyui`` format writes a module that does not fuse
    (LoKr, ...): Z-Image's q/k/v (checked with ComfyUI 0.8.0)."""
    return isinstance(parse(name)[1], tuple) and bool(_ZIMAGE_PART.search(own_path(name)))


def _out(model: nn.Module, path: str) -> int | None:
    try:
        weight = getattr(model.get_submodule(path), "weight", None)
    except AttributeError:
        return None
    return int(weight.shape[0]) if isinstance(weight, torch.Tensor) else None


def _blocks(model: nn.Module, container: str) -> int:
    blocks = getattr(model, container, None)
    return len(blocks) if isinstance(blocks, nn.ModuleList) else 0


def _add_block(names: dict[str, str], model: nn.Module, here: str, there: str,
               plain: Mapping[str, str], fused: Mapping[str, tuple[str, ...]]) -> None:
    for ours, theirs in plain.items():
        if _out(model, f"{here}.{ours}") is not None:
            names[f"{here}.{ours}"] = f"{there}.{theirs}"
    for theirs, parts in fused.items():
        sizes = [_out(model, f"{here}.{part}") for part in parts]
        if any(s is None for s in sizes):
            continue
        total, offset = sum(s for s in sizes if s is not None), 0
        for part, size in zip(parts, sizes, strict=True):
            names[f"{here}.{part}"] = f"{there}.{theirs}#{offset},{size},{total}@{here}.{part}"
            offset += size or 0


def _add_top(names: dict[str, str], model: nn.Module, table: Mapping[str, str],
             suffix: str = "") -> None:
    for ours, theirs in table.items():
        if _out(model, ours) is not None:
            names[ours] = theirs + suffix + (f"@{ours}" if suffix == "#" + SWAP else "")


def _add_swapped(names: dict[str, str], model: nn.Module, table: Mapping[str, str]) -> None:
    """Top-level layers stored with their row halves swapped: ``name#swap@path``."""
    for ours, theirs in table.items():
        if _out(model, ours) is not None:
            names[ours] = f"{theirs}#{SWAP}@{ours}"


def flux_names(model: nn.Module) -> dict[str, str]:
    """FLUX.1 and Chroma (``FluxTransformer2DModel`` / ``ChromaTransformer2DModel``)."""
    names: dict[str, str] = {}
    for i in range(_blocks(model, "transformer_blocks")):
        _add_block(names, model, f"transformer_blocks.{i}", f"double_blocks.{i}",
                   _FLUX_DOUBLE, _FLUX_DOUBLE_FUSED)
    for i in range(_blocks(model, "single_transformer_blocks")):
        _add_block(names, model, f"single_transformer_blocks.{i}", f"single_blocks.{i}",
                   _FLUX_SINGLE, _FLUX_SINGLE_FUSED)
    _add_top(names, model, _FLUX_TOP)
    _add_swapped(names, model, _FLUX_TOP_SWAPPED)
    for path, module in model.named_modules():
        m = _CHROMA_LAYER.match(path)
        if m and isinstance(module, nn.Linear):
            which = "in_layer" if m.group(2) == "1" else "out_layer"
            names[path] = f"distilled_guidance_layer.layers.{m.group(1)}.{which}"
    return names


def sd3_names(model: nn.Module) -> dict[str, str]:
    """SD3 / 3.5 (``SD3Transformer2DModel``): the last joint block's context half only
    modulates its input, and stores (shift, scale) as the final layer does."""
    names: dict[str, str] = {}
    count = _blocks(model, "transformer_blocks")
    for i in range(count):
        _add_block(names, model, f"transformer_blocks.{i}", f"joint_blocks.{i}",
                   SD3_BLOCK, SD3_FUSED)
    last = f"transformer_blocks.{count - 1}.norm1_context.linear"
    if last in names:
        names[last] += f"#{SWAP}@{last}"
    _add_top(names, model, SD3_TOP)
    _add_swapped(names, model, {"norm_out.linear": "final_layer.adaLN_modulation.1"})
    return names


def lumina2_names(model: nn.Module) -> dict[str, str]:
    """Lumina-Image 2.0 (``Lumina2Transformer2DModel``, ComfyUI's NextDiT)."""
    names: dict[str, str] = {}
    for container in ("noise_refiner", "context_refiner", "layers"):
        for i in range(_blocks(model, container)):
            here = f"{container}.{i}"
            _add_block(names, model, here, here, _LUMINA_BLOCK, _LUMINA_FUSED)
            for ours, theirs in _LUMINA_NORMS.items():
                if _out(model, f"{here}.{ours}") is not None and \
                        f"{here}.{ours}" not in names:
                    names[f"{here}.{ours}"] = f"{here}.{theirs}"
    _add_top(names, model, _LUMINA_TOP)
    return names


def flux2_names(model: nn.Module) -> dict[str, str]:
    """Flux.2 (``Flux2Transformer2DModel``): the released checkpoint's names, which
    diffusers' single-file converter reads (its single blocks are fused in diffusers
    too)."""
    names: dict[str, str] = {}
    for i in range(_blocks(model, "transformer_blocks")):
        _add_block(names, model, f"transformer_blocks.{i}", f"double_blocks.{i}",
                   _FLUX2_DOUBLE, _FLUX_DOUBLE_FUSED)
    for i in range(_blocks(model, "single_transformer_blocks")):
        _add_block(names, model, f"single_transformer_blocks.{i}", f"single_blocks.{i}",
                   _FLUX2_SINGLE, {})
    _add_top(names, model, _FLUX2_TOP)
    _add_swapped(names, model, _FLUX_TOP_SWAPPED)
    return names


_FLUX2_IN_BLOCK = re.compile(r"^(transformer_blocks|single_transformer_blocks)\.(\d+)\.(.+)$")


def flux2_native(path: str, rows: int) -> str | None:
    """The name ``flux2_names`` gives the Flux.2 layer ``path`` (diffusers' name),
    from the path alone; ``rows``: the layer's output rows, which place a q/k/v
    projection in its band of the fused ``qkv`` (Flux.2's q, k and v have the same
    rows). None where the released checkpoint has no name for the path."""
    found = _FLUX2_IN_BLOCK.match(path)
    if found is None:
        if path in _FLUX_TOP_SWAPPED:
            return f"{_FLUX_TOP_SWAPPED[path]}#{SWAP}"
        return _FLUX2_TOP.get(path)
    container, i, rest = found.groups()
    if container == "single_transformer_blocks":
        theirs = _FLUX2_SINGLE.get(rest)
        return f"single_blocks.{i}.{theirs}" if theirs else None
    if rest in _FLUX2_DOUBLE:
        return f"double_blocks.{i}.{_FLUX2_DOUBLE[rest]}"
    for theirs, parts in _FLUX_DOUBLE_FUSED.items():
        if rest in parts:
            offset = parts.index(rest) * rows
            return f"double_blocks.{i}.{theirs}#{offset},{rows},{len(parts) * rows}@{path}"
    return None


_LUMINA_IN_BLOCK = re.compile(r"^(noise_refiner|context_refiner|layers)\.(\d+)\.(.+)$")
#: the q/k/v rows diffusers 0.42.1's Lumina 2 LoRA converter splits a ``qkv`` LoRA by
#: (``_convert_non_diffusers_lumina2_lora_to_diffusers``: the released model's, 24
#: query and 8 key/value heads of 96)
LUMINA2_QKV_ROWS = (2304, 768, 768)


def lumina2_native(path: str, rows: int) -> str | None:
    """The name ``lumina2_names`` gives the Lumina 2 block layer ``path`` (diffusers'
    name), from the path alone; ``rows``: its output rows. A q/k/v projection is placed
    in its band of ``attention.qkv`` only with the released model's rows
    (``LUMINA2_QKV_ROWS``), the only ones diffusers' converter splits; None there, and
    for the norms and the layers outside the blocks."""
    found = _LUMINA_IN_BLOCK.match(path)
    if found is None:
        return None
    container, i, rest = found.groups()
    here = f"{container}.{i}"
    if rest in _LUMINA_BLOCK:
        return f"{here}.{_LUMINA_BLOCK[rest]}"
    parts = _LUMINA_FUSED["attention.qkv"]
    if rest not in parts or rows != LUMINA2_QKV_ROWS[parts.index(rest)]:
        return None
    offset = sum(LUMINA2_QKV_ROWS[:parts.index(rest)])
    return f"{here}.attention.qkv#{offset},{rows},{sum(LUMINA2_QKV_ROWS)}@{path}"


def z_image_names(model: nn.Module) -> dict[str, str]:
    """Z-Image (``ZImageTransformer2DModel``): diffusers' names but the fused
    ``attention.qkv``, ``attention.out`` and the unsuffixed embedder and final layer."""
    names: dict[str, str] = {}
    for container in ("noise_refiner", "context_refiner", "layers"):
        for i in range(_blocks(model, container)):
            here = f"{container}.{i}"
            _add_block(names, model, here, here, _ZIMAGE_BLOCK, _ZIMAGE_FUSED)
    for path, module in model.named_modules():
        for ours, theirs in (("all_x_embedder.2-1", "x_embedder"),
                             ("all_final_layer.2-1", "final_layer")):
            if (path == ours or path.startswith(ours + ".")) and \
                    isinstance(getattr(module, "weight", None), torch.Tensor):
                names[path] = theirs + path[len(ours):]
    return names


def wan_names(model: nn.Module) -> dict[str, str]:
    """Wan 2.x (``WanTransformer3DModel``): the original Wan names of ``wan_keys``, so
    the ``comfyui`` format writes what the ``wan_comfyui`` one does."""
    from loraengine.plugins.models.wan_keys import to_original

    return {path: name for path, _ in model.named_modules()
            if (name := to_original(path)) is not None}


def wan_expert_names(model: nn.Module) -> dict[str, str]:
    """Wan 2.2's two experts trained together (``wan.WanExperts``): each expert's file
    names its layers without the expert's prefix, as one Wan model's (the experts have
    the same layers)."""
    expert = getattr(model, "high_noise", None)
    return wan_names(expert) if isinstance(expert, nn.Module) else {}


def hunyuan_video15_names(model: nn.Module) -> dict[str, str]:
    """HunyuanVideo 1.5 (``HunyuanVideo15Transformer3DModel``, ComfyUI's HunyuanVideo
    model): FLUX.1-style double blocks with fused ``img_attn.qkv`` / ``txt_attn.qkv``, the
    text refiner's fused ``self_attn.qkv``, and the final layer's (shift, scale)."""
    names: dict[str, str] = {}
    for i in range(_blocks(model, "transformer_blocks")):
        _add_block(names, model, f"transformer_blocks.{i}", f"double_blocks.{i}",
                   _HY15_DOUBLE, _FLUX_DOUBLE_FUSED)
    refiner = "context_embedder.token_refiner.refiner_blocks"
    blocks = getattr(getattr(getattr(model, "context_embedder", None), "token_refiner", None),
                     "refiner_blocks", None)
    for i in range(len(blocks) if isinstance(blocks, nn.ModuleList) else 0):
        _add_block(names, model, f"{refiner}.{i}", f"txt_in.individual_token_refiner.blocks.{i}",
                   _HY15_REFINER, _HY15_REFINER_FUSED)
    _add_top(names, model, _HY15_TOP)
    _add_top(names, model, {"norm_out.linear": "final_layer.adaLN_modulation.1"}, "#" + SWAP)
    return names


def ltx2_name(path: str) -> str:
    """The original (ComfyUI's) name of an LTX-2 diffusers module path."""
    for ours, theirs in _LTX2_PREFIXES:
        if path == ours.rstrip(".") or path.startswith(ours):
            path = theirs.rstrip(".") + path[len(ours.rstrip(".")):]
            break
    for ours, theirs in _LTX2_NORMS:
        if path.endswith(ours):
            path = path[:-len(ours)] + theirs
    return path


def ltx2_names(model: nn.Module) -> dict[str, str]:
    """LTX-2 (``LTX2VideoTransformer3DModel``, ComfyUI's LTXAV model): diffusers' names
    but the patchify projections, the timestep embedders and the q/k norms."""
    return {path: ltx2_name(path) for path, module in model.named_modules()
            if isinstance(getattr(module, "weight", None), torch.Tensor)
            and ltx2_name(path) != path}


#: diffusers class -> its ComfyUI names
BY_CLASS: dict[str, Callable[[nn.Module], dict[str, str]]] = {
    "FluxTransformer2DModel": flux_names, "ChromaTransformer2DModel": flux_names,
    "SD3Transformer2DModel": sd3_names, "Lumina2Transformer2DModel": lumina2_names,
    "Flux2Transformer2DModel": flux2_names, "ZImageTransformer2DModel": z_image_names,
    "WanTransformer3DModel": wan_names, "WanExperts": wan_expert_names,
    "HunyuanVideo15Transformer3DModel": hunyuan_video15_names,
    "LTX2VideoTransformer3DModel": ltx2_names}


def comfyui_layouts(model: nn.Module) -> dict[str, dict[str, str]]:
    """``ModelFamilySpec.layouts`` of these families: ``{"comfyui": {path: name}}``
    (and the same names as ``"sd-scripts"`` for FLUX.1 and SD3, whose sd-scripts models
    are the original checkpoints' too), empty for a model of another class."""
    cls = type(model).__name__
    names = BY_CLASS.get(cls)
    if names is None:
        return {}
    found = names(model)
    return {LAYOUT: found, SDSCRIPTS: dict(found)} if cls in SDSCRIPTS_CLASSES \
        else {LAYOUT: found}


def lokr_kernel_flattened(params: Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
    """A LoKr module of a 3-D convolution with its large factor as a matrix
    (``lokr_w2`` ``[b, d, kt, kh, kw]`` -> ``[b, d·kt·kh·kw]``, likewise ``lokr_w2_b``):
    ComfyUI widens the small factor for a 2-D kernel only, and would take the Kronecker
    product of a matrix and a 5-D tensor; of the matrix it is the same ΔW (rows of w2
    stay rows; each column block of w1 meets whole input channels with their kernels).
    loraengine's reader takes either shape. A Tucker core over a 3-D kernel, which
    ComfyUI's Tucker product (written for 2-D kernels) fails on, is first multiplied
    out into a whole ``lokr_w2`` (``exporters.lokr_without_tucker``, the same ΔW). Any
    other module as it is."""
    t2 = params.get("lokr_t2")
    if t2 is not None:
        if t2.ndim != 5:
            return params
        from loraengine.plugins.exporters import lokr_without_tucker

        params = lokr_without_tucker(params)
    out = dict(params)
    for key in ("lokr_w2", "lokr_w2_b"):
        t = params.get(key)
        if t is not None and t.ndim == 5:
            out[key] = t.reshape(t.shape[0], -1)
    return out


# -- one band of rows of a fused layer -----------------------------------------------

def parse(name: str) -> tuple[str, tuple[int, int, int] | str | None]:
    """``(ComfyUI module, (offset, size, total) | "swap" | None)`` of a layout name."""
    base, sep, tail = name.partition("#")
    if not sep:
        return name, None
    if tail.partition("@")[0] == SWAP:
        return base, SWAP
    offset, size, total = (int(v) for v in tail.partition("@")[0].split(","))
    return base, (offset, size, total)


def own_path(name: str) -> str:
    """The diffusers path a band's (or a swapped layer's) layout name carries (after
    ``@``)."""
    return name.partition("@")[2] or name


#: per algorithm, the tensors whose rows are the layer's output rows (OFT's ``rescale``,
#: GLoRA's ``b1``), and the ones every row shares (GLoRA's input map ``a1``/``a2``)
_ROWS = {"lora_up.weight", "hada_w1_a", "hada_w2_a", "diff", "diff_b", "dora_scale",
         "rescale", "b1.weight"}
_SHARED = {"alpha", "a1.weight", "a2.weight", "b2.weight", "on_input"}
_LORA = {"lora_down.weight", "lora_up.weight", "alpha", "dora_scale", "diff_b"}
_LOHA = {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "alpha", "dora_scale", "diff_b"}
#: a full ΔW (``full``) and bias deltas: every tensor is rows
_DIFFS = {"diff", "diff_b"}
_FULL = _DIFFS
_LOKR_W1 = ("lokr_w1", "lokr_w1_a")


def _swap(t: torch.Tensor) -> torch.Tensor:
    first, second = t.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


_LOKR = frozenset({"lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b"})


def _shape(value: object) -> tuple[int, ...]:
    shape = getattr(value, "shape", value)
    return tuple(int(n) for n in shape) if isinstance(shape, (tuple, list)) else ()


def _swap_problem(params: Mapping[str, object] | Collection[str]) -> str | None:
    """Why a module's tensors (or their shapes; with names only, the shape rules are
    not checked) cannot be written with the layer's row halves swapped, or None."""
    shapes = {k: _shape(v) for k, v in params.items()} if isinstance(params, Mapping) \
        else {k: () for k in params}
    w1 = next((k for k in _LOKR_W1 if k in shapes), None)
    if w1 is not None and shapes[w1] and shapes[w1][0] % 2:
        # one row of w1 over an even large factor: the layer's rows are w2's rows
        w2 = next((k for k in ("lokr_w2", "lokr_w2_a") if k in shapes), None)
        if not (shapes[w1][0] == 1 and w2 is not None and shapes[w2]
                and shapes[w2][0] % 2 == 0):
            return "LoKr with an odd number of rows in its small factor"
    blocks = shapes.get("oft_blocks")
    if blocks and (len(blocks) != 3 or blocks[0] % 2):
        return "oft_blocks (BOFT, or OFT with an odd block count)"
    other = set(shapes) - _LORA - _LOHA - _ROWS - _SHARED - _LOKR - {"oft_blocks"} - (
        {"weight"} if "on_input" in shapes else set())
    return ", ".join(sorted(other)) if other else None


def can_swap(params: Mapping[str, object] | Collection[str]) -> bool:
    """Whether ``swapped`` writes a module with these tensors (or shapes) exactly."""
    return _swap_problem(params) is None


swappable = can_swap


def swapped(params: Mapping[str, torch.Tensor], where: str) -> dict[str, torch.Tensor]:
    """A module's tensors for the same layer with its two row halves swapped (its own
    inverse): exact for every algorithm whose rows are rows of one tensor (LoRA, LoHa,
    full, GLoRA's ``b1``, IA3 on the outputs, OFT's ``rescale``), for LoKr when its small
    factor has an even number of rows (or one row over an even large factor), and for
    OFT when its block count is even (each block acts on its own rows: swapping the
    halves of the rows swaps the halves of the block list). BOFT's butterfly has no such
    form (``can_swap``)."""
    problem = _swap_problem(params)
    if problem is not None:
        raise DataError(f"module {where}: {problem} cannot be written with the layer's "
                        f"halves swapped (ComfyUI stores them the other way)")
    out = dict(params)
    # OFT: each block rotates its own rows, so an even count splits into the halves
    for key in (_ROWS | {"oft_blocks"}) & set(params):
        out[key] = _swap(params[key])
    w1 = next((k for k in _LOKR_W1 if k in params), None)
    if w1 is not None:
        w2 = next((k for k in ("lokr_w2", "lokr_w2_a") if k in params), None)
        if not params[w1].shape[0] % 2:
            out[w1] = _swap(params[w1])
        else:
            # one row of w1: the layer's rows are w2's rows (scaled), so swap those
            assert w2 is not None
            out[w2] = _swap(params[w2])
    if "weight" in params and "on_input" in params and not int(params["on_input"]):
        out["weight"] = _swap(params["weight"])  # IA3 scaling the outputs
    return out


def _scale(params: Mapping[str, torch.Tensor], rank: int) -> float:
    return float(params["alpha"]) / rank if "alpha" in params else 1.0


def fusable(params) -> bool:
    """Whether a module with these tensor names can be part of a fused layer
    (``fuse``): a LoRA or a LoHa (with DoRA or not), or a full ΔW / bias delta."""
    keys = set(params)
    return (keys <= _LORA and {"lora_down.weight", "lora_up.weight"} <= keys) or \
        (keys <= _LOHA and {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"} <= keys) \
        or (bool(keys) and keys <= _DIFFS)


def fuse(parts: list[tuple[tuple[int, int, int], str, Mapping[str, torch.Tensor]]],
         native: str) -> dict[str, torch.Tensor]:
    """One module of the fused layer ``native`` from its parts' modules (``(band, our
    path, tensors)``): LoRA as rank Σr with ``lora_down`` stacked and ``lora_up`` block
    diagonal, LoHa likewise for both products, a full ΔW (``diff``/``diff_b``) by rows;
    rows of a missing part stay zero. Each part's scale α/r is kept (as α = s·Σr where
    all agree, else folded into its rows)."""
    total = parts[0][0][2]
    keys = [set(p) for _, _, p in parts]
    if all(k and k <= _DIFFS for k in keys):
        return _stacked(parts, sorted(_DIFFS), total)
    if all(fusable(k) and "lora_up.weight" in k for k in keys):
        pairs = [("lora_up.weight", "lora_down.weight")]
    elif all(fusable(k) and "hada_w1_a" in k for k in keys):
        pairs = [("hada_w1_a", "hada_w1_b"), ("hada_w2_a", "hada_w2_b")]
    else:
        raise DataError(f"module {native}: ComfyUI's model fuses {len(parts)} layer(s) "
                        f"into it, and only LoRA, LoHa and full fuse exactly (use the "
                        f"diffusers exporter, or LoRA/LoHa on those layers)")
    if any("dora_scale" in k for k in keys) and (
            sum(b[1] for b, _, _ in parts) != total
            or not all("dora_scale" in k for k in keys)):
        raise DataError(f"module {native}: DoRA on only some of the layers ComfyUI fuses "
                        f"into it has no ComfyUI form")
    ranks = [int(p[pairs[0][1]].shape[0]) for _, _, p in parts]
    scales = [_scale(p, r) for (_, _, p), r in zip(parts, ranks, strict=True)]
    rank = sum(ranks)
    common = all(s == scales[0] for s in scales)
    ref = parts[0][2][pairs[0][0]]
    out = {}
    for up_key, down_key in pairs:
        up = torch.zeros(total, rank, *ref.shape[2:], dtype=ref.dtype)
        downs, col = [], 0
        for ((offset, size, _), _, p), r, s in zip(parts, ranks, scales, strict=True):
            block = p[up_key] if common or up_key == "hada_w2_a" else \
                (p[up_key].float() * s).to(ref.dtype)
            up[offset:offset + size, col:col + r] = block
            downs.append(p[down_key])
            col += r
        out[up_key], out[down_key] = up, torch.cat(downs, dim=0)
    out["alpha"] = torch.tensor(scales[0] * rank if common else float(rank))
    out.update(_stacked(parts, ["diff_b", "dora_scale"], total))
    return out


def _stacked(parts: list[tuple[tuple[int, int, int], str, Mapping[str, torch.Tensor]]],
             names: list[str], total: int) -> dict[str, torch.Tensor]:
    """The tensors ``names`` of the parts stacked by rows into the fused layer's
    ``total`` rows (zero where a part has none)."""
    out: dict[str, torch.Tensor] = {}
    for key in names:
        if any(key in p for _, _, p in parts):
            ex = next(p[key] for _, _, p in parts if key in p)
            fused = torch.zeros(total, *ex.shape[1:], dtype=ex.dtype)
            for (offset, size, _), _, p in parts:
                if key in p:
                    fused[offset:offset + size] = p[key]
            out[key] = fused
    return out


def _used(columns: torch.Tensor) -> torch.Tensor:
    """Indices of the columns of ``columns`` (rows × rank) that are not all zero."""
    return (columns.reshape(columns.shape[0], columns.shape[1], -1) != 0).any(dim=2) \
        .any(dim=0).nonzero().flatten()


def split(params: Mapping[str, torch.Tensor], band: tuple[int, int, int], native: str
          ) -> dict[str, torch.Tensor] | None:
    """The module of rows ``band`` of the fused layer ``native``'s module ``params``
    (None: it has no tensor). LoRA/LoHa keep the ranks whose ``up`` columns are not
    zero on the band (all of them where none is; α scaled along, so α/r is unchanged);
    LoKr needs the band to be whole blocks of its large factor's rows."""
    offset, size, total = band
    rows = slice(offset, offset + size)
    keys = set(params)
    for key in sorted(_ROWS & keys):  # a file made for a model of other widths
        if params[key].ndim and int(params[key].shape[0]) != total:
            raise DataError(f"{native}: {key} has {int(params[key].shape[0])} rows where "
                            f"this model's fused layer has {total}")
    out: dict[str, torch.Tensor] = {}
    if {"lora_down.weight", "lora_up.weight"} <= keys and keys <= _LORA | {"diff"}:
        up, down = params["lora_up.weight"][rows], params["lora_down.weight"]
        rank = int(down.shape[0])
        used = _used(up)
        if not used.numel():  # a band still at zero (an untrained file): keep every rank
            used = torch.arange(rank)
        out["lora_up.weight"], out["lora_down.weight"] = up[:, used], down[used]
        alpha = float(params["alpha"]) if "alpha" in params else float(rank)
        out["alpha"] = torch.tensor(alpha * used.numel() / rank)
    elif {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"} <= keys and keys <= _LOHA:
        a1, a2 = params["hada_w1_a"][rows], params["hada_w2_a"][rows]
        u1, u2 = _used(a1), _used(a2)
        rank = int(params["hada_w1_b"].shape[0])
        if u1.numel() == u2.numel() and u1.numel():
            out.update(hada_w1_a=a1[:, u1], hada_w1_b=params["hada_w1_b"][u1],
                       hada_w2_a=a2[:, u2], hada_w2_b=params["hada_w2_b"][u2])
            kept = u1.numel()
        else:
            out.update(hada_w1_a=a1, hada_w1_b=params["hada_w1_b"], hada_w2_a=a2,
                       hada_w2_b=params["hada_w2_b"])
            kept = rank
        alpha = float(params["alpha"]) if "alpha" in params else float(rank)
        out["alpha"] = torch.tensor(alpha * kept / rank)
    elif any(k.startswith("lokr_") for k in keys):
        out = _lokr_rows(params, offset, size, native)
    elif "oft_blocks" in keys and keys <= {"oft_blocks", "alpha", "rescale", "diff_b"}:
        out = _oft_rows(params, offset, size, native)
    elif not keys <= {"diff", "diff_b"}:
        raise DataError(f"{native}: {', '.join(sorted(keys))} over ComfyUI's fused layer "
                        f"cannot be split into the diffusers model's layers")
    for key in ("diff", "diff_b", "dora_scale", "rescale"):
        if key in params:
            out[key] = params[key][rows]
    return out or None


def _lokr_rows(params: Mapping[str, torch.Tensor], offset: int, size: int, native: str
               ) -> dict[str, torch.Tensor]:
    """Rows ``offset``…``offset+size`` of kron(w1, w2) as a LoKr: whole blocks of w2's
    rows (those rows of w1), or rows inside one block (that row of w1, those rows of
    w2, as ComfyUI's trainer writes a LoKr whose small factor has one row)."""
    w2 = params.get("lokr_w2", params.get("lokr_w2_a"))
    block = int(w2.shape[0]) if w2 is not None and "lokr_t2" not in params else 0
    w1 = "lokr_w1" if "lokr_w1" in params else "lokr_w1_a"
    out = {k: v for k, v in params.items() if k not in ("diff_b", "dora_scale")}
    if block and not offset % block and not size % block:
        out[w1] = params[w1][offset // block:(offset + size) // block]
    elif block and offset // block == (offset + size - 1) // block:
        first = offset % block
        w2_key = "lokr_w2" if "lokr_w2" in params else "lokr_w2_a"
        out[w1] = params[w1][offset // block:offset // block + 1]
        out[w2_key] = params[w2_key][first:first + size]
    else:
        raise DataError(f"{native}: a LoKr module over ComfyUI's fused layer cannot be "
                        f"split at rows {offset}–{offset + size} (not whole blocks of "
                        f"{block} rows, nor inside one)")
    return out


def _oft_rows(params: Mapping[str, torch.Tensor], offset: int, size: int, native: str
              ) -> dict[str, torch.Tensor]:
    """Rows ``offset``…``offset+size`` of an OFT (its blocks rotate the output rows):
    the blocks of those rows, projected first onto the constraint, which bounds the norm
    of all the blocks together, and so written with constraint 0."""
    from loraengine.plugins.adapters.oft import constrained_blocks

    blocks = params["oft_blocks"]
    width = int(blocks.shape[1])
    if offset % width or size % width:
        raise DataError(f"{native}: an OFT module over ComfyUI's fused layer cannot be "
                        f"split at rows {offset}–{offset + size} (not whole blocks of "
                        f"{width} rows)")
    constraint = float(params["alpha"]) if "alpha" in params else 0.0
    # (in fp32: the projected blocks are no longer the file's bf16 values)
    kept = constrained_blocks(blocks.float(), max(constraint, 0.0))
    return {"oft_blocks": kept[offset // width:(offset + size) // width],
            "alpha": torch.tensor(0.0)}
