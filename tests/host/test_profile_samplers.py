"""The X-Slim Profile node needs one model evaluation per step: samplers that evaluate between steps (midpoints)
or twice at one step's sigma (Heun's corrector lands on the next step) are refused with a message that names the
sampler and what to use; one-evaluation-per-step samplers give a profile that the cache node then uses."""

from __future__ import annotations

import json

import pytest
import torch

import comfy_env as ce

FAMILY, SIDE, STEPS = "flux", 16, 8


def profile(model, sampler: str, name: str):
    from comfyui_xslim.nodes.xslim_nodes import XSlimProfile

    pos, neg = ce.conditioning(FAMILY, 1), ce.conditioning(FAMILY, 2, length=4)
    latent = {"samples": torch.zeros(ce.latent_shape(FAMILY, 1, SIDE))}
    return XSlimProfile.execute(model, pos, neg, latent, 0, STEPS, 2.0, sampler, "simple", name).args


@pytest.fixture(scope="module")
def model(pack):
    return ce.tiny_model(FAMILY)


@pytest.mark.parametrize("sampler", ["heun", "dpmpp_2s_ancestral", "dpmpp_sde"])
def test_samplers_with_more_than_one_evaluation_per_step_are_refused_clearly(model, user_dir, sampler):
    from comfyui_xslim.nodes.host import XSlimSetupError

    with pytest.raises(XSlimSetupError, match=rf"sampler '{sampler}' evaluates the model more than once per step.*euler"):
        profile(model, sampler, f"tiny-{sampler}")
    assert not list(user_dir.rglob("*.json"))  # nothing half-right was saved


@pytest.mark.parametrize("sampler", ["euler", "dpmpp_2m", "res_multistep"])
def test_one_evaluation_per_step_samplers_profile_every_step(model, user_dir, sampler):
    _, path = profile(model, sampler, f"tiny-{sampler}")
    saved = json.loads(open(path).read())
    assert len(saved["step_change"]) == STEPS and len(saved["sigmas"]) == STEPS + 1
    assert all(v >= 0 for v in saved["step_change"][1:]) and sum(saved["step_change"][1:]) > 0
