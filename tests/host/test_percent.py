"""start/end percent mean what they mean in ComfyUI's core nodes: the same percent selects the same first and
last step as core EasyCache's (its own class, on the same model sampling with a shift)."""

from __future__ import annotations

import pytest
import torch

import comfy_env as ce


@pytest.mark.parametrize("shift", [1.0, 3.0])
@pytest.mark.parametrize("start,end", [(0.2, 0.9), (0.45, 0.7), (0.6, 1.0)])
def test_the_same_percent_selects_the_same_steps_as_easycache(pack, shift, start, end):
    import comfy.samplers
    from comfy_extras.nodes_easycache import EasyCacheHolder
    from comfy_extras.nodes_model_advanced import ModelSamplingSD3

    from comfyui_xslim.nodes.host import comfy_percent_window
    from xslim_core import XSlimConfig
    from xslim_core.schedule import eligible_steps

    model = ModelSamplingSD3().patch(ce.tiny_model("sd3"), shift)[0]
    sampling = model.get_model_object("model_sampling")
    sigmas = comfy.samplers.calculate_sigmas(sampling, "simple", 30).tolist()
    easy = EasyCacheHolder(0.2, start, end, subsample_factor=8, offload_cache_diff=False).prepare_timesteps(sampling)
    theirs = [bool(easy.should_do_easycache(torch.tensor([s]))) and not easy.is_past_end_timestep(torch.tensor([s])) for s in sigmas[:-1]]
    config = comfy_percent_window(XSlimConfig(mode="online", start_percent=start, end_percent=end, first_full_steps=0, last_full_steps=0), sampling, sigmas)
    ours = eligible_steps(sigmas, config)
    assert ours == theirs and any(ours)  # the same first and last step, and every step between


def test_a_window_that_holds_no_step_runs_uncached(pack):
    from comfy_extras.nodes_model_advanced import ModelSamplingSD3

    from comfyui_xslim.nodes.host import comfy_percent_window
    from xslim_core import XSlimConfig

    sampling = ModelSamplingSD3().patch(ce.tiny_model("sd3"), 3.0)[0].get_model_object("model_sampling")
    config = comfy_percent_window(XSlimConfig(mode="online", start_percent=0.5, end_percent=0.6), sampling, [0.2, 0.1, 0.0])
    assert config.mode == "off"
