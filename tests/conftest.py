"""The suite's short fixture names, each one of the ``loraengine.testing`` fixtures that
plugin authors get from the pytest plugin (``loraengine.testing.pytest_plugin``)."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
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
