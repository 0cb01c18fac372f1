"""loraengine's ComfyUI nodes: Train LoRA (loraengine), Save LoRA (loraengine), Load
loraengine config. Install into ``ComfyUI/custom_nodes/`` with loraengine importable
(``pip install loraengine`` in ComfyUI's environment).

Both node forms are exported: the classic ``NODE_CLASS_MAPPINGS`` and, inside a ComfyUI
with the v3 API, ``comfy_entrypoint`` (``v3.py``: the same nodes in the v3 schema)."""

from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]

try:
    from .v3 import comfy_entrypoint
except ImportError:  # no v3 API here (outside ComfyUI)
    pass
else:
    __all__ += ["comfy_entrypoint"]
