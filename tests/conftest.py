"""The suite's short fixture names, each one of the ``loraengine.testing`` fixtures that
plugin authors get from the pytest plugin (``loraengine.testing.pytest_plugin``)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch

torch.set_num_threads(1)
os.environ.setdefault("MPLBACKEND", "Agg")

REPO = Path(__file__).resolve().parents[1]


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
