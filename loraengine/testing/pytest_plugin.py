"""pytest fixtures for plugin authors (loaded through the ``pytest11`` entry point, so
they are available in any project that has loraengine installed).

- ``loraengine_host``: a fresh plugin host with the built-ins and installed plugins;
  ``loraengine_builtin_host``: the built-ins only;
- ``register_plugin``: register a plugin object — or spec records — on
  ``loraengine_host`` for one test; it is unregistered afterwards;
- ``tiny_model``, ``tiny_latents``, ``tiny_conditioning``: a small denoiser and data;
  ``tiny_dataset``: both tensors together (``.save(folder)`` writes the files);
- ``tiny_unet_dir``: a tiny diffusers pipeline folder (unet + scheduler), one per session;
  ``tiny_unet_files``: latents and conditioning files for it (in the test's tmp_path);
  ``tiny_unet_train_config``: a small config training it on them, writing
  ``<tmp_path>/out/test.safetensors``;
- ``train_tiny``: ``train_tiny(overlay)`` trains the tiny model on ``loraengine_host``
  for two steps with the config overlay and returns the ``TrainResult``.

Everything heavy is imported inside the fixtures: loading this plugin costs nothing
for test runs that do not use them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest


@pytest.fixture
def loraengine_host() -> Any:
    from loraengine.plugins import build_plugin_manager

    return build_plugin_manager()


@pytest.fixture
def loraengine_builtin_host() -> Any:
    from loraengine.plugins import build_plugin_manager

    return build_plugin_manager(entry_points=False)


@pytest.fixture
def register_plugin(loraengine_host: Any) -> Iterator[Callable[..., str]]:
    """``register_plugin(plugin)`` or ``register_plugin(spec, spec, ..., name=...)``:
    registered on ``loraengine_host`` until the test ends; returns the plugin's name."""
    from loraengine.testing.harness import registered

    with ExitStack() as stack:
        def register(*plugins_or_specs: Any, name: str | None = None) -> str:
            return stack.enter_context(registered(loraengine_host, *plugins_or_specs,
                                                  name=name))

        yield register


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


@pytest.fixture
def tiny_dataset() -> Any:
    from loraengine.testing.harness import tiny_data

    return tiny_data()


@pytest.fixture(scope="session")
def tiny_unet_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from loraengine.testing.models import save_tiny_unet

    return save_tiny_unet(tmp_path_factory.mktemp("loraengine_unet") / "pipe")


@pytest.fixture
def tiny_unet_files(tmp_path: Path) -> tuple[Path, Path]:
    from loraengine.testing.models import save_tiny_unet_data

    return save_tiny_unet_data(tmp_path)


@pytest.fixture
def tiny_unet_train_config(tmp_path: Path, tiny_unet_dir: Path,
                           tiny_unet_files: tuple[Path, Path]) -> dict[str, Any]:
    from loraengine.testing.models import tiny_unet_train_config as make

    return make(tiny_unet_dir, tiny_unet_files, {
        "adapter": {"alpha": 2},
        "output": {"dir": str(tmp_path / "out"), "name": "test", "plot": False}})


@pytest.fixture
def train_tiny(loraengine_host: Any, tiny_dataset: Any) -> Callable[..., Any]:
    from loraengine.testing.harness import train_tiny as run

    def train(overlay: dict[str, Any] | None = None, **kwargs: Any) -> Any:
        return run(loraengine_host, overlay, data=tiny_dataset, **kwargs)

    return train
