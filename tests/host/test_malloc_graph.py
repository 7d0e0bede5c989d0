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
    state = {"paused": False, "entries": 0, "exits": 0}

    @contextlib.contextmanager
    def pause_malloc_graph():
        outer = state["paused"]
        state["paused"], state["entries"] = True, state["entries"] + 1
        try:
            yield
        finally:
            state["paused"], state["exits"] = outer, state["exits"] + 1

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
    from xslim_core.engine import XSlimEngine

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


def test_every_pause_is_left_as_often_as_it_is_entered(pack, stub_prefetch):
    model = ce.tiny_model("flux")
    from comfyui_xslim.nodes.xslim_nodes import XSlimCache

    cached = XSlimCache.execute(model, "custom", "none (online)", 0.2, 0.5, 0.0, 0.5, 0.0, 1.0, "same as model", "same as model").args[0]
    ce.sample(cached, "flux", steps=12, cfg=2.0, side=16)
    assert stub_prefetch["entries"] > 0 and stub_prefetch["entries"] == stub_prefetch["exits"] and not stub_prefetch["paused"]


def test_a_students_compensation_moves_to_the_blocks_device_while_paused(pack, stub_prefetch):
    """1.x student: the compensation module is kept beyond the block that first needs it on another device, so it
    is moved there under the pause (the meta device stands in for a GPU on this CPU-only machine)."""
    from distill_core.cache import Compensation
    from comfyui_xslim.nodes.student import CompensationCall

    call = CompensationCall(Compensation(16))
    moved_while = []
    real_to = call.module.to
    call.module.to = lambda *a, **k: moved_while.append(stub_prefetch["paused"]) or real_to(*a, **k)
    img, txt = torch.zeros(1, 4, 16, device="meta"), torch.zeros(1, 3, 16, device="meta")
    out_img, out_txt = call(img, txt)
    assert moved_while == [True] and next(call.module.parameters()).is_meta  # moved once, paused
    assert out_img.shape == img.shape and out_txt.shape == txt.shape
    assert stub_prefetch["entries"] == stub_prefetch["exits"] == 1 and not stub_prefetch["paused"]
    call(img, txt)  # already there: no second move, no second pause
    assert moved_while == [True] and stub_prefetch["entries"] == 1


def test_without_the_module_nothing_is_paused_and_sampling_still_caches(pack, monkeypatch):
    """ComfyUI without ``comfy.model_prefetch`` (0.3.64, or a newer one that drops it): no pause is looked up and
    cached sampling runs as before. The module is removed here, so this holds on any ComfyUI."""
    import comfy

    from comfyui_xslim.nodes.host import malloc_graph_pause
    from comfyui_xslim.nodes.runner import last_report
    from comfyui_xslim.nodes.xslim_nodes import XSlimCache
    from xslim_core.engine import XSlimEngine

    monkeypatch.setitem(sys.modules, "comfy.model_prefetch", None)  # `import comfy.model_prefetch` now raises ImportError
    monkeypatch.delattr(comfy, "model_prefetch", raising=False)
    assert malloc_graph_pause() is None
    guards = []
    real_init = XSlimEngine.__init__

    def init(self, *args, **kwargs):
        guards.append(kwargs.get("allocation_guard", "not passed"))
        real_init(self, *args, **kwargs)

    monkeypatch.setattr(XSlimEngine, "__init__", init)
    model = ce.tiny_model("flux")
    cached = XSlimCache.execute(model, "custom", "none (online)", 0.2, 0.5, 0.0, 0.5, 0.0, 1.0, "same as model", "same as model").args[0]
    out = ce.sample(cached, "flux", steps=12, cfg=2.0, side=16)
    assert guards == [None]  # the run's engine got no pause to call
    assert torch.isfinite(out).all() and "." in "".join(last_report(cached).pattern_rows.values())  # it cached
