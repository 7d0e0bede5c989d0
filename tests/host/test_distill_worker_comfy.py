"""The background worker distils a ComfyUI model file the text-family way (what *1.x-Distill Train* does for
SD3/FLUX/HunyuanVideo): prompts encoded once by a CLIP-shaped encoder through the node's own encoder code,
the worker process bootstrapped with ComfyUI importable, the file loaded by ComfyUI's loader into ComfyUI's
class, LoRA training on it, and a student with ComfyUI key names that *Load 1.x Student* loads and samples
exactly as the trainer's own sampler does. The model is the demo teacher file (a HunyuanVideo DiT; ComfyUI's
detector needs 128-wide heads, so it is the only tiny file ComfyUI itself loads); its class table plays the
text encoder."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import comfy_env as ce

DEMO_SHAPE = (16, 1, 8, 8)


@pytest.fixture(scope="module")
def env():
    reason = ce.import_comfy()
    if reason:
        pytest.skip(reason)
    ce.load_pack()
    from xslim_demo.teacher import CLASSES, classes_path, default_weights_path

    return CLASSES, classes_path, default_weights_path


class TableClip:
    """A CLIP-shaped encoder (ComfyUI's tokenize / encode_from_tokens): class names -> the demo's class table."""

    def __init__(self, table, classes):
        self.table, self.classes = table, classes

    def tokenize(self, text):
        return self.classes.index(text) if text in self.classes else len(self.classes)  # "": the unconditional row

    def encode_from_tokens(self, tokens, return_pooled=False):
        return self.table["context"][tokens][None], self.table["pooled"][tokens][None]


@pytest.fixture(scope="module")
def trained(env, tmp_path_factory):
    CLASSES, classes_path, default_weights_path = env
    from comfyui_xslim.nodes.jobs import WORKER_SCRIPT
    from comfyui_xslim.nodes.train_nodes import encode_prompts

    prompts = encode_prompts(TableClip(load_file(classes_path(default_weights_path())), CLASSES), ["Trouser", "Bag", "Sneaker"])
    run = tmp_path_factory.mktemp("worker_comfy") / "run"
    run.mkdir()
    prompts.save(str(run / "conditioning.safetensors"))
    config = {"stage": "stage1", "teacher": default_weights_path(), "iterations": 6, "batch_size": 2, "checkpoint_every": 3,
              "preview_every": 3, "threads": 1, "device": "cpu", "lora_rank": 4, "prompts": "conditioning.safetensors",
              "teacher_loader": "comfyui_xslim.nodes.distill_host:load_comfy_file_teacher",
              "teacher_options": {"latent_shape": list(DEMO_SHAPE), "name": "demo_teacher.safetensors"},
              "stage1": {"steps": 2, "cache_first": 4, "cache_last": 6, "lr_student": 1e-3, "lr_fake": 1e-3}}
    job = {"format": "xslim-distill-job/1", "config": config, "base": {"name": "demo_teacher.safetensors", "family": "hunyuan_video"},
           "gpu": {"mode": "exclusive", "device": "cpu"}, "export": {"overwrite": False},
           "bootstrap": {"sys_path": [ce.COMFY], "packages": {"comfyui_xslim": ce.REPO}}}
    (run / "job.json").write_text(json.dumps(job))
    out = subprocess.run([sys.executable, WORKER_SCRIPT, "--run-dir", str(run)], cwd=ce.REPO, capture_output=True,
                         text=True, timeout=900, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    return run, out, prompts


def test_the_worker_trains_comfyuis_class_from_the_file_and_exports_comfy_keys(trained):
    run, out, prompts = trained
    status = json.loads((run / "status.json").read_text())
    assert out.returncode == 0 and status["state"] == "done", (status, out.stderr[-3000:])
    assert "comfyui_xslim" not in out.stderr or "Traceback" not in out.stderr
    with safe_open(str(run / "student.safetensors"), framework="pt") as f:
        meta = f.metadata()
    assert meta["model_keys"] == "comfy" and meta["base_family"] == "hunyuan_video" and meta["lora_rank"] == "4"
    assert json.loads(meta["cached_blocks"]) == [4, 6]
    assert os.listdir(run / "previews")  # the latent preview of a family without a decoder here
    fingerprint = json.loads((run / "fingerprint.json").read_text())
    assert fingerprint["base"]["prompts"] == prompts.content_hash()


def test_load_1x_student_samples_it_exactly_as_the_trainers_sampler(trained, env):
    import comfy.sd

    from comfyui_xslim.nodes import distill_host, student_nodes, xslim_nodes
    from xslim_demo.latents import COMFY_LATENT_SCALE

    CLASSES, _, default_weights_path = env
    run, _, prompts = trained
    base = comfy.sd.load_diffusion_model(default_weights_path())
    student_model, header = __import__("comfyui_xslim.nodes.student", fromlist=["x"]).load_student_model(base, str(run / "student.safetensors"))
    positive = xslim_nodes.XSlimDemoClass.execute("Trouser").args[0]
    latent = {"samples": torch.zeros(2, *DEMO_SHAPE)}
    got = student_nodes.StudentKSampler.execute(student_model, positive, latent, 7, None).args[0]["samples"]
    torch.manual_seed(7)  # KSampler's noise for seed 7
    noise = torch.randn(2, *DEMO_SHAPE)
    template = comfy.sd.load_diffusion_model(default_weights_path()).model.diffusion_model.float()
    ours = distill_host.load_comfy_student(str(run / "student.safetensors"), template, DEMO_SHAPE)
    expected = ours.sample(noise, prompts.batch(torch.tensor([0, 0])))  # row 0 is "Trouser"
    torch.testing.assert_close(got * COMFY_LATENT_SCALE, expected, rtol=1e-4, atol=1e-4)
    assert header.effective_nfe == pytest.approx(1 + 9 / 12)
