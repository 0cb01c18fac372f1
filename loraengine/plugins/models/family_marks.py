"""Which transformer family a file's module names were made for, from each family's
record (``Family.known_as``, with its article, and ``Family.marks``): the ``looks_like`` of every
transformer family (``ModelFamilySpec.looks_like``), one matcher over all of them.

A module name comes in any key format and layout: PEFT/diffusers
(``transformer.single_transformer_blocks.0.proj_mlp``), ComfyUI
(``diffusion_model.double_blocks.0.img_attn.qkv``) or kohya
(``lora_transformer_single_transformer_blocks_0_proj_mlp``, ``lora_unet_double_blocks_0_…``).
The format's prefix is dropped and ``.`` read as ``_``, so one mark matches a layer in
all of them. A family scores the names its marks match; the best scorer names the file
when it matches at least half of them, all of the best when several tie (the layers of
FLUX.1 and Chroma blocks have the same names: "a FLUX.1 or Chroma transformer").
"""

from __future__ import annotations

import re
from collections.abc import Callable, Collection, Sequence
from typing import Any

#: key-format prefixes in front of a module name (dotted ones before flattening)
_DOTTED = ("base_model.model.", "model.diffusion_model.", "diffusion_model.", "transformer.")
_FLAT = ("lora_transformer_", "lora_unet_", "lycoris_", "diffusion_model_",
         "model_diffusion_model_")


def normal_name(name: str) -> str:
    """``name`` without its key format's prefix, ``.`` as ``_``."""
    for prefix in _DOTTED:
        if name.startswith(prefix):
            name = name[len(prefix):]
            break
    else:
        for prefix in _FLAT:
            if name.startswith(prefix):
                name = name[len(prefix):]
                break
    return name.replace(".", "_")


def compile_marks(marks: Sequence[str]) -> re.Pattern[str] | None:
    """One pattern for a family's marks, over ``normal_name`` forms."""
    if not marks:
        return None
    parts = [re.sub(r"(?<![A-Za-z])N(?![A-Za-z])", r"\\d+", m).replace(".", "_")
             for m in marks]
    return re.compile(r"(?:" + "|".join(f"(?:{p})" for p in parts) + r")(?:_|$)")


def _phrase(names: Sequence[str]) -> str:
    """``["an SD3"]`` -> "an SD3 transformer"; ``["a FLUX.1", "a Chroma"]`` ->
    "a FLUX.1 or Chroma transformer"."""
    rest = [n.partition(" ")[2] for n in names[1:]]
    return (", ".join([names[0], *rest[:-1]]) + (" or " + rest[-1] if rest else "")
            + " transformer")


# -- marks several families share (each family's record lists its own) ---------------

#: an MMDiT double block's attention (SD3, FLUX.1, Flux.2, Chroma, Qwen-Image,
#: HunyuanVideo 1.5)
JOINT_ATTENTION = r"transformer_blocks.N.attn.(to_[qkv]|to_out.N|add_[qkv]_proj|to_add_out|" \
    r"norm_(added_)?[qk])"
#: its GELU feed-forwards and AdaLN modulations (SD3, FLUX.1, HunyuanVideo 1.5)
JOINT_FEED_FORWARD = r"transformer_blocks.N.ff(_context)?.net.N(.proj)?"
JOINT_MODULATION = r"transformer_blocks.N.norm1(_context)?.linear"
#: the original FLUX checkpoint's double and single blocks (ComfyUI, kohya): FLUX.1,
#: Chroma and Flux.2 alike
FLUX_ORIGINAL_BLOCKS = (r"double_blocks.N.(img|txt)_(attn.(qkv|proj|norm)|mlp.N)",
                        r"single_blocks.N.(linear[12]|norm)")
#: FLUX.1 and Chroma's diffusers single blocks
FLUX_SINGLE = r"single_transformer_blocks.N.(attn.(to_[qkv]|norm_[qk])|proj_mlp|proj_out)"
#: Lumina 2's and Z-Image's blocks as ComfyUI names them (Z-Image's diffusers names too)
NEXT_DIT = r"(noise_refiner|context_refiner|layers).N.(attention.(qkv|out|[qk]_norm)|" \
    r"attention_norm[12]|ffn_norm[12]|feed_forward.w[123]|adaLN_modulation.N)"


def looks_like_among(families: Sequence[Any]) -> Callable[[Collection[str]], str | None]:
    """``looks_like(names)`` over ``families`` (records with ``known_as``/``marks``)."""
    compiled = [(f.known_as, pattern) for f in families
                if f.known_as and (pattern := compile_marks(f.marks)) is not None]

    def looks_like(names: Collection[str]) -> str | None:
        flat = {normal_name(n) for n in names}
        if not flat:
            return None
        scores: dict[str, int] = {}
        for known_as, pattern in compiled:
            scores[known_as] = max(scores.get(known_as, 0),
                                   sum(1 for n in flat if pattern.match(n)))
        best = max(scores.values(), default=0)
        if not best or best * 2 < len(flat):
            return None
        return _phrase([k for k, v in scores.items() if v == best])

    return looks_like


__all__ = ["FLUX_ORIGINAL_BLOCKS", "FLUX_SINGLE", "JOINT_ATTENTION", "JOINT_FEED_FORWARD",
           "JOINT_MODULATION", "NEXT_DIT", "compile_marks", "looks_like_among", "normal_name"]
