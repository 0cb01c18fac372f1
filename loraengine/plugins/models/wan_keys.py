"""The ``wan_comfyui`` key format: Wan LoRA files in the original Wan module names
(``diffusion_model.blocks.0.self_attn.q``), which ComfyUI's Wan model has; its loader
maps ``diffusion_model.<path>`` of its own weights and nothing else for Wan, so a file
in diffusers' names would load nothing there.

The renames are those between diffusers' ``WanTransformer3DModel`` and the released
Wan checkpoints (per block: ``attn1`` → ``self_attn``, ``attn2`` → ``cross_attn``,
``to_q/k/v/out.0`` → ``q/k/v/o``, ``add_k/v_proj`` → ``k_img/v_img``,
``ffn.net.0.proj/net.2`` → ``ffn.0/2``, the q/k norms, and diffusers' ``norm2`` (the
cross-attention norm) → ``norm3``; outside the blocks the embedders and the head). A
LoKr on the 3-D patch embedding is written as ComfyUI computes it right
(``comfy_names.lokr_kernel_flattened``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

import torch

from loraengine.core.plugins.specs import ExporterSpec
from loraengine.plugins.models import comfy_names

PREFIX = "diffusion_model."
#: diffusers module path suffix -> the original's, inside ``blocks.<n>.``
_BLOCK = {"attn1.to_q": "self_attn.q", "attn1.to_k": "self_attn.k",
          "attn1.to_v": "self_attn.v", "attn1.to_out.0": "self_attn.o",
          "attn2.to_q": "cross_attn.q", "attn2.to_k": "cross_attn.k",
          "attn2.to_v": "cross_attn.v", "attn2.to_out.0": "cross_attn.o",
          "attn2.add_k_proj": "cross_attn.k_img", "attn2.add_v_proj": "cross_attn.v_img",
          "ffn.net.0.proj": "ffn.0", "ffn.net.2": "ffn.2",
          # the norms with weights (ComfyUI's trainer gives each a ``diff``)
          "attn1.norm_q": "self_attn.norm_q", "attn1.norm_k": "self_attn.norm_k",
          "attn2.norm_q": "cross_attn.norm_q", "attn2.norm_k": "cross_attn.norm_k",
          "norm2": "norm3"}
#: whole module paths outside the blocks
_TOP = {"condition_embedder.time_embedder.linear_1": "time_embedding.0",
        "condition_embedder.time_embedder.linear_2": "time_embedding.2",
        "condition_embedder.text_embedder.linear_1": "text_embedding.0",
        "condition_embedder.text_embedder.linear_2": "text_embedding.2",
        "condition_embedder.time_proj": "time_projection.1",
        "proj_out": "head.head", "patch_embedding": "patch_embedding"}
_BLOCK_PATH = re.compile(r"^blocks\.(\d+)\.(.+)$")


def to_original(path: str) -> str | None:
    """The original Wan name of a diffusers module path (``None``: it has none)."""
    if path in _TOP:
        return _TOP[path]
    m = _BLOCK_PATH.match(path)
    if m and m.group(2) in _BLOCK:
        return f"blocks.{m.group(1)}.{_BLOCK[m.group(2)]}"
    return None


def to_file(modules: Mapping[str, Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for path, params in modules.items():
        name = to_original(path)
        if name is None:
            raise ValueError(f"module {path}: the wan_comfyui format has no name for it "
                             f"(adapt the blocks, or use the diffusers format)")
        for param, tensor in comfy_names.lokr_kernel_flattened(params).items():
            out[f"{PREFIX}{name}.{param}"] = tensor
    return out


def from_file(tensors: Mapping[str, torch.Tensor], module_paths: Iterable[str]
              ) -> dict[str, dict[str, torch.Tensor]] | None:
    """Group a file in original names by our module paths; ``None`` when no key is an
    original Wan name of one of ``module_paths``."""
    by_name = {to_original(p): p for p in module_paths}
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        if not key.startswith(PREFIX):
            return None
        rest = key[len(PREFIX):]
        for name, path in by_name.items():
            if name is not None and rest.startswith(name + "."):
                grouped.setdefault(path, {})[rest[len(name) + 1:]] = tensor
                break
        else:
            return None
    return grouped or None


SPEC = ExporterSpec("wan_comfyui", to_file, from_file,
                    "Wan in its original module names (diffusion_model.blocks.N.self_attn.q): "
                    "ComfyUI's Wan loader.")
