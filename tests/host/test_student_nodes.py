"""The 1.x student nodes in a real ComfyUI: the shipped demo students through UNETLoader's model, students of
ComfyUI's own tiny SD3 / FLUX / HunyuanVideo classes, LoRA before the loader, and the refusals."""

from __future__ import annotations

import json
import logging
import os
import re

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import comfy_env as ce
from distill_core.cache import CacheRange, Compensation
from distill_core.identity import weights_signature
from distill_core.conditioning import Conditioning
from distill_core.student import load_student, save_student_file
from xslim_demo.latents import COMFY_LATENT_SCALE
from xslim_demo.teacher import CLASSES, WEIGHTS_DIR, classes_path, default_weights_path

SHIPPED = {"student_1x_175.safetensors": 1.75, "student_1x_167.safetensors": 1 + 8 / 12}
DEMO_SHAPE = (16, 1, 8, 8)


def nodes():
    from comfyui_xslim.nodes import student_nodes, xslim_nodes

    return student_nodes, xslim_nodes


@pytest.fixture(scope="module")
def demo_teacher(pack):
    import comfy.sd
    import folder_paths

    folder_paths.add_model_folder_path("diffusion_models", WEIGHTS_DIR)
    return comfy.sd.load_diffusion_model(folder_paths.get_full_path_or_raise("diffusion_models", "demo_teacher.safetensors"))


@pytest.fixture()
def students_dir(tmp_path, pack):
    """A user's models/students folder (a temporary one), registered the way the pack registers its own."""
    import folder_paths

    from comfyui_xslim.nodes.student import register_students_folder

    register_students_folder()
    folder_paths.add_model_folder_path("students", str(tmp_path), is_default=True)
    yield tmp_path
    folder_paths.folder_names_and_paths["students"][0].remove(str(tmp_path))


def demo_class(index: int):
    """X-Slim Demo Class's conditioning; index 10 is the unconditional (CFG negative)."""
    return nodes()[1].XSlimDemoClass.execute((CLASSES + ["unconditional"])[index]).args[0]


def load(model, name, base_check="strict"):
    return nodes()[0].LoadStudent.execute(model, name, base_check).args[0]


def ksample(model, positive, batch=2, seed=7, negative=None):
    latent = {"samples": torch.zeros(batch, *DEMO_SHAPE)}
    return nodes()[0].StudentKSampler.execute(model, positive, latent, seed, negative).args[0]["samples"]


def report(model):
    from comfyui_xslim.nodes.runner import last_report

    return last_report(model)


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_shipped_student_equals_distill_cores_sampler_and_reports_its_nfe(demo_teacher, name, caplog):
    student = load(demo_teacher, name)
    with caplog.at_level(logging.INFO, logger="xslim"):
        got = ksample(student, demo_class(3), batch=2, seed=7)
    torch.manual_seed(7)  # KSampler's noise for seed 7 (comfy.sample.prepare_noise)
    noise = torch.randn(2, *DEMO_SHAPE)
    reference = load_student(os.path.join(ce.REPO, "distill_core", "weights", name))
    # the same conditioning on both sides: the file keeps the class table in fp16, the graph's comes from the
    # base model's fp32 table (X-Slim Demo Class)
    table = load_file(classes_path(default_weights_path()))
    reference.class_table = Conditioning(table["context"], table["pooled"])
    expected = reference.sample(noise, torch.tensor([3, 3]))
    torch.testing.assert_close(got * COMFY_LATENT_SCALE, expected, rtol=1e-4, atol=1e-4)
    stats = report(student).stats
    assert stats.effective_nfe == pytest.approx(SHIPPED[name]) == pytest.approx(reference.effective_nfe)
    # the engine's count equals what the file itself declares (written at export, 4 decimals)
    with safe_open(os.path.join(ce.REPO, "distill_core", "weights", name), framework="pt") as f:
        declared = float(f.metadata()["effective_nfe"])
    assert stats.effective_nfe == pytest.approx(declared, abs=1e-4)
    cache = reference.cache
    line = f"1.x student: 2 steps, blocks {cache.first}..{cache.last} cached - effective NFE {SHIPPED[name]:.2f}"
    assert line in caplog.text and report(student).summary == line
    assert set(report(student).pattern_rows.values()) == {"FB"}


