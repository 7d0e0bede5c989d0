"""The X-Slim Cache node on ComfyUI's own FLUX, SD3, HunyuanVideo, Wan and Qwen-Image classes (tiny, random weights),
sampled through comfy.sample.sample as KSampler does."""

from __future__ import annotations

import logging

import pytest
import torch

import comfy_env as ce

FAMILIES = ["flux", "sd3", "hunyuan_video", "wan", "qwen_image"]
SIDE = {"flux": 16, "sd3": 16, "hunyuan_video": 8, "wan": 8, "qwen_image": 8}
STEPS = 12


def nodes_module():
    from comfyui_xslim.nodes import xslim_nodes

    return xslim_nodes


def cache(model, preset="custom", profile="none (online)", warn=0.1, crit=0.3, block=0.0):
    node = nodes_module().XSlimCache
    return node.execute(model, preset, profile, warn, crit, block, 0.5, 0.0, 1.0, "same as model", "same as model").args[0]


def report_of(model):
    from comfyui_xslim.nodes.runner import last_report

    return last_report(model)


def run(model, fam, **kw):
    return ce.sample(model, fam, steps=kw.pop("steps", STEPS), side=kw.pop("side", SIDE[fam]), **kw)


@pytest.fixture(scope="module", params=FAMILIES)
def family_model(request, pack):
    return request.param, ce.tiny_model(request.param)


def test_thresholds_that_disable_caching_give_the_same_latents(family_model):
    fam, model = family_model
    reference = run(model, fam)
    cached = cache(model, warn=0.0, crit=0.0)
    assert torch.equal(run(cached, fam), reference)
    report = report_of(cached)
    assert report.stats.effective_nfe == STEPS and set("".join(report.pattern_rows.values())) == {"F"}
    assert len(report.pattern_rows) == 2  # cond and uncond kept apart


def test_profiled_presets_cut_block_evaluations_as_the_schedule_predicts(family_model, user_dir, caplog):
    fam, model = family_model
    xn = nodes_module()
    pos, neg = ce.conditioning(fam, 1), ce.conditioning(fam, 2, length=4)
    latent = {"samples": torch.zeros(ce.latent_shape(fam, 1, SIDE[fam]))}
    _, path = xn.XSlimProfile.execute(model, pos, neg, latent, 0, 20, 2.0, "euler", "simple", f"tiny-{fam}").args
    assert path.startswith(str(user_dir)) and path.endswith(f"tiny-{fam}.json")
    for preset in ("slow", "fast"):
        cached = cache(model, preset=preset, profile=f"tiny-{fam}")
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="xslim"):
            run(cached, fam)
        report = report_of(cached)
        blocks = report.stats.num_blocks
        for letters in report.pattern_rows.values():
            assert letters == report.planned
        per_row = report.stats.block_evals / report.stats.num_rows
        block_steps = report.planned.count("B")
        assert abs(per_row - report.predicted_block_evals) <= 2 * block_steps + 1e-6
        assert per_row < 0.6 * STEPS * blocks
        assert report.summary in caplog.text and "effective NFE" in report.summary
        assert caplog.text.count(report.summary) == 1  # one line per run, not one per wrapper or per CFG branch


def test_cfg_batched_or_split_gives_the_same_decisions_and_latents(family_model, monkeypatch):
    fam, model = family_model
    cached = cache(model, warn=0.2, crit=0.5)
    batched = run(cached, fam)
    together = report_of(cached)
    calls = []
    real_apply = model.model.apply_model
    monkeypatch.setattr(model.model, "memory_required", lambda *a, **k: 1e18)  # too big to batch: cond, uncond apart
    monkeypatch.setattr(model.model, "apply_model", lambda *a, **k: calls.append(a[0].shape[0]) or real_apply(*a, **k))
    split = run(cached, fam)
    apart = report_of(cached)
    assert set(calls) == {1}
    assert sorted(together.pattern_rows.values()) == sorted(apart.pattern_rows.values())
    assert "." in "".join(apart.pattern_rows.values())
    torch.testing.assert_close(split, batched, rtol=1e-4, atol=1e-4)


def test_batch_of_two_equals_each_sample_alone(family_model):
    fam, model = family_model
    noise = torch.randn(ce.latent_shape(fam, 2, SIDE[fam]), generator=torch.Generator().manual_seed(5))
    cached = cache(model, warn=0.2, crit=0.5)
    both = run(cached, fam, batch=2, noise=noise)
    rows = report_of(cached).pattern_rows
    assert len(rows) == 4 and {k[0] for k in rows} == {"cond", "uncond"} and {k[2] for k in rows} == {0, 1}
    for i in range(2):
        alone = run(cached, fam, noise=noise[i : i + 1])
        torch.testing.assert_close(both[i : i + 1], alone, rtol=1e-4, atol=1e-4)
        assert sorted(report_of(cached).pattern_rows.values()) == sorted(v for k, v in rows.items() if k[2] == i)


