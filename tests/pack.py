"""The pack's node layer in a core test: ``nodes/`` imports relatively and nothing of ComfyUI at module level, so the
pack is loaded as ComfyUI loads it, as a package from the repository folder, and a node module imported from it."""

from __future__ import annotations

import importlib
import os

from xslim_core.packages import register_package

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def node_module(module: str, pack: str = "comfyui_xslim"):
    register_package(pack, REPO)
    return importlib.import_module(f"{pack}.nodes.{module}")
