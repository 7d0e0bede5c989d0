"""comfyui-xslim: ComfyUI imports this package and asks ``comfy_entrypoint()`` for the pack's nodes.

The engines (``xslim_core``, ``distill_core``) are plain PyTorch; only ``nodes/`` talks to ComfyUI.
"""

from .nodes import comfy_entrypoint

WEB_DIRECTORY = "./web"  # the front-end extension: the 1.x-Distill jobs panel

__all__ = ["comfy_entrypoint", "WEB_DIRECTORY"]
