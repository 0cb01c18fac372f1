"""Building blocks for plugin tests: wrap spec records into a plugin, register one on a
host for a while, and train a tiny in-memory model in well under a second.

The pytest fixtures in ``loraengine.testing.pytest_plugin`` are thin wrappers of these;
the conformance suites use them too, so they also work outside pytest.
"""

from __future__ import annotations

import types
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from loraengine.core.config.source import deep_merge

__all__ = [
    "TinyData", "deep_merge", "is_spec", "make_plugin", "one_error_line", "registered",
    "tiny_data", "tiny_train_config", "train_tiny",
]


def one_error_line(result: Any, code: int) -> str:
    """The one line a command printed for its error (a click ``Result``), after
    asserting the exit ``code``, no traceback, and that nothing else was printed."""
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    lines = [x for x in result.output.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    return str(lines[0])


def is_spec(obj: Any) -> bool:
    """Whether ``obj`` is one of the spec records a registration hook returns."""
    from loraengine.core.plugins.registry import CATEGORIES

    return isinstance(obj, tuple(t for _, t in CATEGORIES.values()))


def make_plugin(*specs: Any, name: str = "loraengine_test_plugin",
                **hooks: Callable[..., Any]) -> types.ModuleType:
    """A plugin object providing ``specs`` (each through the registration hook of its
    category) and any lifecycle hook given by keyword, e.g.
    ``make_plugin(MY_LOSS, loraengine_on_save=lambda run, path, kind: ...)``.

    The functions given by keyword must use the hook's argument names.
    """
    from loraengine.core.plugins.hookspecs import hookimpl
    from loraengine.core.plugins.registry import CATEGORIES

    plugin = types.ModuleType(name)
    by_hook: dict[str, list[Any]] = {}
    for spec in specs:
        for hook, record_type in CATEGORIES.values():
            if isinstance(spec, record_type):
                by_hook.setdefault(hook, []).append(spec)
                break
        else:
            raise TypeError(f"{spec!r} is not a spec record (OptimizerSpec, LossSpec, ...)")
    for hook, records in by_hook.items():
        setattr(plugin, hook, hookimpl(_returning(records, hook)))
    for hook, fn in hooks.items():
        setattr(plugin, hook, hookimpl(fn))
    return plugin


def _returning(records: list[Any], hook: str) -> Callable[[], list[Any]]:
    def provide() -> list[Any]:
        return list(records)

    provide.__name__ = hook
    return provide


@contextmanager
def registered(host: Any, *plugins_or_specs: Any, name: str | None = None) -> Iterator[str]:
    """Register a plugin object — or spec records, wrapped by ``make_plugin`` — on
    ``host`` for the duration of the ``with`` block; yields the registered name."""
    if plugins_or_specs and all(is_spec(p) for p in plugins_or_specs):
        plugin = make_plugin(*plugins_or_specs, name=name or "loraengine_test_plugin")
    elif len(plugins_or_specs) == 1:
        plugin = plugins_or_specs[0]
    else:
        raise TypeError("give one plugin object or only spec records")
    plugin_name = host.register(plugin, name=name)
    try:
        yield plugin_name
    finally:
        host.unregister(plugin_name)


# -- a tiny in-memory training run ------------------------------------------------------

@dataclass(frozen=True)
class TinyData:
    """Latents ``[N,4,8,8]`` and conditioning ``[N,3,8]`` matching ``TinyDenoiser``."""

    latents: torch.Tensor
    conditioning: torch.Tensor

    def save(self, folder: Path) -> tuple[Path, Path]:
        """Write ``latents.safetensors`` and ``conditioning.safetensors``; return both."""
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        lat, cond = folder / "latents.safetensors", folder / "conditioning.safetensors"
        save_file({"latents": self.latents.contiguous()}, str(lat))
        save_file({"cond": self.conditioning.contiguous()}, str(cond))
        return lat, cond


def tiny_data(n: int = 6, seed: int = 0, cond_dim: int = 8) -> TinyData:
    from loraengine.testing.models import tiny_conditioning, tiny_latents

    return TinyData(tiny_latents(n=n, seed=seed),
                    tiny_conditioning(n=n, dim=cond_dim, seed=seed + 1))


def tiny_train_config(overlay: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """A config for ``TinyDenoiser`` (the ``module`` family): 2 steps of batch 2, fp32,
    rank 2, every built-in memory strategy off. ``overlay`` is merged over it."""
    base: dict[str, Any] = {
        "model": {"family": "module"},
        "training": {"steps": 2, "batch_size": 2, "dtype": "fp32", "seed": 0},
        "adapter": {"rank": 2, "alpha": 1.0, "dtype": "fp32"},
        "optimizer": {"lr": 1e-3},
        "memory": {"gradient_checkpointing": False},
    }
    return deep_merge(base, overlay or {})


def train_tiny(host: Any = None, overlay: Mapping[str, Any] | None = None, *,
               model: torch.nn.Module | None = None, data: TinyData | None = None,
               write_files: bool = False) -> Any:
    """Train ``TinyDenoiser`` (or ``model``) with ``tiny_train_config(overlay)``; return
    the ``TrainResult``. With an ``output`` section and ``write_files`` it writes files."""
    import loraengine
    from loraengine.testing.models import TinyDenoiser

    data = data or tiny_data()
    return loraengine.train(tiny_train_config(overlay), model=model or TinyDenoiser(),
                            latents=data.latents, conditioning=data.conditioning,
                            host=host, write_files=write_files)
