"""Built-in memory strategies. Their option fields form the ``memory`` config section."""

from __future__ import annotations

from loraengine.core.hookspecs import hookimpl
from loraengine.plugins.memory import bypass, checkpointing, pending


@hookimpl
def loraengine_memory_strategies():
    return [bypass.SPEC, checkpointing.SPEC, *pending.SPECS]
