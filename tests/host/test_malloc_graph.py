"""Newer ComfyUI (0.38+) records allocations per transformer block and aborts on a recorded allocation that
outlives its block unless it was made under ``comfy.model_prefetch.pause_malloc_graph()``. A stand-in for that
module (0.3.64 has none) records when it is paused; every tensor X-Slim keeps as cache state must have been
allocated while paused."""

from __future__ import annotations

import contextlib
import sys
import types

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import comfy_env as ce


class Allocations(TorchDispatchMode):
    """For every tensor storage an op creates: whether the malloc graph was paused then."""

    def __init__(self, state):
        super().__init__()
        self.state, self.paused_at = state, {}

    def __torch_dispatch__(self, func, types_, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        flat = torch.utils._pytree.tree_leaves((args, kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in flat if isinstance(t, torch.Tensor)}
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:  # new storage, not a view
                self.paused_at[t.untyped_storage().data_ptr()] = self.state["paused"]  # the latest owner of the address
        return out


@pytest.fixture()
def stub_prefetch(monkeypatch):
    state = {"paused": False, "entries": 0}

    @contextlib.contextmanager
    def pause_malloc_graph():
        outer = state["paused"]
        state["paused"], state["entries"] = True, state["entries"] + 1
        try:
            yield
        finally:
            state["paused"] = outer

    module = types.ModuleType("comfy.model_prefetch")
    module.pause_malloc_graph = pause_malloc_graph
    import comfy

    monkeypatch.setitem(sys.modules, "comfy.model_prefetch", module)
    monkeypatch.setattr(comfy, "model_prefetch", module, raising=False)
    return state


def kept_tensors(engine) -> list[torch.Tensor]:
    out = []
    for row in engine._run.rows.values():
        out += [row.delta_last, row.delta_prev, row.delta_prev2, row.last_out, *(row.segment_delta or ())]
        out += [t for pair in row.block_residuals.values() for t in pair]
        out += [t for pair in row.kv.values() for t in pair]
    return [t for t in out if t is not None]


@pytest.mark.parametrize("family", ["flux", "hunyuan_video"])
def test_every_cache_allocation_happens_while_the_malloc_graph_is_paused(pack, stub_prefetch, monkeypatch, family):
    from comfyui_xslim.nodes.xslim_nodes import XSlimCache
    from comfyui_xslim.xslim_core.engine import XSlimEngine

    seen = []
    real_end = XSlimEngine.end_run

    def end_run(self):  # look at the run's state before it is freed
        if self._run is not None:
            seen.extend(kept_tensors(self))
        real_end(self)

    monkeypatch.setattr(XSlimEngine, "end_run", end_run)
    model = ce.tiny_model(family)
    cached = XSlimCache.execute(model, "custom", "none (online)", 0.2, 0.5, 0.0, 0.5, 0.0, 1.0, "same as model", "same as model").args[0]
    with Allocations(stub_prefetch) as allocations:
        ce.sample(cached, family, steps=12, cfg=2.0, side=16 if family == "flux" else 8)
    assert stub_prefetch["entries"] > 0 and len(seen) > 0
    assert all(allocations.paused_at.get(t.untyped_storage().data_ptr()) is True for t in seen)


def test_without_the_module_nothing_is_paused_and_nothing_breaks(pack):
    from comfyui_xslim.nodes.host import malloc_graph_pause

    assert malloc_graph_pause() is None  # ComfyUI 0.3.64: no comfy.model_prefetch