def test_second_pass_new_resolution_and_step_count_and_an_interrupted_run(family_model):
    fam, model = family_model
    cached = cache(model, warn=0.2, crit=0.5)
    first = run(cached, fam)
    upscaled = torch.nn.functional.interpolate(first.flatten(1, -3) if first.ndim == 5 else first, scale_factor=2).reshape(
        *first.shape[:-2], first.shape[-2] * 2, first.shape[-1] * 2
    )
    second = run(cached, fam, latent=upscaled, steps=8, denoise=0.5, side=SIDE[fam] * 2)
    sigmas = report_of(cached).sigmas
    assert len(sigmas) == 9 and sigmas[0] < 0.9  # denoise 0.5: 8 steps from the middle of a 16-step schedule

    def stop_at_3(step, *_):
        if step == 3:
            raise KeyboardInterrupt("user pressed cancel")

    with pytest.raises(KeyboardInterrupt):
        run(cached, fam, steps=10, callback=stop_at_3)
    assert report_of(cached).interrupted and "interrupted" in report_of(cached).summary
    fresh = cache(model, warn=0.2, crit=0.5)
    assert torch.equal(run(cached, fam), run(fresh, fam))  # nothing of the earlier runs leaks into a new one
    assert torch.equal(run(cached, fam, latent=upscaled, steps=8, denoise=0.5, side=SIDE[fam] * 2), second)


def test_lora_applied_before_the_cache_node_is_kept(family_model):
    fam, model = family_model
    lora = model.clone()
    weights = {k: v for k, v in model.model.state_dict().items() if k.endswith(".weight") and v.ndim == 2}
    g = torch.Generator().manual_seed(3)
    lora.add_patches({k: ("diff", (torch.randn(v.shape, generator=g) * 0.02,)) for k, v in list(weights.items())[:12]}, 1.0)
    base_out, lora_out = run(model, fam), run(lora, fam)
    assert (base_out - lora_out).abs().max() > 1e-3
    assert torch.equal(run(cache(lora, warn=0.0, crit=0.0), fam), lora_out)
    cached = run(cache(lora, warn=0.2, crit=0.5), fam)
    assert (cached - lora_out).abs().mean() < (cached - base_out).abs().mean()


def test_other_dit_patches_keep_running_and_a_later_one_turns_caching_off(family_model, caplog):
    fam, model = family_model
    seen = []

    def counting_patch(args, extra):
        seen.append(args["img"].shape[0])
        return extra["original_block"](args)

    patched = model.clone()
    patched.set_model_patch_replace(counting_patch, "dit", "double_block", 1)
    reference = run(patched, fam)
    calls_uncached = len(seen)
    seen.clear()
    assert torch.equal(run(cache(patched, warn=0.0, crit=0.0), fam), reference)
    assert len(seen) == calls_uncached  # the earlier patch ran at every step, through ours
    seen.clear()
    cached = cache(patched, warn=0.2, crit=0.5)
    run(cached, fam)
    computed = sum(letter != "." for letter in next(iter(report_of(cached).pattern_rows.values())))
    assert 0 < len(seen) < calls_uncached and len(seen) >= computed - 1

    later = cache(model, warn=0.2, crit=0.5).clone()
    later.set_model_patch_replace(counting_patch, "dit", "double_block", 0)
    with caplog.at_level(logging.WARNING, logger="xslim"):
        assert torch.equal(run(later, fam), run(_with_patch(model, counting_patch), fam))
    assert "Put X-Slim last" in caplog.text


def _with_patch(model, patch):
    m = model.clone()
    m.set_model_patch_replace(patch, "dit", "double_block", 0)
    return m


def test_token_refresh_runs_through_the_attention_override(family_model):
    from comfyui_xslim.nodes.host import XSlimSettings, install
    from xslim_core import XSlimConfig

    fam, model = family_model
    from comfyui_xslim.nodes.families import family_for

    if not family_for(model.get_model_object("diffusion_model")).token_level:
        pytest.skip(f"{fam}: the token level is off for this family in ComfyUI")
    pattern = "FFFFTFTTFTFF"
    reference = run(model, fam)
    every_token = install(model, XSlimSettings(XSlimConfig(pattern=pattern, token_ratio=1.0)))
    torch.testing.assert_close(run(every_token, fam), reference, rtol=1e-4, atol=1e-4)  # all tokens: the full result
    half = install(model, XSlimSettings(XSlimConfig(pattern=pattern, token_ratio=0.5)))
    out = run(half, fam)
    report = report_of(half)
    assert set(report.pattern_rows.values()) == {pattern} == {report.planned}
    assert report.stats.block_evals / report.stats.num_rows == pytest.approx(report.predicted_block_evals)
    assert report.stats.tokens_computed < report.stats.tokens_total
    skipped = run(install(model, XSlimSettings(XSlimConfig(pattern=pattern.replace("T", ".")))), fam)
    assert not torch.equal(out, skipped)  # half the tokens really were recomputed
    assert (out - reference).abs().mean() < 0.01 * reference.abs().mean()


def test_an_attention_override_set_after_xslim_turns_the_token_level_off_with_a_warning(pack, caplog):
    from comfyui_xslim.nodes.runner import last_report

    model = ce.tiny_model("flux")
    cached = cache(model, warn=0.2, crit=0.5)
    cached = cached.clone()
    cached.model_options["transformer_options"]["optimized_attention_override"] = lambda func, *a, **k: func(*a, **k)
    with caplog.at_level(logging.WARNING, logger="xslim"):
        out = run(cached, "flux")
    assert torch.isfinite(out).all() and "replaced the attention override" in caplog.text
    assert "T" not in "".join(last_report(cached).pattern_rows.values())
