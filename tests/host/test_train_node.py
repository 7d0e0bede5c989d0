"""The *1.x-Distill Train* node in-process in a real ComfyUI, with ComfyUI's own CLIP class: what a prompt writes
into the run folder and in which order. Auto settings resolve to each family's defaults (explicit values stay);
a resume with another prompt list or another CLIP is refused naming the prompts; in exclusive mode ComfyUI's
models are unloaded after the CLIP encoded the prompts, just before the worker starts; the prompt never hashes
the model file. And the worker itself, bootstrapped with ComfyUI importable, trains without ever importing
ComfyUI's ``server`` module."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

import comfy_env as ce

TINY_CLIP = {"hidden_act": "quick_gelu", "hidden_size": 32, "intermediate_size": 64, "layer_norm_eps": 1e-5,
             "max_position_embeddings": 77, "num_attention_heads": 2, "num_hidden_layers": 2, "vocab_size": 49408,
             "projection_dim": 32, "bos_token_id": 0, "eos_token_id": 49407, "pad_token_id": 1}
FILES = {  # header-only stand-ins: the node reads tensor names only; the worker never starts here
    "sd3_large_like.safetensors": [f"joint_blocks.{i}.x_block.attn.qkv.weight" for i in range(38)],
    "flux_like.safetensors": [f"double_blocks.{i}.img_attn.qkv.weight" for i in range(19)]
    + [f"single_blocks.{i}.linear1.weight" for i in range(38)],
    "hunyuan_like.safetensors": [f"double_blocks.{i}.img_attn_qkv.weight" for i in range(20)]
    + [f"single_blocks.{i}.linear1.weight" for i in range(40)] + ["txt_in.individual_token_refiner.blocks.0.norm1.weight"],
}


def tiny_clip(seed: int = 0):
    """ComfyUI's CLIP class around a tiny CLIP-L (random weights, the real tokenizer)."""
    import comfy.sd
    import comfy.sd1_clip

    class Target:
        params = {}
        clip = functools.partial(comfy.sd1_clip.SD1ClipModel, clip_model=comfy.sd1_clip.SDClipModel, textmodel_json_config=TINY_CLIP)
        tokenizer = comfy.sd1_clip.SD1Tokenizer

    clip = comfy.sd.CLIP(target=Target())
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in clip.cond_stage_model.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    return clip


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    ce.load_pack()
    import folder_paths

    from xslim_demo.teacher import default_weights_path

    folder = tmp_path_factory.mktemp("train_node_models")
    for name, keys in FILES.items():
        save_file({k: torch.zeros(1) for k in keys}, str(folder / name))
    os.symlink(default_weights_path(), folder / "demo_teacher.safetensors")
    folder_paths.add_model_folder_path("diffusion_models", str(folder))
    yield folder
    folder_paths.folder_names_and_paths["diffusion_models"][0].remove(str(folder))


@pytest.fixture()
def node(models, tmp_path, monkeypatch):
    """The Train node with its job manager in a temporary folder; starting a worker, unloading ComfyUI's models
    and hashing a file are recorded (hashing must not happen: the prompt would hold for a big file)."""
    import comfy.model_management as mm

    from distill_core import jobfiles
    from comfyui_xslim.nodes import jobs, train_nodes

    events = []
    manager = jobs.JobManager(root=str(tmp_path / "jobs"))
    monkeypatch.setattr(train_nodes, "manager", lambda: manager)
    monkeypatch.setattr(jobs, "students_dir", lambda: str(tmp_path))
    monkeypatch.setattr(jobs.JobManager, "_spawn", lambda self, job, devices: events.append("spawn"))
    monkeypatch.setattr(mm, "unload_all_models", lambda: events.append("unload"))

    def no_hash(path):
        raise AssertionError(f"the prompt hashed {path}")

    monkeypatch.setattr(jobfiles, "content_hash", no_hash)

    def queue(run_name, model="sd3_large_like.safetensors", clip=None, **widgets):
        inputs = dict(model_name=model, prompts="a lighthouse at dusk\na bowl of ramen", run_name=run_name, iterations=10,
                      batch_size=0, student_steps=2, cached_blocks="auto", guidance_scale=0.0, guidance_switch=0.96,
                      lr_student=4e-5, lr_fake=3.2e-4, checkpoint_every=5, preview_every=5, seed=0, gpu_sharing="exclusive",
                      device="cpu", memory_fraction=0.5, cpu_threads=1, overwrite_student=False, clip=clip)
        inputs.update(widgets)
        return train_nodes.DistillTrain.execute(**inputs).args[0]

    def spec(run_name):
        return jobfiles.read_json(os.path.join(manager.root, run_name, jobfiles.JOB))

    return queue, spec, events, train_nodes.JobError