def custom_advanced(student, positive, latent, seed, sigmas=None, guider=None):
    """ComfyUI's own SamplerCustomAdvanced node, wired as the HunyuanVideo student workflow wires it: RandomNoise,
    BasicGuider (unless another guider is given), 1.x Student Sampler and 1.x Student Sigmas."""
    from comfy_extras import nodes_custom_sampler as ncs

    sn = nodes()[0]
    noise = ncs.RandomNoise().get_noise(seed)[0]
    guider = ncs.BasicGuider().get_guider(student, positive)[0] if guider is None else guider
    sigmas = sn.StudentSigmas.execute(student).args[0] if sigmas is None else sigmas
    return ncs.SamplerCustomAdvanced().sample(noise, guider, sn.StudentSampler.execute().args[0], sigmas, latent)[0]["samples"]


def test_samplercustomadvanced_with_the_student_sampler_equals_the_one_node_ksampler(demo_teacher):
    from comfy_extras import nodes_custom_sampler as ncs

    sn = nodes()[0]
    student = load(demo_teacher, "student_1x_175.safetensors")
    assert sn.StudentSigmas.execute(student).args[0].tolist() == [1.0, 0.75, 0.0]
    latent = {"samples": torch.zeros(2, *DEMO_SHAPE)}
    one_node = ksample(student, demo_class(5), batch=2, seed=11)
    torch.testing.assert_close(custom_advanced(student, demo_class(5), latent, 11), one_node, rtol=0, atol=0)
    assert report(student).stats.effective_nfe == pytest.approx(1.75)  # the cached step ran on this path too
    cfg1 = ncs.CFGGuider().get_guider(student, demo_class(5), demo_class(10), 1.0)[0]  # CFG 1 never evaluates the negative
    torch.testing.assert_close(custom_advanced(student, demo_class(5), latent, 11, guider=cfg1), one_node, rtol=0, atol=0)


@pytest.mark.bad_input("clear error")
def test_the_custom_path_refuses_one_sigma_and_cfg_other_than_1_and_empty_sigmas_skip_sampling(demo_teacher):
    from comfy_extras import nodes_custom_sampler as ncs

    from comfyui_xslim.nodes.host import XSlimSetupError

    student = load(demo_teacher, "student_1x_175.safetensors")
    latent = {"samples": torch.zeros(1, *DEMO_SHAPE)}
    with pytest.raises(XSlimSetupError, match=r"got 1 sigma\(s\), so there is no step.*Connect 1.x Student Sigmas"):
        custom_advanced(student, demo_class(2), latent, 3, sigmas=torch.tensor([1.0]))
    with pytest.raises(XSlimSetupError, match=r"got 1 sigma\(s\)"):  # the sampler's own check, on a model without a student
        custom_advanced(demo_teacher, demo_class(2), latent, 3, sigmas=torch.tensor([1.0]))
    for cfg in (2.0, 0.5):
        guider = ncs.CFGGuider().get_guider(student, demo_class(2), demo_class(10), cfg)[0]
        with pytest.raises(XSlimSetupError, match=rf"the guider \(CFGGuider\) has cfg {cfg:g}; .* samples at CFG 1; another CFG .*Use BasicGuider, or CFGGuider with cfg 1\."):
            custom_advanced(student, demo_class(2), latent, 3, guider=guider)
    dual = ncs.DualCFGGuider().get_guider(student, demo_class(2), demo_class(3), demo_class(10), 1.0, 3.0, "regular")[0]
    with pytest.raises(XSlimSetupError, match=r"has cfg2 3;"):
        custom_advanced(student, demo_class(2), latent, 3, guider=dual)
    # what the tooltip says: empty sigmas never reach the sampler, ComfyUI returns the latent as it is
    assert torch.equal(custom_advanced(student, demo_class(2), latent, 3, sigmas=torch.tensor([])), latent["samples"])
    # a refused run leaves nothing behind: the next one is the one-node KSampler's
    torch.testing.assert_close(custom_advanced(student, demo_class(2), latent, 3), ksample(student, demo_class(2), batch=1, seed=3), rtol=0, atol=0)


