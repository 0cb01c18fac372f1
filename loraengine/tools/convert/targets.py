"""The consumers ``loraengine convert --to`` writes for: plain data, so the command's
``--help`` lists them without importing the exporters (and through them every family)."""

from __future__ import annotations

#: consumer -> (exporter, the module layouts it is written in, best first; None: the
#: exporter's own)
TARGETS: dict[str, tuple[str, tuple[str, ...] | None]] = {
    "comfyui": ("comfyui", None), "kohya": ("kohya", None),
    "a1111": ("kohya", ("ldm",)), "diffusers": ("diffusers", None),
}
