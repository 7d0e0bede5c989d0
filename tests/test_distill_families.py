"""1.x-Distill on any family the model protocol knows: tiny random-weight diffusers SD3, FLUX and HunyuanVideo
transformers, text conditioning from a stored prompt set, student and fake score as LoRA adapters on one
shared base. Each runs Stage I (with cache co-training), a 4-step reference, Stage II, exports a student
and samples it at its declared effective NFE, counted by hooks on the blocks."""

from __future__ import annotations

import os

import pytest
import torch

from distill_core.conditioning import Conditioning, encode_prompt_set
from distill_core.config import RunConfig
from distill_core.models import load_diffusers_teacher
from distill_core.nets import build_roles
from distill_core.parallel import storage_bytes
from distill_core.runtime import run_training
from distill_core.student import load_student

LOADER = "distill_core.models:load_diffusers_teacher"


def tiny_sd3():
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=3, attention_head_dim=16,
                                 num_attention_heads=2, caption_projection_dim=32, joint_attention_dim=24,
                                 pooled_projection_dim=16, out_channels=4, pos_embed_max_size=8), (4, 8, 8), {}


def tiny_flux():
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=2, attention_head_dim=16,
                                  num_attention_heads=2, joint_attention_dim=24, pooled_projection_dim=16,
                                  guidance_embeds=True, axes_dims_rope=[4, 6, 6]), (16, 16), {"grid": [4, 4], "guidance": 3.5}


def tiny_hunyuan_video():
    from diffusers import HunyuanVideoTransformer3DModel

    return HunyuanVideoTransformer3DModel(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16,
                                          num_layers=1, num_single_layers=2, num_refiner_layers=1, mlp_ratio=2.0,
                                          patch_size=1, patch_size_t=1, qk_norm="rms_norm", guidance_embeds=True,
                                          text_embed_dim=24, pooled_projection_dim=16, rope_axes_dim=(4, 6, 6)), (4, 1, 4, 4), {}


FAMILIES = {"sd3": tiny_sd3, "flux": tiny_flux, "hunyuan_video": tiny_hunyuan_video}


def fake_text_encoder(width: int = 24, pooled: int = 16, tokens: int = 6):
    """A deterministic stand-in for a text encoder: each prompt's characters seed its embedding."""
    def encode(prompts: list[str]) -> Conditioning:
        rows = [torch.Generator().manual_seed(sum(map(ord, p)) + len(p)) for p in prompts]
        context = torch.stack([torch.randn(tokens, width, generator=g) for g in rows])
        return Conditioning(context, torch.stack([torch.randn(pooled, generator=g) for g in rows]), torch.ones(len(prompts), tokens))
    return encode


@pytest.fixture(scope="module", params=list(FAMILIES))
def family_run(request, tmp_path_factory):
    """One family distilled end to end (Stage I with co-training, 4-step reference, Stage II), LoRA rank 4."""
    torch.manual_seed(0)
    module, latent_shape, extra = FAMILIES[request.param]()
    root = tmp_path_factory.mktemp(request.param)
    model_dir = str(root / "transformer")
    module.save_pretrained(model_dir, safe_serialization=True)
    prompts = encode_prompt_set(["a red cube", "a blue sphere", "a green cone"], fake_text_encoder())
    prompts.save(str(root / "prompts.safetensors"))
    common = dict(teacher=model_dir, teacher_loader=LOADER, teacher_options={"latent_shape": list(latent_shape), "extra": extra},
                  prompts=str(root / "prompts.safetensors"), lora_rank=4, batch_size=2, checkpoint_every=2, preview_every=2, threads=1)
    blocks = module.config.num_layers + module.config.get("num_single_layers", 0)
    stage1 = RunConfig(run_dir=str(root / "stage1"), iterations=3, stage1={"cache_first": 1, "cache_last": 1, "lr_student": 1e-3}, **common)
    reference = RunConfig(run_dir=str(root / "ref"), iterations=2, stage1={"steps": 4}, **common)
    results = [run_training(stage1), run_training(reference)]
    stage2 = RunConfig(run_dir=str(root / "stage2"), stage="stage2", iterations=3, init_student=results[0]["student"],
                       reference=results[1]["student"], stage2={"cache_first": 1, "cache_last": 1, "disc_blocks": [0, blocks - 1],
                                                                "disc_warmup": 1, "comp_warmup": 1, "g_every": 2}, **common)
    results.append(run_training(stage2))
    return request.param, root, results, prompts, latent_shape, blocks


def test_a_short_stage1_reference_and_stage2_run_export_a_student(family_run):
    family, root, results, _, _, _ = family_run
    assert [r["status"] for r in results] == ["done"] * 3, results
    assert all(os.path.isfile(r["student"]) for r in results)
    assert os.listdir(root / "stage1" / "previews")  # a latent preview for a model without a decoder here
    student = load_student(results[2]["student"])
    assert student.meta["base_family"] == family and student.meta["lora_rank"] == "4"
    assert student.cache is not None and student.compensation is not None


def test_the_student_samples_at_its_declared_effective_nfe(family_run):
    _, _, results, prompts, latent_shape, blocks = family_run
    student = load_student(results[2]["student"])
    calls = []
    # on a part of each block: a skipped block is still called (its forward replaced) but computes nothing
    hooks = [spec.module.attn.register_forward_pre_hook(lambda *a: calls.append(1)) for spec in student.net.blocks()]
    try:
        out = student.sample(torch.randn(2, *latent_shape), prompts.batch(torch.tensor([0, 2])))
    finally:
        for h in hooks:
            h.remove()
    counted = len(calls) / blocks
    assert torch.isfinite(out).all() and out.shape == (2, *latent_shape)
    assert counted == pytest.approx(student.effective_nfe) and counted == pytest.approx(1 + (blocks - 1) / blocks)