def test_the_negative_input_is_accepted_and_ignored(demo_teacher):
    student = load(demo_teacher, "student_1x_175.safetensors")
    without = ksample(student, demo_class(4), batch=2, seed=5)
    for negative in (demo_class(10), demo_class(8)):  # the unconditional, or any other class: no effect either way
        assert torch.equal(ksample(student, demo_class(4), batch=2, seed=5, negative=negative), without)


def test_lora_before_the_loader_stays_applied_and_the_base_model_is_unchanged(demo_teacher):
    import comfy.sd

    g = torch.Generator().manual_seed(0)
    lora = {}  # a real LoRA state dict in ComfyUI's generic "lora_up/lora_down" format, on two single blocks
    for block in ("single_blocks.0.linear2", "single_blocks.7.linear2"):
        out_f, in_f = demo_teacher.model.diffusion_model.state_dict()[f"{block}.weight"].shape
        lora[f"diffusion_model.{block}.lora_up.weight"] = torch.randn(out_f, 4, generator=g) * 0.05
        lora[f"diffusion_model.{block}.lora_down.weight"] = torch.randn(4, in_f, generator=g) * 0.05
    positive, negative = demo_class(1), demo_class(10)
    teacher_before = ce.sample(demo_teacher, "hunyuan_video", steps=8, cfg=2.0, side=8, positive=positive, negative=negative)
    patches_before = dict(demo_teacher.patches)

    with_lora, _ = comfy.sd.load_lora_for_models(demo_teacher, None, lora, 1.0, 0)
    lora_then_student = ksample(load(with_lora, "student_1x_175.safetensors"), positive)
    student_then_lora, _ = comfy.sd.load_lora_for_models(load(demo_teacher, "student_1x_175.safetensors"), None, lora, 1.0, 0)
    plain_student = ksample(load(demo_teacher, "student_1x_175.safetensors"), positive)
    torch.testing.assert_close(lora_then_student, ksample(student_then_lora, positive), rtol=1e-5, atol=1e-5)
    assert (lora_then_student - plain_student).abs().max() > 1e-3  # the LoRA changes the student's output

    assert demo_teacher.patches == patches_before
    teacher_after = ce.sample(demo_teacher, "hunyuan_video", steps=8, cfg=2.0, side=8, positive=positive, negative=negative)
    assert torch.equal(teacher_after, teacher_before)


@pytest.mark.bad_input("clear error")
def test_xslim_cache_on_a_student_and_a_student_on_a_cached_model_are_refused(demo_teacher):
    from comfyui_xslim.nodes.host import XSlimSetupError

    sn, xn = nodes()
    student = load(demo_teacher, "student_1x_175.safetensors")
    with pytest.raises(XSlimSetupError, match="already carries a 1.x student"):
        xn.XSlimCache.execute(student, "fast", "none (online)", 0.1, 0.3, 0.0, 0.5, 0.0, 1.0, "same as model", "same as model")
    cached = xn.XSlimCache.execute(demo_teacher, "fast", "none (online)", 0.1, 0.3, 0.0, 0.5, 0.0, 1.0, "same as model", "same as model").args[0]
    with pytest.raises(XSlimSetupError, match="already went through an X-Slim or student node"):
        load(cached, "student_1x_175.safetensors")


