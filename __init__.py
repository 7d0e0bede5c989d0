"""comfyui-xslim: ComfyUI imports this folder as a package and asks ``comfy_entrypoint()`` for the pack's nodes.

The engines (``xslim_core``, ``distill_core``), the demo model (``xslim_demo``) and the measuring tools
(``xslim_lab``) are top-level packages: ``pip install .`` installs them so. ComfyUI does not install a pack, so
they are registered here, from this folder, under those names (only they: the folder itself is not put on
``sys.path``, where ``nodes/`` would shadow ComfyUI's own ``nodes`` module). Only ``nodes/`` talks to ComfyUI.
"""

import importlib.util
import os
import sys

ENGINE_PACKAGES = ("xslim_core", "distill_core", "xslim_demo", "xslim_lab")


def _register_engine_packages() -> None:
    root = os.path.dirname(os.path.abspath(__file__))
    for name in ENGINE_PACKAGES:
        if name in sys.modules:  # installed and imported already (e.g. a test environment): the same code
            continue
        folder = os.path.join(root, name)
        spec = importlib.util.spec_from_file_location(name, os.path.join(folder, "__init__.py"),
                                                      submodule_search_locations=[folder])
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)


# ComfyUI (and the host tests) import this folder as a package; pytest, finding it above tests/, may import this file
# on its own, where there is no package to register anything for
if __package__:
    _register_engine_packages()
    from .nodes import comfy_entrypoint

WEB_DIRECTORY = "./web"  # the front-end extension: the 1.x-Distill jobs panel

__all__ = ["comfy_entrypoint", "WEB_DIRECTORY"]
