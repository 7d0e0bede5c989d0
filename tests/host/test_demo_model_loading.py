"""The shipped demo teacher through ComfyUI's own UNETLoader (needs a ComfyUI checkout; skips without one).

ComfyUI is found and imported by tests/host/comfy_env.py.
"""

from __future__ import annotations

import os

import pytest
import torch

from xslim_demo import latents
from xslim_demo.teacher import WEIGHTS_DIR, default_weights_path, load_teacher, velocity


@pytest.mark.skipif(not os.path.exists(default_weights_path()), reason="the demo teacher weights are not built yet")
def test_unetloader_detects_the_demo_teacher_and_computes_what_diffusers_computes():
    import folder_paths
    import comfy.sd

    folder_paths.add_model_folder_path("diffusion_models", WEIGHTS_DIR)
    path = folder_paths.get_full_path_or_raise("diffusion_models", "demo_teacher.safetensors")
    patcher = comfy.sd.load_diffusion_model(path)  # the body of UNETLoader.load_unet for weight_dtype "default"
    assert type(patcher.model).__name__ == "HunyuanVideo"
    net = patcher.model.diffusion_model
    teacher = load_teacher()
    labels = torch.tensor([0, 5, 9, 10])
    context, pooled = teacher.conditioner(labels)
    x = torch.randn(4, *latents.LATENT_SHAPE, generator=torch.Generator().manual_seed(0))
    sigma = torch.tensor([0.9, 0.5, 0.2, 0.7])
    with torch.no_grad():
        expected = velocity(teacher.model, teacher.conditioner, x, sigma, labels)
        got = net(x, sigma * 1000.0, context, y=pooled)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
