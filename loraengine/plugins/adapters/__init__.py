"""Built-in adapter algorithms, one module each."""

from __future__ import annotations

from loraengine.core.plugins.hookspecs import hookimpl
from loraengine.plugins.adapters import boft, full, glora, ia3, loha, lokr, lora, oft


@hookimpl
def loraengine_adapters():
    return [lora.SPEC, loha.SPEC, lokr.SPEC, full.SPEC, oft.SPEC, boft.SPEC, glora.SPEC, ia3.SPEC]
