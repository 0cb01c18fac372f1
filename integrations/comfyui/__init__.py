"""loraengine's ComfyUI nodes: Train LoRA (loraengine), Save LoRA (loraengine), Load
loraengine config. Install into ``ComfyUI/custom_nodes/`` with loraengine importable
(``pip install loraengine`` in ComfyUI's environment)."""

from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
