"""The X-Slim engine on real diffusers models of every supported family (random weights: exactness and
accounting, not fidelity)."""

from __future__ import annotations

import pytest
import torch

from families import BUILDERS
from xslim_core import StepKind, XSlim, XSlimConfig, record_profile
from xslim_demo.sampling import flow_sigmas, sample_euler
from xslim_lab.timing import BlockExecutions

STEPS = 20
SIGMAS = flow_sigmas(STEPS, shift=3.0)
FAMILIES = list(BUILDERS)


@pytest.fixture(scope="module", params=FAMILIES)
def fam(request):
    return BUILDERS[request.param]()


def noise(fam, batch=1, seed=0):
    return torch.randn(batch, *fam.latent_shape, generator=torch.Generator().manual_seed(seed))


def sample(fam, x, prompts, sigmas=SIGMAS, cfg=2.0):
    return sample_euler(fam.velocity_fn(prompts), x, sigmas, cfg_scale=cfg)


def profile_of(fam, prompts=(1,)):
    x = noise(fam, len(prompts))
    return record_profile(fam.model, lambda: sample(fam, x, list(prompts)), SIGMAS)


def cached_sample(fam, config, profile, x, prompts, sigmas=SIGMAS):
    """Cached sampling; also counts block executions independently of the engine's books."""
    with XSlim(fam.model, config, profile) as cache:
        with BlockExecutions([spec.attention[0][0] for spec in cache.blocks]) as executed:
            with cache.run(sigmas):
                out = sample(fam, x, prompts, sigmas)
                schedule = cache.schedule
        return out, cache.stats, schedule, executed.count


def test_caching_off_is_bitwise_identical(fam):
    x = noise(fam)
    reference = sample(fam, x, [1])
    out, stats, _, _ = cached_sample(fam, XSlimConfig(mode="off"), None, x, [1])
    assert torch.equal(out, reference)
    assert stats.pattern() == "F" * STEPS
    assert stats.effective_nfe == STEPS


def test_block_refresh_with_every_block_refreshed_matches(fam):
    prof = profile_of(fam)
    x = noise(fam)
    reference = sample(fam, x, [1])
    config = XSlimConfig(levels={"block"}, block_threshold=0.0, protected_blocks=0)
    out, stats, _, _ = cached_sample(fam, config, prof, x, [1])
    assert StepKind.BLOCK.value in stats.pattern()
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-5)
    assert stats.effective_nfe == STEPS  # nothing was skipped


def test_token_refresh_with_all_tokens_matches(fam):
    prof = profile_of(fam)
    x = noise(fam)
    reference = sample(fam, x, [1])
    out, stats, _, _ = cached_sample(fam, XSlimConfig(levels={"token"}, token_ratio=1.0), prof, x, [1])
    assert StepKind.TOKEN.value in stats.pattern()
    torch.testing.assert_close(out, reference, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("level", ["step", "block", "token"])
def test_each_level_alone_cuts_block_evaluations_as_predicted(fam, level):
    prof = profile_of(fam)
    x = noise(fam)
    config = XSlimConfig(levels={level}, token_ratio=0.5, protected_blocks=1)
    out, stats, schedule, executed = cached_sample(fam, config, prof, x, [1])
    rows = 2  # CFG
    per_sample = stats.block_evals / rows
    if level == "block":
        # block choices are made at run time on the cached trajectory; the profile predicts them closely
        block_steps = schedule.pattern.count("B")
        assert block_steps > 0
        assert abs(per_sample - schedule.predicted_block_evals) <= block_steps * 2
        assert per_sample < STEPS * stats.num_blocks
    else:
        assert per_sample == pytest.approx(schedule.predicted_block_evals)
        assert per_sample < STEPS * stats.num_blocks
    assert stats.pattern() == schedule.pattern
    # every block execution the engine books really happened, once per call over the batch
    assert executed == stats.block_calls
    assert torch.isfinite(out).all()


def test_batch_of_two_with_cfg_equals_each_sample_alone(fam):
    prof = profile_of(fam, prompts=(1, 2))
    config = XSlimConfig(token_ratio=0.5, protected_blocks=1, pattern="FFFF.F.B.F.T.FB.TF.F")
    x = noise(fam, batch=2, seed=5)
    together, stats, schedule, _ = cached_sample(fam, config, prof, x, [1, 2])
    assert stats.pattern(0) == stats.pattern(3) == config.pattern
    p, blocks = config.pattern, stats.num_blocks
    no_block_skipped = (p.count("F") + p.count("B")) * blocks + p.count("T") * blocks * 0.5
    assert stats.block_evals / 4 < no_block_skipped  # block refreshes did reuse blocks
    for i, prompt in enumerate([1, 2]):
        alone, _, _, _ = cached_sample(fam, config, prof, x[i : i + 1], [prompt])
        torch.testing.assert_close(together[i : i + 1], alone, rtol=1e-4, atol=1e-5)


def test_back_to_back_runs_with_new_shapes_and_step_counts_keep_no_state(fam):
    prof = profile_of(fam)
    config = XSlimConfig(protected_blocks=1, warn=0.5)
    sigmas_b = flow_sigmas(12, shift=3.0)
    x_a, x_b = noise(fam, batch=1), noise(fam, batch=2, seed=3)
    schedule_source = {"sigmas": SIGMAS}
    with XSlim(fam.model, config, prof, sigmas=lambda: schedule_source["sigmas"]) as cache:
        sample(fam, x_a, [1])
        assert cache.stats.num_steps == STEPS
        schedule_source["sigmas"] = sigmas_b
        second = sample(fam, x_b, [1, 2], sigmas_b)
        assert cache.stats.num_steps == 12
        assert len(cache.stats.decisions) == 4
    fresh, _, _, _ = cached_sample(fam, config, prof, x_b, [1, 2], sigmas_b)
    torch.testing.assert_close(second, fresh, rtol=0, atol=0)


def test_online_controller_skips_refreshes_and_forces_full_steps(fam):
    x = noise(fam)
    reference = sample(fam, x, [1])
    config = XSlimConfig(mode="online", warn=0.5, crit=1.5, protected_blocks=1, max_skips=3)
    out, stats, _, executed = cached_sample(fam, config, None, x, [1])
    pattern = stats.pattern()
    assert pattern[:4] == "FFFF" and pattern[-1] == "F"
    assert "." in pattern and "...." not in pattern
    assert stats.effective_nfe < STEPS
    assert executed == stats.block_calls
    assert (out - reference).abs().mean() < reference.abs().mean()


def test_low_precision_cache_halves_the_bytes_held(fam):
    prof = profile_of(fam)
    x = noise(fam)
    config = XSlimConfig(protected_blocks=1, warn=0.5)
    out32, s32, _, _ = cached_sample(fam, config, prof, x, [1])
    out16, s16, _, _ = cached_sample(fam, config.with_(cache_dtype=torch.bfloat16, cache_device="cpu"), prof, x, [1])
    assert s32.cache_bytes_peak > 0
    assert s16.cache_bytes_peak * 2 == s32.cache_bytes_peak
    assert (out16 - out32).abs().max() < 0.05 * out32.abs().max()


def test_remove_restores_the_model(fam):
    x = noise(fam)
    before = sample(fam, x, [1])
    cache = XSlim(fam.model, XSlimConfig(mode="online"))
    assert "forward" in vars(fam.model)
    cache.remove()
    assert "forward" not in vars(fam.model)
    assert all("forward" not in vars(spec.module) for spec in cache.blocks)
    assert torch.equal(sample(fam, x, [1]), before)
