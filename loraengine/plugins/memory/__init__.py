"""Built-in memory strategies. Their option fields form the ``memory`` config section;
they apply in ascending ``order`` once the adapters are attached: quantized base (5),
bypass mode (10, re-attaches the adapters as hooks), offloading (40, wraps layer
forwards) and gradient checkpointing (50, wraps blocks around all of that)."""

from __future__ import annotations

from loraengine.core.plugins.hookspecs import hookimpl
from loraengine.plugins.memory import bypass, checkpointing, offload, quantize


@hookimpl
def loraengine_memory_strategies():
    return [quantize.SPEC, bypass.SPEC, checkpointing.SPEC, offload.SPEC]