def test_student_compare_puts_teacher_xslim_and_student_in_one_grid(demo_teacher, monkeypatch):
    from comfyui_xslim.nodes import xslim_nodes

    # three rounds whatever the machine's speed (a busy machine's round outlasts the repeat budget: one round)
    monkeypatch.setattr(xslim_nodes, "COMPARE_REPEAT_BUDGET_S", float("inf"))
    sn = nodes()[0]
    student = load(demo_teacher, "student_1x_175.safetensors")
    latent = {"samples": torch.zeros(4, *DEMO_SHAPE)}
    grid, table = sn.StudentCompare.execute(demo_teacher, student, demo_class(7), demo_class(10), latent, 0, 20, 2.0,
                                            "euler", "simple", "fast").args
    lines = table.split("\n\n")[0].splitlines()
    assert re.split(r"\s{2,}", lines[0]) == ["column", "NFE per image", "ms per image (median of 3)", "spread", "class accuracy"]
    rows = [re.split(r"\s{2,}", line.strip()) for line in lines[2:]]  # aligned text: cells two or more spaces apart
    assert len(rows) == 3 and rows[0][:2] == ["teacher 20 steps, CFG 2", "40.00"]  # CFG: two evaluations a step
    assert "X-Slim fast" in rows[1][0] and float(rows[1][1]) < 0.6 * 40
    assert rows[2][:2] == ["1.x student student_1x_175", "1.75"]
    ms = [float(r[2]) for r in rows]  # per image, in ms with 2 decimals
    assert all(len(r[2].split(".")[1]) == 2 for r in rows) and all(m > 0 for m in ms)
    # which column is faster is the benchmark's to show (a timed assertion flakes on a busy machine); the work is NFE
    assert all(r[3].endswith("%") for r in rows)  # three timed runs each: a spread
    assert all(r[4].endswith("/4") for r in rows)  # the demo classifier's accuracy per column
    assert "|" not in table  # no pipe table to wrap in a preview box
    assert "median of 3 runs per column, interleaved, after one untimed warm-up run of each column" in table
    assert grid.ndim == 4 and grid.shape[-1] == 3


def test_student_compare_warms_up_every_column_once_then_times_them_interleaved(demo_teacher, monkeypatch):
    from comfyui_xslim.nodes import student_nodes

    sn = nodes()[0]
    student = load(demo_teacher, "student_1x_175.safetensors")
    calls = []  # which column ran, in order: the teacher's columns by their X-Slim mode, the student by name
    real_install, real_run_student = student_nodes.install, student_nodes.run_student
    monkeypatch.setattr(student_nodes, "install", lambda m, s: calls.append(s.config.mode) or real_install(m, s))
    monkeypatch.setattr(student_nodes, "run_student", lambda m, *a, **k: calls.append("student") or real_run_student(m, *a, **k))
    real_load = student_nodes.load_untimed  # each column's model is loaded before its clock starts
    monkeypatch.setattr(student_nodes, "load_untimed", lambda m: calls.append("load") or real_load(m))
    latent = {"samples": torch.zeros(1, *DEMO_SHAPE)}
    sn.StudentCompare.execute(demo_teacher, student, demo_class(7), demo_class(10), latent, 0, 4, 2.0, "euler", "simple", "fast")
    teacher_mode, xslim_mode = calls[0], calls[2]
    assert teacher_mode == "off" and xslim_mode not in ("off", "load")
    # a warm-up round, then three timed rounds, the columns interleaved
    assert calls == [teacher_mode, "load", xslim_mode, "load", "load", "student"] * 4


# -- students of ComfyUI's own tiny SD3 / FLUX / HunyuanVideo classes -------------------------------------------
TINY_SIDE = {"sd3": 16, "flux": 16, "hunyuan_video": 8}
CACHE = {"sd3": (1, 2), "flux": (1, 3), "hunyuan_video": (2, 3)}  # FLUX and HunyuanVideo: across both stacks


