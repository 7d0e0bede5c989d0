"""Every model call counts: with samplers that evaluate between steps (midpoints, Heun's corrector, SDE
substeps) the engine's block evaluations equal the block executions counted by an independent dit patch."""

from __future__ import annotations

import pytest

import comfy_env as ce


counting = ce.counting  # shared with the other counting tests (comfy_env)


@pytest.mark.parametrize("sampler", ["dpmpp_2s_ancestral", "heun", "dpmpp_sde", "euler"])
def test_effective_nfe_counts_every_block_that_ran(pack, sampler):
    from comfyui_xslim.nodes.runner import last_report
    from comfyui_xslim.nodes.xslim_nodes import XSlimCache

    base, counter = counting(ce.tiny_model("flux"))
    # token ratio 1: a token refresh runs every token, so the engine's fractional count is a whole block
    cached = XSlimCache.execute(base, "custom", "none (online)", 0.2, 0.5, 0.0, 1.0, 0.0, 1.0, "same as model", "same as model").args[0]
    ce.sample(cached, "flux", steps=10, cfg=2.0, side=16, sampler=sampler)
    stats = last_report(cached).stats
    assert stats.block_evals == counter["rows"]
    assert stats.effective_nfe == pytest.approx(counter["rows"] / stats.num_blocks / stats.num_rows)
    if sampler in ("dpmpp_2s_ancestral", "dpmpp_sde"):  # midpoints off the schedule: run uncached, counted in full
        assert stats.uncached_calls > 0 and f"incl. {stats.uncached_calls} uncached model calls" in stats.summary()
