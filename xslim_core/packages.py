"""Importing a package from a folder under a name of our choosing (the node pack under ComfyUI's name for it, in a
worker process or a test), as ComfyUI itself imports a custom node folder. The pack's own ``__init__.py`` does the
same for its engine packages before any of them is importable, so it keeps its own copy of these lines."""

from __future__ import annotations

import importlib.util
import os
import sys
from types import ModuleType


def register_package(name: str, folder: str) -> ModuleType:
    """The package ``name`` from ``folder`` (its ``__init__.py`` run once); the module already imported under that
    name when there is one. A ValueError names a folder without a package."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(
        name, os.path.join(folder, "__init__.py"), submodule_search_locations=[folder]
    )
    if spec is None or spec.loader is None or not os.path.isfile(os.path.join(folder, "__init__.py")):
        raise ValueError(f"no package at {folder} (it has no __init__.py) to import as {name}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]  # a failed import leaves no half-made module behind
        raise
    return module
