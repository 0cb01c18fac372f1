"""Built-in adapter algorithms, one module each."""

from __future__ import annotations

from loraengine.core.hookspecs import hookimpl
from loraengine.plugins.adapters import lora


@hookimpl
def loraengine_adapters():
    return [lora.SPEC]
