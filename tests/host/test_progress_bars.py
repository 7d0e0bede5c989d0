"""ComfyUI's progress bar on the pack's long nodes, seen through ComfyUI's own global progress hook (what the
server forwards to the frontend): X-Slim Compare and 1.x Student Compare count their sampling runs, X-Slim Profile
its steps, and each bar ends at its total."""

from __future__ import annotations

import os

import pytest
import torch

import comfy_env as ce


@pytest.fixture()
def progress(pack):
    """Every (value, total) ComfyUI's progress bars report while the test runs."""
    import comfy.utils

    seen = []
    before = comfy.utils.PROGRESS_BAR_HOOK
    comfy.utils.set_progress_bar_global_hook(lambda value, total, preview, *a, **k: seen.append((value, total)))
    yield seen
    comfy.utils.set_progress_bar_global_hook(before)


def assert_counts_up_to(seen, total):
    assert seen, "no progress reported"
    values = [v for v, t in seen if t == total]
    assert values and values == sorted(values) and values[-1] == total, seen
    assert len(values) > 1, seen  # it moved on the way, not only at the end


def test_xslim_compare_counts_its_sampling_runs(progress):
    from comfyui_xslim.nodes import xslim_nodes

    model = ce.tiny_model("sd3")
    latent = {"samples": torch.zeros(ce.latent_shape("sd3", 1, 16))}
    xslim_nodes.XSlimCompare.execute(model, ce.conditioning("sd3", 1), ce.conditioning("sd3", 2), latent, 0, 6, 2.0,
                                     "euler", "simple", "slow\nfast")
    assert_counts_up_to(progress, 1 + xslim_nodes.COMPARE_ROUNDS * 3)  # warm-up, then rounds of uncached + 2 lines
    assert {t for _, t in progress} == {1 + xslim_nodes.COMPARE_ROUNDS * 3}  # one bar: no inner bar resets it


def test_xslim_profile_counts_its_steps(progress, user_dir):
    from comfyui_xslim.nodes import xslim_nodes

    model = ce.tiny_model("sd3")
    latent = {"samples": torch.zeros(ce.latent_shape("sd3", 1, 16))}
    xslim_nodes.XSlimProfile.execute(model, ce.conditioning("sd3", 1), ce.conditioning("sd3", 2), latent, 0, 7, 2.0,
                                     "euler", "simple", "progress")
    assert_counts_up_to(progress, 7)  # one update per step; what reaches the hook ComfyUI may thin out (0.28 throttles by time)


def test_student_compare_counts_its_sampling_runs(progress):
    import comfy.sd

    from comfyui_xslim.nodes import student_nodes, xslim_nodes
    from xslim_demo.teacher import CLASSES, WEIGHTS_DIR

    teacher = comfy.sd.load_diffusion_model(os.path.join(WEIGHTS_DIR, "demo_teacher.safetensors"))
    student = student_nodes.LoadStudent.execute(teacher, "student_1x_175.safetensors", "strict").args[0]
    pos = xslim_nodes.XSlimDemoClass.execute(CLASSES[7]).args[0]
    neg = xslim_nodes.XSlimDemoClass.execute("unconditional").args[0]
    latent = {"samples": torch.zeros(1, 16, 1, 8, 8)}
    progress.clear()
    student_nodes.StudentCompare.execute(teacher, student, pos, neg, latent, 0, 4, 2.0, "euler", "simple", "fast")
    total = 3 * (1 + xslim_nodes.COMPARE_ROUNDS)  # teacher, teacher + X-Slim, student: warm-up and rounds each
    assert_counts_up_to(progress, total)
    assert {t for _, t in progress} == {total}  # the student's own per-step bar stays out of the Compare's
