from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from loraengine.plugins import build_plugin_manager
from loraengine.testing.models import save_tiny_unet, tiny_conditioning, tiny_latents

torch.set_num_threads(1)
os.environ.setdefault("MPLBACKEND", "Agg")

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def host():
    return build_plugin_manager()


@pytest.fixture(scope="session")
def unet_dir(tmp_path_factory) -> Path:
    """A tiny diffusers pipeline folder (unet + scheduler), built once per session."""
    return save_tiny_unet(tmp_path_factory.mktemp("unet") / "pipe")


@pytest.fixture
def data_files(tmp_path) -> tuple[Path, Path]:
    """latents [6,4,8,8] and conditioning [6,3,16] files matching the tiny UNet."""
    lat, cond = tmp_path / "latents.safetensors", tmp_path / "cond.safetensors"
    save_file({"latents": tiny_latents()}, str(lat))
    save_file({"cond": tiny_conditioning(dim=16)}, str(cond))
    return lat, cond


@pytest.fixture
def unet_config(tmp_path, unet_dir, data_files) -> dict:
    """A small, fast config dict for the tiny UNet (fp32, no checkpointing)."""
    lat, cond = data_files
    return {
        "model": {"family": "diffusers", "path": str(unet_dir)},
        "data": {"latents": str(lat), "conditioning": str(cond)},
        "training": {"steps": 3, "batch_size": 2, "dtype": "fp32", "seed": 0},
        "adapter": {"rank": 4, "alpha": 2, "dtype": "fp32"},
        "memory": {"gradient_checkpointing": False},
        "output": {"dir": str(tmp_path / "out"), "name": "test", "plot": False},
    }
