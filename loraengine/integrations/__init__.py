"""Glue between loraengine and programs that host it (ComfyUI's node pack)."""
