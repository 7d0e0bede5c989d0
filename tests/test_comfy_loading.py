"""The shipped demo teacher through ComfyUI's own UNETLoader (needs a ComfyUI checkout; skips without one).

ComfyUI is looked for at $COMFYUI_PATH, then ~/ComfyUI. The test imports it in-process on the CPU.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

from xslim_core.demo_model import latents
from xslim_core.demo_model.teacher import WEIGHTS_DIR, default_weights_path, load_teacher, velocity

COMFY = os.environ.get("COMFYUI_PATH") or os.path.expanduser("~/ComfyUI")


def import_comfy():
    if not os.path.isdir(os.path.join(COMFY, "comfy")):
        pytest.skip(f"no ComfyUI checkout at {COMFY} (set COMFYUI_PATH)")
    if COMFY not in sys.path:
        sys.path.insert(0, COMFY)
    try:
        import comfy.cli_args

        comfy.cli_args.args.cpu = True
        import comfy.sd  # noqa: F401
        import folder_paths
    except Exception as err:  # a ComfyUI whose requirements are not installed in this environment
        pytest.skip(f"ComfyUI at {COMFY} does not import in this environment: {err!r}")
    return folder_paths


@pytest.mark.skipif(not os.path.exists(default_weights_path()), reason="the demo teacher weights are not built yet")
def test_unetloader_detects_the_demo_teacher_and_computes_what_diffusers_computes():
    folder_paths = import_comfy()
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
