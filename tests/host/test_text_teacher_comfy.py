"""The text demo teacher (SD3-shaped, its own tiny text encoder) in a real ComfyUI: UNETLoader reads the shipped
file (diffusers keys, converted by ComfyUI itself) as SD3 and computes what diffusers computes; X-Slim Demo Text
Encode gives its conditioning and KSampler draws the class the prompt names; and the text path end to end: the
1.x-Distill Train node queued on it without a CLIP, its worker training LoRA adapters through ComfyUI's loader, the
student sampled through Load 1.x Student equal to distill_core's sampler."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import comfy_env as ce
from xslim_demo import text_teacher as tt
from xslim_demo.teacher import WEIGHTS_DIR

NAME = "demo_text_teacher.safetensors"
pytestmark = pytest.mark.skipif(not os.path.exists(tt.default_weights_path()), reason="the text demo teacher is not built yet")


@pytest.fixture(scope="module")
def text_teacher():
    import comfy.sd
    import folder_paths

    ce.load_pack()
    folder_paths.add_model_folder_path("diffusion_models", WEIGHTS_DIR)
    return comfy.sd.load_diffusion_model(folder_paths.get_full_path_or_raise("diffusion_models", NAME))


def encode(prompt: str):
    from comfyui_xslim.nodes.xslim_nodes import XSlimDemoText

    return XSlimDemoText.execute(prompt).args[0]


def test_unetloader_reads_the_text_teacher_as_sd3_and_computes_what_diffusers_computes(text_teacher):
    assert type(text_teacher.model).__name__ == "SD3"
    assert type(text_teacher.model.latent_format).__name__ == "SD3"
    teacher = tt.load_text_teacher()
    context, pooled = teacher.encode(["a sneaker", "an ankle boot", ""])
    x = torch.randn(3, *tt.LATENT_SHAPE, generator=torch.Generator().manual_seed(0))
    sigma = torch.tensor([0.9, 0.5, 0.2])
    with torch.no_grad():
        expected = teacher.model(hidden_states=x, timestep=sigma * 1000, encoder_hidden_states=context,
                                 pooled_projections=pooled, return_dict=False)[0]
        got = text_teacher.model.diffusion_model(x, sigma * 1000, context=context, y=pooled)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    # the node's conditioning is the shipped encoder's
    cond = encode("a photo of a bag")
    want_context, want_pooled = teacher.encode(["a photo of a bag"])
    torch.testing.assert_close(cond[0][0], want_context)
    torch.testing.assert_close(cond[0][1]["pooled_output"], want_pooled)


@pytest.mark.slow
def test_ksampler_draws_the_class_each_prompt_names(text_teacher):
    from comfyui_xslim.nodes.pictures import demo_decode
    from xslim_demo.classifier import load_classifier

    clf, _ = load_classifier()
    labels, images = list(range(10)), []
    for label in labels:
        latent = ce.sample(text_teacher, "sd3", steps=20, cfg=3.0, batch=2, side=8, seed=label,
                           positive=encode(tt.default_prompt(label)), negative=encode(""))
        images.append(demo_decode(latent))
    grey = torch.cat(images)[..., 0].unsqueeze(1)
    with torch.no_grad():
        predicted = clf.logits(grey).argmax(1)
    accuracy = (predicted == torch.tensor(labels).repeat_interleave(2)).float().mean().item()
    assert accuracy >= 0.7, predicted  # a sanity bound (20 steps, 2 samples a class); the card has the measured figures


NO_SERVER_RUN = (
    "import runpy, sys; sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')"
)


@pytest.mark.slow
def test_the_train_node_distils_it_without_a_clip_and_load_student_samples_the_result(text_teacher, tmp_path, monkeypatch):
    """Queue the Train node on the text teacher (no CLIP input: its own encoder encodes the prompt list), run the job
    it wrote with the pack's worker script (ComfyUI's loader, LoRA on the one base, cache co-training), then load
    the student onto UNETLoader's model with Load 1.x Student and sample it."""
    import folder_paths

    from comfyui_xslim.nodes import jobs, student_nodes, train_nodes
    from comfyui_xslim.nodes.student import register_students_folder
    from comfyui_xslim.nodes.runner import last_report
    from distill_core import jobfiles

    manager = jobs.JobManager(root=str(tmp_path / "jobs"))
    monkeypatch.setattr(train_nodes, "manager", lambda: manager)
    monkeypatch.setattr(jobs, "students_dir", lambda: str(tmp_path / "students"))
    monkeypatch.setattr(jobs.JobManager, "_spawn", lambda self, job, devices: None)  # the worker runs below
    inputs = dict(model_name=NAME, prompts="a sneaker\na photo of a bag\nan ankle boot", run_name="text-demo",
                  iterations=3, batch_size=2, student_steps=2, cached_blocks="auto", guidance_scale=0.0,
                  guidance_switch=0.96, lr_student=4e-4, lr_fake=3.2e-3, checkpoint_every=3, preview_every=0, seed=0,
                  gpu_sharing="exclusive", device="cpu", memory_fraction=0.5, cpu_threads=1, overwrite_student=False,
                  lora_rank=8)
    assert train_nodes.DistillTrain.execute(**inputs).args[0] == "text-demo"
    run = os.path.join(manager.root, "text-demo")
    job = jobfiles.read_json(os.path.join(run, jobfiles.JOB))
    config = job["config"]
    assert config["teacher_options"]["latent_shape"] == [16, 8, 8] and config["lora_rank"] == 8
    assert job["base"]["family"] == "sd3" and len(job["base"]["text_encoder"]) == 16
    out = subprocess.run([sys.executable, "-c", NO_SERVER_RUN, jobs.WORKER_SCRIPT, "--run-dir", run], cwd=ce.REPO,
                         capture_output=True, text=True, timeout=900, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    status = json.loads(open(os.path.join(run, "status.json")).read())
    assert out.returncode == 0 and status["state"] == "done", (status, out.stderr[-3000:])
    student_file = os.path.join(run, "student.safetensors")
    register_students_folder()
    folder_paths.add_model_folder_path("students", run)  # the run folder holds the job's student
    try:
        student = student_nodes.LoadStudent.execute(text_teacher, "student.safetensors", "strict").args[0]
    finally:
        folder_paths.folder_names_and_paths["students"][0].remove(run)
    latent = {"samples": torch.zeros(2, *tt.LATENT_SHAPE)}
    got = student_nodes.StudentKSampler.execute(student, encode("a sneaker"), latent, 7, None).args[0]["samples"]
    assert got.shape == (2, *tt.LATENT_SHAPE) and torch.isfinite(got).all()
    declared = float(_meta(student_file)["effective_nfe"])
    assert last_report(student).stats.effective_nfe == pytest.approx(declared, abs=1e-4) and 1.0 < declared < 2.0


def _meta(path: str) -> dict:
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        return dict(f.metadata() or {})
