"""The ComfyUI layer of the pack (V3 node schema). It is the only package that imports ComfyUI, and only
its public API (``comfy_api.latest``), looked up when ComfyUI asks for the nodes."""

from __future__ import annotations


async def comfy_entrypoint():
    from comfy_api.latest import ComfyExtension

    class XSlimExtension(ComfyExtension):
        async def get_node_list(self):
            return list(node_classes())

    return XSlimExtension()


def node_classes():
    """The pack's node classes. The cache, profile and compare nodes land with the ComfyUI-nodes issue."""
    return ()
