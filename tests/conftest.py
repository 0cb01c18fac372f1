"""The suite's short fixture names, each one of the ``loraengine.testing`` fixtures that
plugin authors get from the pytest plugin (``loraengine.testing.pytest_plugin``)."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

torch.set_num_threads(1)
os.environ.setdefault("MPLBACKEND", "Agg")

REPO = Path(__file__).resolve().parents[1]


class _Collect(logging.Handler):
    def __init__(self, into: list[str]):
        super().__init__(logging.WARNING)
        self.into = into

    def emit(self, record: logging.LogRecord) -> None:
        self.into.append(record.getMessage())


@contextmanager
def diffusers_warnings() -> Iterator[list[str]]:
    """The warnings diffusers logs in the body (its loaders report file keys they could
    not place this way), collected in the yielded list."""
    messages: list[str] = []
    handler, logger = _Collect(messages), logging.getLogger("diffusers")
    old = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.WARNING)
    try:
        yield messages
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old)


@pytest.fixture
def host(loraengine_host: Any) -> Any:
    """A fresh plugin host: the built-ins and installed plugins."""
    return loraengine_host


@pytest.fixture
def builtin_host(loraengine_builtin_host: Any) -> Any:
    """A fresh plugin host with the built-ins only."""
    return loraengine_builtin_host


@pytest.fixture(scope="session")
def unet_dir(tiny_unet_dir: Path) -> Path:
    """A tiny diffusers pipeline folder (unet + scheduler), built once per session."""
    return tiny_unet_dir


@pytest.fixture
def data_files(tiny_unet_files: tuple[Path, Path]) -> tuple[Path, Path]:
    """latents [6,4,8,8] and conditioning [6,3,16] files matching the tiny UNet."""
    return tiny_unet_files


@pytest.fixture
def unet_config(tiny_unet_train_config: dict[str, Any]) -> dict[str, Any]:
    """A small, fast config dict for the tiny UNet (fp32, no checkpointing)."""
    return tiny_unet_train_config


@dataclass
class TrainedFile:
    """What :func:`train_and_reload` gives back: the trained file, its tensors and the
    modules they adapt, the reloaded adapter's merged prediction on the probe at ``t``, and
    the family's ``predict`` to call on the consumer's model."""

    config: Path
    lora: Path
    tensors: dict[str, torch.Tensor]
    modules: set[str]
    t: torch.Tensor
    merged: torch.Tensor
    predict: Callable[..., torch.Tensor]  # the family's predict, for the consumer's model


def train_and_reload(tmp_path: Path, family: str, folder: Path, latents: torch.Tensor,
                     cond: dict[str, torch.Tensor], probe_x: torch.Tensor,
                     probe_cond: dict[str, torch.Tensor]) -> TrainedFile:
    """Train 30 steps through the CLI on ``latents``/``cond`` (rank 4, fp32, gradient
    checkpointing), check the loss curve, then load the file back with
    ``adapter.existing``: it must lower the fixed-draw loss by 3 %; the merged
    prediction on the probe at sigma 0.3 and 0.8 is returned for the consumer's loader
    to match."""
    import json

    import yaml
    from click.testing import CliRunner
    from safetensors.torch import load_file, save_file

    from loraengine.api import resolve_config
    from loraengine.cli.main import cli
    from loraengine.core.build import build_pipeline
    from loraengine.plugins import build_plugin_manager
    from loraengine.testing import tiny_pipelines as tp

    save_file({"latents": latents}, str(tmp_path / "lat.st"))
    save_file(cond, str(tmp_path / "cond.st"))
    cfg = {"model": {"family": family, "path": str(folder)},
           "data": {"latents": str(tmp_path / "lat.st"),
                    "conditioning": str(tmp_path / "cond.st")},
           "training": {"steps": 30, "batch_size": 4, "dtype": "fp32", "seed": 0},
           "optimizer": {"lr": 0.02},
           "adapter": {"rank": 4, "alpha": 2, "dtype": "fp32"},
           "memory": {"gradient_checkpointing": True},
           "output": {"dir": str(tmp_path / "out"), "name": "lora", "plot": False}}
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(cfg))
    result = CliRunner().invoke(cli, ["train", str(path), "-q"])
    assert result.exit_code == 0, result.output
    losses = json.loads((tmp_path / "out" / "lora.loss.json").read_text())["loss"]
    assert len(losses) == 30 and all(torch.isfinite(torch.tensor(losses)))
    lora = tmp_path / "out" / "lora.safetensors"
    tensors = load_file(str(lora))
    modules = {k.rsplit(".lora_", 1)[0] for k in tensors if ".lora_" in k}

    host = build_plugin_manager()
    conf, base = resolve_config(path, host, overrides=[f"adapter.existing={lora}"])
    engine = build_pipeline(conf, host, base_dir=base)
    t = engine.loaded.schedule.model_timesteps(torch.tensor([0.3, 0.8]))
    try:
        trained = tp.fixed_draw_loss(engine)
        engine.network.set_multiplier(0.0)
        untouched = tp.fixed_draw_loss(engine)
        engine.network.set_multiplier(1.0)
        engine.network.merge()
        with torch.no_grad():
            merged = engine.loaded.predict(engine.model, probe_x, t, probe_cond)
    finally:
        engine.close()
    assert trained < untouched * 0.97, (trained, untouched)
    return TrainedFile(path, lora, tensors, modules, t, merged, engine.loaded.predict)

