"""The built-in plugins, registered through the same hooks as third-party packages.

``build_plugin_manager`` is the one place that names them: it hands their modules to
the engine's plugin host, then loads every ``loraengine`` entry point.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from loraengine.core.plugins.host import PluginHost, make_host

#: Built-in plugin modules, registered one by one exactly like external plugins.
BUILTIN_PLUGINS: tuple[str, ...] = (
    "loraengine.plugins.optimizers",
    "loraengine.plugins.losses",
    "loraengine.plugins.schedulers",
    "loraengine.plugins.exporters",
    "loraengine.plugins.adapters",
    "loraengine.plugins.memory",
    "loraengine.plugins.models",
    "loraengine.plugins.training",
    "loraengine.plugins.samplers",
    "loraengine.plugins.outputs.previews",
    "loraengine.plugins.outputs.plot",
    "loraengine.plugins.outputs.loggers",
)


def build_plugin_manager(*, builtins: bool = True, entry_points: bool = True,
                         strict: bool = False, extra: Iterable[Any] = ()) -> PluginHost:
    """The plugin host of a run: the built-ins (unless ``builtins=False``), every
    ``loraengine`` entry point, then ``extra`` plugin objects.

    An entry point that fails to import is a ``PluginLoadWarning`` naming its
    distribution, or a ``PluginError`` when ``strict``.
    """
    return make_host(BUILTIN_PLUGINS if builtins else (), entry_points=entry_points,
                     strict=strict, extra=extra)


__all__ = ["BUILTIN_PLUGINS", "build_plugin_manager"]
