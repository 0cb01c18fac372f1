"""loraengine-example: a complete third-party loraengine plugin.

It adds an adapter algorithm (``lora_fa``), an optimizer (``adabelief``) and a loss
(``log_cosh``). loraengine finds this module through the ``loraengine`` entry point in
``pyproject.toml`` and calls the hooks below; each returns the spec records of one
category. After ``pip install`` a config can say::

    adapter: {algorithm: lora_fa, rank: 8}
    optimizer: {name: adabelief, lr: 0.001}
    loss: {name: log_cosh, delta: 0.5}
"""

from __future__ import annotations

from loraengine import AdapterSpec, LossSpec, OptimizerSpec, hookimpl
from loraengine_example import adapter, loss, optimizer

__version__ = "0.1.0"
__all__ = ["SPECS", "loraengine_adapters", "loraengine_losses", "loraengine_optimizers"]

#: Every record this plugin provides.
SPECS = (adapter.SPEC, optimizer.SPEC, loss.SPEC)


@hookimpl
def loraengine_adapters() -> list[AdapterSpec]:
    return [adapter.SPEC]


@hookimpl
def loraengine_optimizers() -> list[OptimizerSpec]:
    return [optimizer.SPEC]


@hookimpl
def loraengine_losses() -> list[LossSpec]:
    return [loss.SPEC]
