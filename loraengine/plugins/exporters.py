"""Built-in key formats of LoRA files.

- ``kohya``: ``lora_unet_<path with . as _>.<param>`` — ComfyUI, A1111/Forge and
  diffusers' ``load_lora_weights`` read it.
- ``comfyui``: ``diffusion_model.<path>.<param>`` — ComfyUI's own trained files.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch

from loraengine.core.hookspecs import hookimpl
from loraengine.core.specs import ExporterSpec

Modules = Mapping[str, Mapping[str, torch.Tensor]]


def _split_by_paths(rest: str, paths: set[str]) -> tuple[str, str] | None:
    parts = rest.split(".")
    for i in range(len(parts) - 1, 0, -1):
        cand = ".".join(parts[:i])
        if cand in paths:
            return cand, ".".join(parts[i:])
    return None


class PrefixedFormat:
    """``<prefix><path>.<param>`` where ``path`` may be rewritten by ``encode``."""

    def __init__(self, name: str, prefix: str, underscore: bool):
        self.name, self.prefix, self.underscore = name, prefix, underscore

    def encode(self, path: str) -> str:
        return self.prefix + (path.replace(".", "_") if self.underscore else path)

    def to_file(self, modules: Modules) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for path, params in modules.items():
            stem = self.encode(path)
            for param, tensor in params.items():
                out[f"{stem}.{param}"] = tensor
        return out

    def from_file(self, tensors: Mapping[str, torch.Tensor], module_paths: Iterable[str]
                  ) -> dict[str, dict[str, torch.Tensor]] | None:
        keys = [k for k in tensors if k.startswith(self.prefix)]
        if not keys:
            return None
        paths = set(module_paths)
        grouped: dict[str, dict[str, torch.Tensor]] = {}
        if self.underscore:
            by_stem = {self.encode(p): p for p in paths}
            for key in keys:
                stem, _, param = key.partition(".")
                module = by_stem.get(stem, stem)
                grouped.setdefault(module, {})[param] = tensors[key]
        else:
            for key in keys:
                rest = key[len(self.prefix):]
                found = _split_by_paths(rest, paths)
                module, param = found if found else rest.rsplit(".", 1)
                grouped.setdefault(module, {})[param] = tensors[key]
        return grouped

    def spec(self, description: str) -> ExporterSpec:
        return ExporterSpec(self.name, self.to_file, self.from_file, description)


KOHYA = PrefixedFormat("kohya", "lora_unet_", underscore=True)
COMFYUI = PrefixedFormat("comfyui", "diffusion_model.", underscore=False)


@hookimpl
def loraengine_exporters():
    return [
        KOHYA.spec("kohya keys (lora_unet_*): ComfyUI, A1111/Forge, diffusers."),
        COMFYUI.spec("ComfyUI keys (diffusion_model.*)."),
    ]
