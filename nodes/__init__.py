"""The ComfyUI layer of the pack (V3 node schema). It is the only package that imports ComfyUI, and only
its public API (``comfy_api.latest``), looked up when ComfyUI asks for the nodes."""

from __future__ import annotations


async def comfy_entrypoint():
    from comfy_api.latest import ComfyExtension

    class XSlimExtension(ComfyExtension):
        async def get_node_list(self):
            return node_classes()

    return XSlimExtension()


def node_classes() -> list:
    from .student import register_students_folder
    from .jobs import register_routes
    from .student_nodes import NODES as STUDENT_NODES
    from .train_nodes import TRAIN_NODES
    from .xslim_nodes import NODES, register_demo_model_folder

    register_demo_model_folder()
    register_students_folder()
    register_routes()  # the background-training jobs API (only inside a running ComfyUI server)
    return list(NODES) + list(STUDENT_NODES) + list(TRAIN_NODES)
