import ast
import functools
import os

import torch

torch.set_num_threads(min(2, torch.get_num_threads()))


# Test tiers, given by what a test touches rather than by hand: `pytest -m unit` runs in seconds, `-m model` builds
# real (tiny, random or shipped) diffusers models, `host` needs a real ComfyUI, `browser` a real Chromium too; `slow`
# (by hand) marks the minute-long core cases that `make test-quick` leaves out.
MODEL_SOURCES = ("diffusers", "families", "xslim_demo", "distill_core.student")


@functools.cache
def _imports(path: str) -> frozenset:
    """The modules a test file imports (read from its source: what a test touches is what it imports)."""
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return frozenset(names)


def _tiers(item) -> tuple[str, ...]:
    path = str(item.fspath).replace("\\", "/")
    if "/tests/host/" in path:
        return ("host", "browser") if os.path.basename(path).startswith("test_browser") else ("host",)
    if any(name == s or name.startswith(s + ".") for name in _imports(str(item.fspath)) for s in MODEL_SOURCES):
        return ("model",)
    return ("unit",)


def pytest_collection_modifyitems(config, items):
    for item in items:
        if any(item.get_closest_marker(tier) for tier in ("unit", "model")):
            continue  # a module that runs models in a subprocess says so with `pytestmark`
        for tier in _tiers(item):
            item.add_marker(tier)
