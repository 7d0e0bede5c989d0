"""1.x-Distill on ComfyUI's own model classes (tiny FLUX, SD3/MMDiT and HunyuanVideo built by ComfyUI's
supported_models), supplied by the host layer (nodes/distill_host.py) - distill_core itself never imports
ComfyUI. A short Stage I with cache co-training, a 4-step reference and Stage II complete with LoRA on one
shared base; the exported student keeps ComfyUI's key names, loads from a students folder through the real
*Load 1.x Student* node (strict base check) and samples through *1.x Student KSampler* at the effective NFE its
file declares (and through distill_host's own loader, counted per block); the ComfyUI velocity equals
diffusers' on the demo teacher."""

from __future__ import annotations

import pytest
import torch

import comfy_env as ce


@pytest.fixture(scope="module")
def host():
    reason = ce.import_comfy()
    if reason:
        pytest.skip(reason)
    ce.load_pack()
    from distill_core.conditioning import Conditioning, encode_prompt_set
    from distill_core.config import RunConfig
    from distill_core.runtime import run_training
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
    # the signature Load 1.x Student's strict check compares against, taken as the ComfyUI worker's loader takes it
    # (distill_host.load_comfy_file_teacher: the diffusion model's own state dict, before training)
    from distill_core.identity import weights_signature

    base = {"hash": f"tiny-{family}", "name": f"tiny {family}", "signature": weights_signature(dm.state_dict())}
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


def test_the_merged_student_differs_from_the_teacher_only_where_lora_trained(trained):
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


@pytest.fixture()
def students_dir(tmp_path):
    """A user's models/students folder (a temporary one), registered the way the pack registers its own."""
    import folder_paths

    from comfyui_xslim.nodes.student import register_students_folder

    register_students_folder()
    folder_paths.add_model_folder_path("students", str(tmp_path), is_default=True)
    yield tmp_path
    folder_paths.folder_names_and_paths["students"][0].remove(str(tmp_path))


def test_the_trained_student_loads_through_the_student_nodes_and_samples_at_its_declared_nfe(trained, students_dir):
    """The exported file, as a user gets it: in models/students, through Load 1.x Student (strict base check) and
    1.x Student KSampler on ComfyUI's own model patcher, as a graph runs them."""
    import shutil

    from safetensors import safe_open

    from comfyui_xslim.nodes import student_nodes
    from comfyui_xslim.nodes.runner import last_report

    family, _, results, _, blocks = trained
    name = f"trained_{family}.safetensors"
    shutil.copy(results[2]["student"], students_dir / name)
    base = ce.tiny_model(family)  # a fresh copy of the base (the same seed), as a loader node would give it
    student = student_nodes.LoadStudent.execute(base, name, "strict").args[0]
    positive = ce.conditioning(family, 1)
    latent = {"samples": torch.zeros(ce.latent_shape(family, 2, 8))}
    out = student_nodes.StudentKSampler.execute(student, positive, latent, 5).args[0]["samples"]
    assert out.shape == latent["samples"].shape and torch.isfinite(out).all()
    with safe_open(str(students_dir / name), framework="pt") as f:
        declared = float(f.metadata()["effective_nfe"])
    stats = last_report(student).stats
    assert stats.num_blocks == blocks
    assert stats.effective_nfe == pytest.approx(declared, abs=1e-4) == pytest.approx(1 + (blocks - 1) / blocks, abs=1e-4)
    assert not base.patches  # the base patcher is untouched: the student went onto a clone


def test_comfyuis_demo_teacher_class_gives_the_diffusers_velocity(host):
    """The demo teacher loaded by ComfyUI (its HunyuanVideo class) and by diffusers: one velocity."""
    distill_host = host[0]
    import comfy.sd
    from xslim_demo.distill import load_demo_teacher
    from xslim_demo.teacher import default_weights_path

    diffusers_teacher = load_demo_teacher()
    patcher = comfy.sd.load_diffusion_model(default_weights_path())
    flow = distill_host.ComfyFlowModel(patcher.model.diffusion_model.float(), (16, 1, 8, 8))
    x = torch.randn(3, 16, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    sigma = torch.tensor([0.9, 0.5, 0.1])
    cond = diffusers_teacher.prompts.batch(torch.tensor([0, 4, 9]))
    with torch.no_grad():
        torch.testing.assert_close(flow(x, sigma, cond), diffusers_teacher.flow(x, sigma, cond), rtol=2e-4, atol=2e-4)
    assert flow.text_dims == diffusers_teacher.flow.text_dims
