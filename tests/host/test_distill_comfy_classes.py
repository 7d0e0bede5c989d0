"""1.x-Distill on ComfyUI's own model classes (tiny FLUX, SD3/MMDiT and HunyuanVideo built by ComfyUI's
supported_models), supplied by the host layer (nodes/distill_host.py) - distill_core itself never imports
ComfyUI. A short Stage I with cache co-training, a 4-step reference and Stage II complete with LoRA on one
shared base; the exported student keeps ComfyUI's key names, loads through *Load 1.x Student* and samples
in ComfyUI at its declared effective NFE; the ComfyUI velocity equals diffusers' on the demo teacher."""

from __future__ import annotations

import os

import pytest
import torch

import comfy_env as ce


@pytest.fixture(scope="module")
def host():
    reason = ce.import_comfy()
    if reason:
        pytest.skip(reason)
    ce.load_pack()
    from comfyui_xslim.distill_core.conditioning import Conditioning, encode_prompt_set
    from comfyui_xslim.distill_core.config import RunConfig
    from comfyui_xslim.distill_core.runtime import run_training
    from comfyui_xslim.nodes import distill_host

    return distill_host, run_training, RunConfig, Conditioning, encode_prompt_set


SHAPES = {"flux": (16, 8, 8), "sd3": (16, 8, 8), "hunyuan_video": (16, 1, 8, 8)}


def prompt_set(host, family):
    _, _, _, Conditioning, encode_prompt_set = host

    def encode(prompts):
        g = [torch.Generator().manual_seed(sum(map(ord, p))) for p in prompts]
        return Conditioning(torch.stack([torch.randn(6, 64, generator=x) for x in g]),
                            torch.stack([torch.randn(ce.POOLED[family], generator=x) for x in g]))

    return encode_prompt_set(["a red cube", "a blue sphere", "a green cone"], encode)


@pytest.fixture(scope="module", params=list(SHAPES))
def trained(request, host, tmp_path_factory):
    distill_host, run_training, RunConfig, _, _ = host
    family = request.param
    patcher = ce.tiny_model(family)
    dm = patcher.model.diffusion_model
    prompts = prompt_set(host, family)
    root = tmp_path_factory.mktemp(f"comfy_{family}")
    base = {"hash": f"tiny-{family}", "name": f"tiny {family}"}
    blocks = len(distill_host.comfy_blocks(dm))

    def teacher():
        return distill_host.comfy_teacher(dm, SHAPES[family], prompts, base)

    common = dict(lora_rank=4, batch_size=2, checkpoint_every=2, preview_every=0, threads=1)
    s1 = run_training(RunConfig(run_dir=str(root / "s1"), iterations=3, stage1={"cache_first": 1, "cache_last": 1, "lr_student": 1e-3},
                                **common), teacher=teacher())
    ref = run_training(RunConfig(run_dir=str(root / "ref"), iterations=2, stage1={"steps": 4}, **common), teacher=teacher())
    s2 = run_training(RunConfig(run_dir=str(root / "s2"), stage="stage2", iterations=3, init_student=s1["student"],
                                reference=ref["student"], stage2={"cache_first": 1, "cache_last": 1, "disc_blocks": [0, blocks - 1],
                                                                  "disc_warmup": 1, "comp_warmup": 1, "g_every": 2}, **common),
                      teacher=teacher())
    return family, patcher, [s1, ref, s2], prompts, blocks


def test_stage1_reference_and_stage2_complete_on_comfyuis_classes(trained):
    family, patcher, results, _, _ = trained
    assert [r["status"] for r in results] == ["done"] * 3, results
    from safetensors import safe_open

    with safe_open(results[2]["student"], framework="pt") as f:
        meta, keys = f.metadata(), set(f.keys())
    assert meta["model_keys"] == "comfy" and meta["base_family"] == family
    names = {f"model.{k}" for k in ce.tiny_model(family).model.diffusion_model.state_dict()}
    assert {k for k in keys if k.startswith("model.")} == names  # ComfyUI's own names, the LoRA merged in


def test_the_merged_student_differs_from_the_teacher_only_where_lora_trained(trained, host):
    distill_host = host[0]
    family, patcher, results, prompts, _ = trained
    from safetensors.torch import load_file

    student = {k[len("model."):]: v for k, v in load_file(results[0]["student"]).items() if k.startswith("model.")}
    teacher = ce.tiny_model(family).model.diffusion_model.state_dict()  # the same seed: the base's weights
    changed = {k for k in teacher if not torch.equal(teacher[k], student[k])}
    assert changed and all(torch.equal(teacher[k], student[k]) for k in teacher if k not in changed)
    assert all(k.endswith(".weight") and any(p in k for p in ("attn", "mlp", "linear")) for k in changed), sorted(changed)[:5]


def test_the_student_samples_at_its_declared_nfe_on_the_host_class(trained, host):
    distill_host = host[0]
    family, patcher, results, prompts, blocks = trained
    student = distill_host.load_comfy_student(results[2]["student"], patcher.model.diffusion_model, SHAPES[family])
    calls = []
    def first_layer(block):  # a layer each block runs as a module call (ComfyUI calls attention parts directly)
        if hasattr(block, "x_block"):
            return block.x_block.attn.qkv
        return block.img_attn.qkv if hasattr(block, "img_attn") else block.linear1

    parts = [first_layer(spec.module) for spec in student.net.blocks()]
    hooks = [p.register_forward_pre_hook(lambda *a: calls.append(1)) for p in parts]
    try:
        out = student.sample(torch.randn(2, *SHAPES[family]), prompts.batch(torch.tensor([0, 2])))
    finally:
        for h in hooks:
            h.remove()
    assert torch.isfinite(out).all()
    assert len(calls) / blocks == pytest.approx(student.effective_nfe) == pytest.approx(1 + (blocks - 1) / blocks)


def test_comfyuis_demo_teacher_class_gives_the_diffusers_velocity(host):
    """The demo teacher loaded by ComfyUI (its HunyuanVideo class) and by diffusers: one velocity."""
    distill_host = host[0]
    import comfy.sd
    from comfyui_xslim.xslim_lab.demo_model.distill import load_demo_teacher
    from comfyui_xslim.xslim_lab.demo_model.teacher import default_weights_path

    diffusers_teacher = load_demo_teacher()
    patcher = comfy.sd.load_diffusion_model(default_weights_path())
    flow = distill_host.ComfyFlowModel(patcher.model.diffusion_model.float(), (16, 1, 8, 8))
    x = torch.randn(3, 16, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    sigma = torch.tensor([0.9, 0.5, 0.1])
    cond = diffusers_teacher.prompts.batch(torch.tensor([0, 4, 9]))
    with torch.no_grad():
        torch.testing.assert_close(flow(x, sigma, cond), diffusers_teacher.flow(x, sigma, cond), rtol=2e-4, atol=2e-4)
    assert flow.text_dims == diffusers_teacher.flow.text_dims