def recording(clip, events):
    """The CLIP, noting each encode in ``events``."""
    encode = clip.encode_from_tokens

    def noted(*args, **kwargs):
        events.append("encode")
        return encode(*args, **kwargs)

    clip.encode_from_tokens = noted
    return clip


@pytest.mark.parametrize("model, batch, cached, cfg", [
    ("sd3_large_like.safetensors", 1, (14, 22), 4.5),  # a quarter of 38 joint blocks, in the middle
    ("flux_like.safetensors", 1, (21, 34), 1.0),  # FLUX's guidance is an input of the model: no CFG on top
    ("hunyuan_like.safetensors", 1, (22, 36), 1.0),
    ("demo_teacher.safetensors", 8, (4, 6), 2.0),  # the demo's measured recipe
])
def test_auto_settings_take_the_familys_defaults(node, model, batch, cached, cfg):
    queue, spec, _, _ = node
    queue("auto", model=model, clip=tiny_clip(), prompts="all classes" if model.startswith("demo") else "a red fox")
    config = spec("auto")["config"]
    assert (config["batch_size"], config["stage1"]["cache_first"], config["stage1"]["cache_last"]) == (batch, *cached)
    assert config["stage1"]["guidance_scale"] == cfg


def test_explicit_settings_stay_as_they_were_set(node):
    queue, spec, _, JobError = node
    queue("explicit", model="demo_teacher.safetensors", prompts="all classes", batch_size=4, cached_blocks="3-5", guidance_scale=3.0)
    stage1 = spec("explicit")["config"]["stage1"]
    assert (spec("explicit")["config"]["batch_size"], stage1["cache_first"], stage1["cache_last"], stage1["guidance_scale"]) == (4, 3, 5, 3.0)
    queue("one-step", model="demo_teacher.safetensors", prompts="all classes", student_steps=1)  # auto: nothing to reuse
    assert spec("one-step")["config"]["stage1"]["cache_first"] is None
    with pytest.raises(JobError, match="guidance_scale 0.5 is below 1; use 0 for the model family's default"):
        queue("low-cfg", model="demo_teacher.safetensors", prompts="all classes", guidance_scale=0.5)


@pytest.mark.bad_input("clear error")
def test_a_resume_with_other_prompts_or_another_clip_is_refused_naming_the_prompts(node, models, tmp_path):
    queue, spec, events, JobError = node
    clip = tiny_clip()
    queue("text", clip=clip)
    base = spec("text")["base"]
    assert base["size"] == os.path.getsize(models / "sd3_large_like.safetensors") and "hash" not in base  # no hashing here
    assert spec("text")["bootstrap"]["sys_path"] == [os.path.abspath(ce.COMFY)]  # the worker imports this ComfyUI
    encoded = os.stat(tmp_path / "jobs" / "text" / "conditioning.safetensors").st_mtime_ns
    refusals = [
        (dict(clip=clip, prompts="a lighthouse at dusk\na bowl of udon"), "prompts: the prompt list changed"),
        (dict(clip=tiny_clip(seed=1)), "prompts: another text encoder (clip input) encodes them"),
    ]
    layer = clip.clone()
    layer.clip_layer(-2)  # CLIP Set Last Layer: other conditioning from the same weights
    refusals.append((dict(clip=layer), "prompts: another text encoder"))
    lora = clip.clone()
    key = next(k for k in lora.get_key_patches() if k.endswith("fc1.weight"))
    lora.add_patches({key: ("diff", (torch.ones(lora.get_key_patches()[key][0][0].shape),))}, 0.5)
    refusals.append((dict(clip=lora), "prompts: another text encoder"))
    for widgets, expected in refusals:
        with pytest.raises(JobError) as err:
            queue("text", **widgets)
        assert expected in str(err.value) and "Choose a new run name" in str(err.value), str(err.value)
    assert events == ["unload", "spawn"]  # refused: nothing unloaded, nothing started
    assert queue("text", clip=clip.clone(), iterations=20) == "text"  # same prompts, same CLIP: resumed
    assert events == ["unload", "spawn", "unload", "spawn"]
    assert os.stat(tmp_path / "jobs" / "text" / "conditioning.safetensors").st_mtime_ns == encoded  # encoded once


def test_the_conditioning_file_keeps_the_prompts_it_was_encoded_from(node, tmp_path):
    queue, spec, _, _ = node
    queue("kept", clip=tiny_clip())
    path = tmp_path / "jobs" / "kept" / "conditioning.safetensors"
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        assert json.loads(f.metadata()["prompts"]) == ["a lighthouse at dusk", "a bowl of ramen"]