def tiny_student(patcher, family: str, path: str, cache=True, scale=0.02, seed=1, **meta_changes) -> dict:
    """A student file for a tiny ComfyUI model: its weights perturbed, a random compensation, ComfyUI key names."""
    from comfyui_xslim.nodes.families import family_for

    from comfyui_xslim.nodes.student import base_weights

    base = {k: v.detach().clone() for k, v in base_weights(patcher).items()}  # not the weights of a student sampled before
    g = torch.Generator().manual_seed(seed)
    trained = {name for name, _ in patcher.model.diffusion_model.named_parameters()}  # buffers stay as they are
    student = {k: v + scale * torch.randn(v.shape, generator=g) * v.std().clamp_min(1e-3) if k in trained and v.numel() > 1 else v for k, v in base.items()}
    fam = family_for(patcher.model.diffusion_model)
    stacks = fam.stack_sizes(patcher.model.diffusion_model)
    first_last = CacheRange(*CACHE[family]) if cache else None
    comp = None
    if cache:
        comp = Compensation(patcher.model.diffusion_model.hidden_size if hasattr(patcher.model.diffusion_model, "hidden_size") else 256)
        with torch.no_grad():
            for p in comp.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.01)
    identity = {"family": fam.family, "hash": "tiny", "signature": weights_signature(base), "architecture": ""}
    save_student_file(path, student, "comfy", stacks, [1.0, 0.75, 0.0], 3.0, first_last, comp, identity)
    if meta_changes:
        rewrite_meta(path, **meta_changes)
    return student


def rewrite_meta(path: str, drop: tuple = (), **changes) -> None:
    with safe_open(path, framework="pt") as f:
        meta, tensors = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys() if k not in drop}
    meta.update({k: v for k, v in changes.items()})
    save_file(tensors, path, metadata=meta)


@pytest.fixture(scope="module", params=["sd3", "flux", "hunyuan_video"])
def tiny(request, pack):
    return request.param, ce.tiny_model(request.param)


def test_tiny_family_students_load_and_sample_at_their_declared_nfe(tiny, students_dir):
    import comfy.sample

    family, patcher = tiny
    side = TINY_SIDE[family]
    tiny_student(patcher, family, str(students_dir / f"{family}.safetensors"))
    student = load(patcher, f"{family}.safetensors")
    positive = ce.conditioning(family, 1)
    latent = {"samples": torch.zeros(ce.latent_shape(family, 2, side))}
    out = nodes()[0].StudentKSampler.execute(student, positive, latent, 3).args[0]["samples"]
    assert torch.isfinite(out).all()
    stats = report(student).stats
    first, last = CACHE[family]
    assert stats.effective_nfe == pytest.approx(1 + (stats.num_blocks - (last - first + 1)) / stats.num_blocks)
    with safe_open(str(students_dir / f"{family}.safetensors"), framework="pt") as f:
        assert stats.effective_nfe == pytest.approx(float(f.metadata()["effective_nfe"]), abs=1e-4)
    assert set(report(student).pattern_rows.values()) == {"FB"}

    # without a cache, the patched model is exactly the student's weights loaded into the model
    weights = tiny_student(patcher, family, str(students_dir / f"{family}_plain.safetensors"), cache=False)
    plain = nodes()[0].StudentKSampler.execute(load(patcher, f"{family}_plain.safetensors"), positive, latent, 3).args[0]["samples"]
    direct = ce.tiny_model(family)
    direct.model.diffusion_model.load_state_dict(weights)
    noise = comfy.sample.prepare_noise(latent["samples"], 3)
    sampler = nodes()[0].StudentSampler.execute().args[0]
    expected = comfy.sample.sample_custom(direct, noise, 1.0, sampler, torch.tensor([1.0, 0.75, 0.0]), positive, positive,
                                          latent["samples"], disable_pbar=True, seed=3)
    torch.testing.assert_close(plain, expected, rtol=1e-5, atol=1e-5)
    assert (plain - out).abs().max() > 1e-4  # the cached step with its compensation is not the plain second step


