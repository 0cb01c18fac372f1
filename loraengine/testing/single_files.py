"""The released single-file layouts of the record families' transformers, for tests.

:func:`to_single_file` turns a diffusers transformer into the state dict its released
single ``.safetensors`` file holds (the official checkpoint's names, which ComfyUI's
``diffusion_models`` files keep): Flux.2 dev and Klein (``double_blocks`` /
``single_blocks``, fused ``qkv``, the final modulation's halves swapped), Z-Image (fused
``attention.qkv``, ``attention.out``, ``q_norm``), Wan 2.x (``self_attn.q``,
``cross_attn``, ``norm3``, ``modulation``), LTX-2 (``patchify_proj``, ``adaln_single``,
``q_norm``), FLUX.1 and Chroma (as Flux.2, with FLUX.1's fused single-block
``linear1``), Lumina 2 (``layers.N.attention.qkv``, ``attention_norm1``), and Qwen-Image
and HiDream-I1, whose files use diffusers' own names. With
``prefix="model.diffusion_model."`` it writes the names as an all-in-one checkpoint
(ComfyUI's "Save Checkpoint", LTX-2's release) puts them.

The module names come from the tables the engine already has for these layouts
(``comfy_names`` for Flux.2 and Z-Image, ``wan_keys`` for Wan); this module adds only
what those leave out (norm scales, modulation tables, LTX-2's renames). diffusers'
single-file converters are the judge: reading the result back through
``from_single_file`` gives every tensor of the model bit for bit (the tests check it).
diffusers' converters for FLUX.1, Chroma and Lumina 2 split the fused layers at the
released widths, so those layouts are checked at that size on the ``meta`` device (names
and shapes) only.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping

import torch
from torch import nn

#: families :func:`to_single_file` writes, with the diffusers class of each
SINGLE_FILE_FAMILIES: dict[str, str] = {
    "flux2": "Flux2Transformer2DModel", "qwen_image": "QwenImageTransformer2DModel",
    "z_image": "ZImageTransformer2DModel", "wan": "WanTransformer3DModel",
    "ltx2": "LTX2VideoTransformer3DModel", "hidream": "HiDreamImageTransformer2DModel",
    "flux": "FluxTransformer2DModel", "chroma": "ChromaTransformer2DModel",
    "lumina2": "Lumina2Transformer2DModel"}
#: the prefix all-in-one checkpoints put before the denoiser's names
CHECKPOINT_PREFIX = "model.diffusion_model."

Rule = tuple[re.Pattern[str], str]


def _rules(*pairs: tuple[str, str]) -> list[Rule]:
    return [(re.compile(pattern), repl) for pattern, repl in pairs]


#: tensors of Flux.2 outside ``comfy_names.flux2_names`` (its Linear layers): the
#: qk-norm scales
_FLUX2_EXTRA = _rules(
    (r"^transformer_blocks\.(\d+)\.attn\.norm_q\.weight$",
     r"double_blocks.\1.img_attn.norm.query_norm.scale"),
    (r"^transformer_blocks\.(\d+)\.attn\.norm_k\.weight$",
     r"double_blocks.\1.img_attn.norm.key_norm.scale"),
    (r"^transformer_blocks\.(\d+)\.attn\.norm_added_q\.weight$",
     r"double_blocks.\1.txt_attn.norm.query_norm.scale"),
    (r"^transformer_blocks\.(\d+)\.attn\.norm_added_k\.weight$",
     r"double_blocks.\1.txt_attn.norm.key_norm.scale"),
    (r"^single_transformer_blocks\.(\d+)\.attn\.norm_q\.weight$",
     r"single_blocks.\1.norm.query_norm.scale"),
    (r"^single_transformer_blocks\.(\d+)\.attn\.norm_k\.weight$",
     r"single_blocks.\1.norm.key_norm.scale"))
#: FLUX.1 and Chroma outside ``comfy_names.flux_names``: the qk-norm scales (as
#: Flux.2's) and Chroma's approximator norms
_FLUX_EXTRA = [*_FLUX2_EXTRA, *_rules(
    (r"^distilled_guidance_layer\.norms\.(\d+)\.weight$",
     r"distilled_guidance_layer.norms.\1.scale"))]
#: Z-Image outside ``comfy_names.z_image_names``: the qk-norms; the rest keeps its name
_Z_IMAGE_EXTRA = _rules((r"\.attention\.norm_([qk])\.weight$", r".attention.\1_norm.weight"),
                        (r"^(.*)$", r"\1"))
#: Wan outside ``wan_keys`` (its Linear layers): the attention norms, the cross-attention
#: norm (diffusers' ``norm2`` is the original ``norm3``; the original ``norm2`` has no
#: weights) and the modulation tables
_WAN_EXTRA = _rules(
    (r"^blocks\.(\d+)\.attn1\.norm_([qk])\.", r"blocks.\1.self_attn.norm_\2."),
    (r"^blocks\.(\d+)\.attn2\.norm_([qk])\.", r"blocks.\1.cross_attn.norm_\2."),
    (r"^blocks\.(\d+)\.norm2\.", r"blocks.\1.norm3."),
    (r"^blocks\.(\d+)\.scale_shift_table$", r"blocks.\1.modulation"),
    (r"^scale_shift_table$", "head.modulation"))
#: LTX-2, every tensor: the original names of its input projections, timestep
#: embeddings, audio-video cross-attention modulations and qk-norms
_LTX2 = _rules(
    (r"^(audio_)?proj_in\.", r"\1patchify_proj."),
    (r"^(audio_)?time_embed\.", r"\1adaln_single."),
    (r"^av_cross_attn_(video|audio)_scale_shift\.", r"av_ca_\1_scale_shift_adaln_single."),
    (r"^av_cross_attn_video_a2v_gate\.", "av_ca_a2v_gate_adaln_single."),
    (r"^av_cross_attn_audio_v2a_gate\.", "av_ca_v2a_gate_adaln_single."),
    (r"\.(video|audio)_a2v_cross_attn_scale_shift_table$", r".scale_shift_table_a2v_ca_\1"),
    (r"\.norm_([qk])\.weight$", r".\1_norm.weight"),
    (r"^(.*)$", r"\1"))
_SAME = _rules((r"^(.*)$", r"\1"))


def _rename(key: str, rules: list[Rule]) -> str | None:
    """``key`` after every rule that matches it, in order (``None``: none matched)."""
    hit = False
    for pattern, repl in rules:
        if pattern.search(key):
            key, hit = pattern.sub(repl, key), True
    return key if hit else None


def _apply(state: Mapping[str, torch.Tensor], names: Mapping[str, str],
           extra: list[Rule]) -> dict[str, torch.Tensor]:
    """``state`` in a layout given as module names (``comfy_names`` form: ``#swap`` for
    a weight stored with its halves swapped, ``#offset,size,total@…`` for a band of a
    fused layer) and, for the tensors of no named module, renaming rules."""
    from loraengine.plugins.models.comfy_names import SWAP, parse

    out: dict[str, torch.Tensor] = {}
    bands: dict[str, list[tuple[tuple[int, int, int], torch.Tensor]]] = {}
    for key, tensor in state.items():
        path, _, leaf = key.rpartition(".")
        if path in names:
            base, band = parse(names[path])
            if leaf == "weight" and base.endswith(".scale"):
                # a norm whose released weight is ``<module>.scale`` (comfy_names gives the
                # weight's own name)
                base, leaf = base.removesuffix(".scale"), "scale"
            if band is None:
                out[f"{base}.{leaf}"] = tensor
            elif band == SWAP:
                first, second = tensor.chunk(2, dim=0)
                out[f"{base}.{leaf}"] = torch.cat([second, first], dim=0)
            else:
                assert isinstance(band, tuple)
                bands.setdefault(f"{base}.{leaf}", []).append((band, tensor))
            continue
        new = _rename(key, extra)
        if new is None:
            raise KeyError(f"no single-file name for {key}")
        out[new] = tensor
    for name, parts in bands.items():
        parts.sort(key=lambda p: p[0][0])
        offsets = [band[0] for band, _ in parts]
        total = parts[0][0][2]
        if offsets != [sum(b[1] for b, _ in parts[:i]) for i in range(len(parts))] or \
                sum(b[1] for b, _ in parts) != total:
            raise KeyError(f"{name}: the fused layer's parts do not cover its rows")
        out[name] = torch.cat([t for _, t in parts], dim=0)
    return out


def _flux2(model: nn.Module) -> dict[str, torch.Tensor]:
    from loraengine.plugins.models.comfy_names import flux2_names

    return _apply(model.state_dict(), flux2_names(model), _FLUX2_EXTRA)


def _flux(model: nn.Module) -> dict[str, torch.Tensor]:
    from loraengine.plugins.models.comfy_names import flux_names

    return _apply(model.state_dict(), flux_names(model), _FLUX_EXTRA)


def _lumina2(model: nn.Module) -> dict[str, torch.Tensor]:
    from loraengine.plugins.models.comfy_names import lumina2_names

    return _apply(model.state_dict(), lumina2_names(model), [])


def _z_image(model: nn.Module) -> dict[str, torch.Tensor]:
    from loraengine.plugins.models.comfy_names import z_image_names

    return _apply(model.state_dict(), z_image_names(model), _Z_IMAGE_EXTRA)


def _wan(model: nn.Module) -> dict[str, torch.Tensor]:
    from loraengine.plugins.models.wan_keys import to_original

    names = {path: name for path, _ in model.named_modules()
             if (name := to_original(path)) is not None}
    return _apply(model.state_dict(), names, _WAN_EXTRA)


def _renamed(rules: list[Rule]) -> Callable[[nn.Module], dict[str, torch.Tensor]]:
    return lambda model: _apply(model.state_dict(), {}, rules)


_WRITERS: dict[str, Callable[[nn.Module], dict[str, torch.Tensor]]] = {
    "Flux2Transformer2DModel": _flux2, "ZImageTransformer2DModel": _z_image,
    "FluxTransformer2DModel": _flux, "ChromaTransformer2DModel": _flux,
    "Lumina2Transformer2DModel": _lumina2,
    "WanTransformer3DModel": _wan, "LTX2VideoTransformer3DModel": _renamed(_LTX2),
    "QwenImageTransformer2DModel": _renamed(_SAME),
    "HiDreamImageTransformer2DModel": _renamed(_SAME)}


def to_single_file(model: nn.Module, prefix: str = "") -> dict[str, torch.Tensor]:
    """``model``'s tensors (the same tensor objects, or new ones where the layout fuses
    or reorders rows) under the names of its released single file, each after
    ``prefix`` (``CHECKPOINT_PREFIX`` for an all-in-one checkpoint's names)."""
    writer = _WRITERS.get(type(model).__name__)
    if writer is None:
        raise ValueError(f"no single-file layout for a {type(model).__name__}; known: "
                         f"{', '.join(sorted(_WRITERS))}")
    return {prefix + key: tensor for key, tensor in writer(model).items()}


__all__ = ["CHECKPOINT_PREFIX", "SINGLE_FILE_FAMILIES", "to_single_file"]
