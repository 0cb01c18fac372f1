"""A family described by a record (a ``FlowCall``, no code of its own) stays a short
module: every module of ``loraengine/plugins/models`` that defines such a family is
under 60 lines (issue 17: adding a family is a record plus tests). Shared glue (VAE
wrappers, encoders, packing and position helpers) belongs in the shared modules.
Families with code of their own (Wan's two experts, the UNet families' DDPM schedule)
are not records and are not counted."""

from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path

import loraengine.plugins.models as models
from loraengine.plugins.models.common import Family

LIMIT = 60


def _record_modules() -> dict[str, tuple[Path, list[str]]]:
    """module name -> (file, names of the record families it defines)."""
    found: dict[str, tuple[Path, list[str]]] = {}
    for info in pkgutil.iter_modules(models.__path__):
        module = importlib.import_module(f"{models.__name__}.{info.name}")
        records = [name for name, value in vars(module).items()
                   if isinstance(value, Family) and value.call is not None
                   and getattr(value.predictor, "__module__", "") ==
                   "loraengine.plugins.models.flow"]
        if records and module.__file__ is not None and info.name != "common":
            found[info.name] = (Path(module.__file__), records)
    return found


def test_the_built_in_record_families_are_all_found():
    names = set(_record_modules())
    assert {"sd3", "flux", "flux2", "qwen_image", "z_image", "chroma", "lumina2",
            "hidream", "ltx2", "hunyuan_video15"} <= names
    assert "wan" not in names and "unet" not in names


def test_every_record_module_is_under_60_lines():
    sizes = {name: len(path.read_text(encoding="utf-8").splitlines())
             for name, (path, _) in _record_modules().items()}
    too_long = {name: n for name, n in sizes.items() if n >= LIMIT}
    assert not too_long, f"record modules of {LIMIT} lines or more: {too_long}"