def test_lora_training_holds_one_copy_of_the_base_weights(family_run):
    family, root, *_ = family_run
    def unique_storage_bytes(modules):  # parameters and buffers, shared storage counted once
        return storage_bytes([t for m in modules for t in list(m.parameters()) + list(m.buffers())])

    base_bytes = unique_storage_bytes([load_diffusers_teacher(str(root / "transformer"), (1,)).flow.module])
    lora_teacher = load_diffusers_teacher(str(root / "transformer"), (1,))
    shared = build_roles(lora_teacher.flow, lora_rank=4)
    full = build_roles(load_diffusers_teacher(str(root / "transformer"), (1,)).flow, lora_rank=0)
    lora_bytes = unique_storage_bytes([r.module for r in shared])
    full_bytes = unique_storage_bytes([r.module for r in full])
    adapters = sum(p.numel() * p.element_size() for r in shared[1:] for p in r.trainable())
    assert lora_bytes == base_bytes + adapters  # the base once, plus the two adapters
    assert full_bytes == pytest.approx(3 * base_bytes, rel=0.01)  # three full copies


def test_a_resume_with_another_prompt_set_is_refused(family_run, tmp_path):
    _, root, results, prompts, _, _ = family_run
    import json

    from distill_core.jobfiles import ResumeRefused

    other = encode_prompt_set(["a yellow torus"], fake_text_encoder())
    other.save(str(tmp_path / "other.safetensors"))
    config = json.load(open(root / "stage1" / "fingerprint.json"))
    assert config["base"]["prompts"] == prompts.content_hash()
    from distill_core.state import read_state  # the run's own configuration, as its checkpoint recorded it

    _, meta = read_state(str(root / "stage1" / "state.safetensors"))
    cfg = RunConfig.from_dict({**json.loads(meta["config"]), "prompts": str(tmp_path / "other.safetensors"), "iterations": 4})
    with pytest.raises(ResumeRefused, match="prompt set: hash"):
        run_training(cfg)


def test_optimizer_states_offloaded_to_the_cpu_train_bit_identically(tmp_path):
    """offload_optimizer keeps AdamW's moments and fp32 master weights in host memory; on the CPU that must be
    exactly the plain AdamW (a full-copy run, where the states are as large as the model)."""
    import json

    from safetensors.torch import load_file

    torch.manual_seed(0)
    module, shape, _ = tiny_sd3()
    module.save_pretrained(str(tmp_path / "sd3"), safe_serialization=True)
    encode_prompt_set(["a red cube", "a blue sphere"], fake_text_encoder()).save(str(tmp_path / "p.safetensors"))
    results = {}
    for offload in (False, True):
        cfg = RunConfig(run_dir=str(tmp_path / f"run{offload}"), teacher=str(tmp_path / "sd3"), teacher_loader=LOADER,
                        teacher_options={"latent_shape": list(shape)}, prompts=str(tmp_path / "p.safetensors"), lora_rank=0,
                        iterations=4, batch_size=2, checkpoint_every=2, preview_every=0, threads=1, offload_optimizer=offload,
                        stage1={"cache_first": 1, "cache_last": 1, "lr_student": 1e-3})
        assert run_training(cfg)["status"] == "done"
        results[offload] = load_file(str(tmp_path / f"run{offload}" / "student.safetensors"))
    assert results[False].keys() == results[True].keys()
    assert all(torch.equal(results[False][k], results[True][k]) for k in results[False])
    # a resume of the offloaded run restores the host-side moments and master weights from its checkpoint
    more = RunConfig.from_dict({**json.loads(json.dumps(cfg.__dict__, default=lambda o: o.__dict__)), "iterations": 6})
    assert run_training(more)["iteration"] == 6


@pytest.mark.parametrize("lora_rank", [0, 4])
def test_gradient_checkpointing_recomputes_blocks_and_trains_bit_identically(tmp_path, lora_rank):
    """Per-block checkpointing under the cached step (co-training) and, with LoRA, with two adapters that switch
    between forward and backward: the blocks run again in backward, and the student is exactly the one trained
    without it."""
    from safetensors.torch import load_file

    torch.manual_seed(0)
    module, shape, _ = tiny_sd3()
    module.save_pretrained(str(tmp_path / "sd3"), safe_serialization=True)
    encode_prompt_set(["a red cube", "a blue sphere"], fake_text_encoder()).save(str(tmp_path / "p.safetensors"))
    students, calls = {}, {}
    for checkpointing in (False, True):
        cfg = RunConfig(run_dir=str(tmp_path / f"run{checkpointing}"), teacher=str(tmp_path / "sd3"), teacher_loader=LOADER,
                        teacher_options={"latent_shape": list(shape)}, prompts=str(tmp_path / "p.safetensors"),
                        lora_rank=lora_rank, iterations=3, batch_size=2, checkpoint_every=3, preview_every=0, threads=1,
                        gradient_checkpointing=checkpointing, stage1={"cache_first": 1, "cache_last": 1, "lr_student": 1e-3})
        counted = []
        teacher = load_diffusers_teacher(str(tmp_path / "sd3"), shape)
        for block in teacher.flow.module.transformer_blocks:  # a layer every block calls, in forward and recompute
            block.norm1.register_forward_pre_hook(lambda *a, counted=counted: counted.append(1))
        teacher.prompts = None
        assert run_training(cfg, teacher=teacher)["status"] == "done"
        students[checkpointing] = load_file(str(tmp_path / f"run{checkpointing}" / "student.safetensors"))
        calls[checkpointing] = len(counted)
    assert calls[True] > calls[False]  # the recomputation in backward
    assert students[False].keys() == students[True].keys()
    assert all(torch.equal(students[False][k], students[True][k]) for k in students[False])