# -- refusals, each a clear message ----------------------------------------------------------------------------
def refused(model, name, match, base_check="strict"):
    from comfyui_xslim.nodes.host import XSlimSetupError

    with pytest.raises(XSlimSetupError, match=match):
        load(model, name, base_check)


def fresh_demo_teacher(**model_options):
    import comfy.sd

    return comfy.sd.load_diffusion_model(os.path.join(WEIGHTS_DIR, "demo_teacher.safetensors"), model_options=model_options)


@pytest.mark.bad_input("clear error")
def test_an_empty_or_unknown_student_name_is_one_sentence_without_folder_paths(demo_teacher, students_dir, user_dir):
    from comfyui_xslim.nodes.host import XSlimSetupError

    for name, expected in [("", "no student is chosen (the name is empty); pick one from the list"),
                           ("nobody.safetensors", "there is no student 'nobody.safetensors' in models/students and no "
                                                  "1.x-Distill job of that name")]:
        with pytest.raises(XSlimSetupError) as err:
            load(demo_teacher, name)
        message = str(err.value)
        assert expected in message and message.count(". ") == 0 and message.endswith("."), message
        assert str(students_dir) not in message and str(user_dir) not in message and WEIGHTS_DIR not in message


@pytest.mark.bad_input("clear error")
def test_a_student_of_other_weights_is_refused_naming_both_and_trust_overrides(pack, students_dir):
    changed = fresh_demo_teacher()  # the same architecture, other weights: the shipped student must not run on it
    with torch.no_grad():
        changed.model.diffusion_model.single_blocks[0].linear2.weight.mul_(1.05)
    refused(changed, "student_1x_175.safetensors", r"distilled from base hunyuan_video 42bacda2955c2fcb \(layout \w+, weights \w+\); "
            r"the model connected here is layout \w+, weights \w+: tensor single_blocks.0.linear2.weight holds other values")
    trusted = load(changed, "student_1x_175.safetensors", "trust (same weights, other precision)")
    assert torch.isfinite(ksample(trusted, demo_class(0))).all()
    for dtype in (torch.bfloat16, torch.float16):  # UNETLoader's weight_dtype: the same weights pass the strict check
        half = fresh_demo_teacher(dtype=dtype)
        assert half.model.diffusion_model.single_blocks[0].linear2.weight.dtype == dtype
        load(half, "student_1x_175.safetensors")


@pytest.mark.bad_input("clear error")
def test_a_student_for_another_family_or_architecture_is_refused(demo_teacher, students_dir):
    tiny_hy, tiny_flux = ce.tiny_model("hunyuan_video"), ce.tiny_model("flux")
    refused(tiny_hy, "student_1x_175.safetensors", r"declares block stacks \[\('double', 4\), \('single', 8\)\]; the model connected here has \[\('double', 2\), \('single', 3\)\]")
    refused(tiny_flux, "student_1x_175.safetensors", r"distilled from a 'hunyuan_video' model; the model connected here is FLUX")