def test_exclusive_mode_unloads_after_the_clip_encoded_the_prompts_just_before_the_worker_starts(node):
    queue, _, events, _ = node
    queue("exclusive", clip=recording(tiny_clip(), events))
    assert events == ["encode", "encode", "encode", "unload", "spawn"]  # two prompts and the unconditional one
    events.clear()
    queue("shared", clip=recording(tiny_clip(), events), gpu_sharing="shared")
    assert events == ["encode", "encode", "encode", "spawn"]  # shared: ComfyUI keeps its models


def test_the_clips_identity_ignores_where_its_weights_are_and_sees_what_changes_its_encoding(models):
    from comfyui_xslim.nodes.train_nodes import clip_identity

    clip = tiny_clip()
    lora = clip.clone()
    key = next(k for k in lora.get_key_patches() if k.endswith("fc1.weight"))
    lora.add_patches({key: ("diff", (torch.ones(lora.get_key_patches()[key][0][0].shape),))}, 0.5)
    before = clip_identity(lora)
    lora.encode_from_tokens(lora.tokenize("a cat"))  # loads the CLIP and applies the patch to its weights
    assert clip_identity(lora) == before  # the unpatched originals are what counts
    assert clip_identity(clip.clone()) == clip_identity(clip) != before
    assert clip_identity(tiny_clip(seed=1)) != clip_identity(clip)


# -- the worker never imports ComfyUI's server -----------------------------------------------------------------
NO_SERVER = """
import os, sys
class NoServer:
    def find_spec(self, name, path=None, target=None):
        if name == "server" or name.startswith("server."):
            open(os.environ["XSLIM_SERVER_IMPORT"], "w").write(name)
            raise ImportError("ComfyUI's server module must not be imported by the worker")
        return None
sys.modules.pop("server", None)
sys.meta_path.insert(0, NoServer())
"""
# then the worker's entry script as `python SCRIPT ARGS...` would run it
RUN_SCRIPT = "import runpy; sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')"


class TableClip:
    """A CLIP-shaped encoder whose widths fit the demo teacher: class names -> the demo's class table."""

    def __init__(self, table, classes):
        self.table, self.classes = table, classes

    def tokenize(self, text):
        return self.classes.index(text) if text in self.classes else len(self.classes)

    def encode_from_tokens(self, tokens, return_pooled=False):
        return self.table["context"][tokens][None], self.table["pooled"][tokens][None]


def test_the_worker_trains_a_text_job_with_comfyuis_server_unimportable(models, tmp_path):
    """The text-family path (ComfyUI importable through job.json's bootstrap, the pack registered, ComfyUI's
    loader) is where an import of ``server`` could sneak in."""
    from comfyui_xslim.nodes.jobs import WORKER_SCRIPT
    from comfyui_xslim.nodes.train_nodes import encode_prompts
    from xslim_demo.teacher import CLASSES, classes_path, default_weights_path

    run = tmp_path / "run"
    run.mkdir()
    encode_prompts(TableClip(load_file(classes_path(default_weights_path())), CLASSES), ["Trouser", "Bag"]).save(str(run / "conditioning.safetensors"))
    config = {"stage": "stage1", "teacher": default_weights_path(), "iterations": 2, "batch_size": 1, "checkpoint_every": 2,
              "preview_every": 0, "threads": 1, "device": "cpu", "lora_rank": 4, "prompts": "conditioning.safetensors",
              "teacher_loader": "comfyui_xslim.nodes.distill_host:load_comfy_file_teacher",
              "teacher_options": {"latent_shape": [16, 1, 8, 8], "name": "demo_teacher.safetensors"},
              "stage1": {"steps": 2, "cache_first": 4, "cache_last": 6, "lr_student": 1e-3, "lr_fake": 1e-3}}
    job = {"format": "xslim-distill-job/1", "config": config, "base": {"name": "demo_teacher.safetensors", "family": "hunyuan_video"},
           "gpu": {"mode": "exclusive", "device": "cpu"}, "bootstrap": {"sys_path": [ce.COMFY], "packages": {"comfyui_xslim": ce.REPO}}}
    (run / "job.json").write_text(json.dumps(job))
    attempt = tmp_path / "server_import"
    out = subprocess.run([sys.executable, "-c", NO_SERVER + RUN_SCRIPT, WORKER_SCRIPT, "--run-dir", str(run)], cwd=ce.REPO, capture_output=True,
                         text=True, timeout=600, env={**os.environ, "CUDA_VISIBLE_DEVICES": "", "XSLIM_SERVER_IMPORT": str(attempt)})
    status = json.loads((run / "status.json").read_text())
    assert out.returncode == 0 and status["state"] == "done" and status["iteration"] == 2, (status, out.stderr[-3000:])
    assert not attempt.exists(), f"the worker tried to import {attempt.read_text()!r}"
