"""pytest fixtures for plugin authors (loaded through the ``pytest11`` entry point).

- ``loraengine_host``: a fresh plugin host with the built-ins and installed plugins;
- ``register_plugin``: register a plugin object on that host for one test;
- ``tiny_model``, ``tiny_latents``, ``tiny_conditioning``: a small denoiser and data.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest


@pytest.fixture
def loraengine_host() -> Any:
    from loraengine.core.manager import build_plugin_manager

    return build_plugin_manager()


@pytest.fixture
def register_plugin(loraengine_host: Any) -> Iterator[Callable[[Any], str]]:
    names: list[str] = []

    def register(plugin: Any, name: str | None = None) -> str:
        registered = loraengine_host.register(plugin, name=name)
        names.append(registered)
        return registered

    yield register
    for name in reversed(names):
        loraengine_host.unregister(name)


@pytest.fixture
def tiny_model() -> Any:
    from loraengine.testing.models import TinyDenoiser

    return TinyDenoiser()


@pytest.fixture
def tiny_latents() -> Any:
    from loraengine.testing.models import tiny_latents

    return tiny_latents()


@pytest.fixture
def tiny_conditioning() -> Any:
    from loraengine.testing.models import tiny_conditioning

    return tiny_conditioning()
