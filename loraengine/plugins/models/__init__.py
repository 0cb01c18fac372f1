"""Built-in model families."""

from __future__ import annotations

from loraengine.core.hookspecs import hookimpl
from loraengine.plugins.models import diffusers_folder, module


@hookimpl
def loraengine_models():
    return [diffusers_folder.SPEC, module.SPEC]
