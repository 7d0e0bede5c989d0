"""The pack's node layer in a core test: ``nodes/`` imports relatively and nothing of ComfyUI at module level, so the
pack is loaded as ComfyUI loads it, as a package from the repository folder, and a node module imported from it."""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def node_module(module: str, pack: str = "comfyui_xslim"):
    if pack not in sys.modules:
        spec = importlib.util.spec_from_file_location(pack, os.path.join(REPO, "__init__.py"), submodule_search_locations=[REPO])
        package = importlib.util.module_from_spec(spec)
        sys.modules[pack] = package
        spec.loader.exec_module(package)
    return importlib.import_module(f"{pack}.nodes.{module}")