@pytest.mark.bad_input("clear error")
def test_bad_student_files_are_refused_before_anything_large_is_built(demo_teacher, students_dir, monkeypatch):
    (students_dir / "not_safetensors.safetensors").write_bytes(b"\x80\x04 this is a pickle, not safetensors" * 10)
    refused(demo_teacher, "not_safetensors.safetensors", "is not a safetensors file")
    shipped = os.path.join(ce.REPO, "distill_core", "weights", "student_1x_175.safetensors")
    for name, changes, match in [
        ("missing.safetensors", dict(drop=("model.single_transformer_blocks.3.proj_out.weight",)), "is missing 1 weight tensor"),
        ("no_sigmas.safetensors", dict(drop=(), sigmas=""), "declares no usable sigmas"),
        ("empty_sigmas.safetensors", dict(drop=(), sigmas="[]"), "declares no usable sigmas"),
        ("rising_sigmas.safetensors", dict(drop=(), sigmas="[0.0, 1.0]"), "must be numbers from 1 down to 0, strictly decreasing"),
        ("cache_outside.safetensors", dict(drop=(), cached_blocks="[10, 14]"), "exceeds the model's 12 blocks"),
        ("other_arch.safetensors", dict(drop=(), stacks='[["double", 4], ["single", 9]]'), "declares block stacks"),
    ]:
        with safe_open(shipped, framework="pt") as f:
            meta, tensors = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys() if k not in changes["drop"]}
        meta.update({k: v for k, v in changes.items() if k != "drop"})
        save_file(tensors, str(students_dir / name), metadata=meta)
        refused(demo_teacher, name, match)
    # an incomplete compensation is refused before weight_patches reads the model's tensors
    from comfyui_xslim.nodes import student as student_module

    with safe_open(shipped, framework="pt") as f:
        meta, tensors = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys() if k != "comp.txt.fc2.bias"}
    save_file(tensors, str(students_dir / "no_comp_bias.safetensors"), metadata=meta)

    def large_read(*args):
        raise AssertionError("weight_patches ran before the compensation was checked")

    monkeypatch.setattr(student_module, "weight_patches", large_read)
    refused(demo_teacher, "no_comp_bias.safetensors", r"no_comp_bias.safetensors: its compensation tensors are incomplete \(11 of 12\)")
    monkeypatch.undo()
    # a crafted header declaring 40k blocks: refused from the header alone, without building anything
    save_file({"model.x": torch.zeros(1)}, str(students_dir / "huge.safetensors"), metadata={
        "format": "xslim-1x-student/1", "base_family": "hunyuan_video", "sigmas": "[1.0, 0.75, 0.0]",
        "stacks": json.dumps([["double", 40000], ["single", 40000]]), "cached_blocks": "[4, 6]"})
    monkeypatch.setattr(student_module, "weight_patches", large_read)  # nothing past the header may run
    refused(demo_teacher, "huge.safetensors", "at most 1000 blocks")
    monkeypatch.undo()


# -- weights that move between runs ----------------------------------------------------------------------------
def test_student_and_cache_give_the_same_latents_after_comfyui_unloads_and_reloads_the_model(demo_teacher):
    """ComfyUI unloads a model when another needs the memory (its weight patches undone, the weights back on the
    offload device) and loads and patches it again at the next run. On this CPU host that is
    ``unload_all_models`` between two runs; dynamic VRAM, which streams weights within a run, needs a GPU
    (docs/COMFYUI_COMPAT.md: read, not run). The student's weight patches and X-Slim's run state must come back
    the same: equal latents, and the base model's own weights unchanged in between."""
    import comfy.model_management as mm

    sn, xn = nodes()
    student = load(demo_teacher, "student_1x_175.safetensors")
    cached = xn.XSlimCache.execute(demo_teacher, "fast", "demo_teacher", 0.1, 0.3, 0.0, 0.5, 0.0, 1.0, "same as model",
                                   "same as model").args[0]
    latent = {"samples": torch.zeros(2, *DEMO_SHAPE)}

    def runs():
        from comfyui_xslim.nodes.runner import sample_latent

        return (ksample(student, demo_class(3)),
                sample_latent(cached, latent, 5, 12, 2.0, "euler", "simple", demo_class(3), demo_class(10)))

    mm.unload_all_models()  # earlier tests may have left this module-scoped model loaded with their patches
    base_before = {k: v.clone() for k, v in demo_teacher.model.diffusion_model.state_dict().items()}
    first = runs()
    mm.unload_all_models()
    assert all(torch.equal(v, base_before[k]) for k, v in demo_teacher.model.diffusion_model.state_dict().items())
    second = runs()
    for a, b in zip(first, second):
        assert torch.equal(a, b)
