"""comfyui-xslim: ComfyUI imports this package and asks ``comfy_entrypoint()`` for the pack's nodes.

The engines (``xslim_core``, ``distill_core``) are plain PyTorch; only ``nodes/`` talks to ComfyUI.
"""

from .nodes import comfy_entrypoint

__all__ = ["comfy_entrypoint"]
