"""The programmatic entry point: ``loraengine.train(config, model=..., latents=...,
conditioning=...)``, the node's inputs in, ``TrainResult(lora, loss_map, steps)`` out."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel
from torch import nn

from loraengine.core.build import build_pipeline
from loraengine.core.config.root import load_config, parse_config
from loraengine.core.plugins.host import PluginHost
from loraengine.core.train.loop import Trainer, TrainResult
from loraengine.plugins import build_plugin_manager


def resolve_config(config: Any, host: PluginHost, *, has_model: bool = False,
                   overrides: list[str] | None = None) -> tuple[Any, Path | None]:
    """Accept a path, a mapping or a validated config; return (config, base folder)."""
    if isinstance(config, (str, Path)):
        path = Path(config)
        return load_config(path, host.registry, overrides), path.resolve().parent
    if isinstance(config, BaseModel):
        return config, None
    if isinstance(config, Mapping):
        data = dict(config)
        if has_model and "model" not in data:
            data["model"] = {"family": "module"}
        return parse_config(data, host.registry, base_dir=Path.cwd()), Path.cwd()
    raise TypeError(f"config must be a path, a mapping or a config model, not "
                    f"{type(config).__name__}")


def train(config: Any, *, model: nn.Module | None = None,
          latents: torch.Tensor | Mapping[str, torch.Tensor] | None = None,
          conditioning: torch.Tensor | Mapping[str, torch.Tensor] | None = None,
          host: PluginHost | None = None, write_files: bool | None = None) -> TrainResult:
    """Train an adapter and return ``TrainResult(lora, loss_map, steps)``.

    ``config`` is a YAML path, a mapping or a validated config. ``model`` (an
    ``nn.Module`` called as ``model(x_t, t, cond)``) selects the ``module`` family when
    the config names no model. ``latents``/``conditioning`` replace the data files.
    Files are written when the config came from a file or has an ``output`` section,
    or when ``write_files=True``.
    """
    host = host or build_plugin_manager()
    cfg, base_dir = resolve_config(config, host, has_model=model is not None)
    if write_files is None:
        write_files = isinstance(config, (str, Path)) or (
            isinstance(config, Mapping) and "output" in config) or isinstance(config, BaseModel)
    pipe = build_pipeline(cfg, host, model=model, latents=latents, conditioning=conditioning,
                          base_dir=base_dir)
    try:
        return Trainer(pipe, write_files=write_files).run()
    finally:
        pipe.close()
