"""Bad input through the Python API of the X-Slim engine: configs, schedules, profiles, hooks, threads."""

from __future__ import annotations

import json
import os
import threading
import time

import pytest
import torch

from families import BUILDERS
from xslim_core import Profile, XSlim, XSlimConfig, preset_config, record_profile
from xslim_lab.sampling import flow_sigmas, sample_euler

CLEAR, SURVIVED = pytest.mark.bad_input("clear error"), pytest.mark.bad_input("survived")
SIGMAS = flow_sigmas(12, shift=3.0)


@pytest.fixture(scope="module")
def flux():
    return BUILDERS["flux"]()


def sample(fam, seed=0, prompts=(1,), sigmas=SIGMAS):
    x = torch.randn(len(prompts), *fam.latent_shape, generator=torch.Generator().manual_seed(seed))
    return sample_euler(fam.velocity_fn(list(prompts)), x, sigmas, cfg_scale=2.0)


@CLEAR
@pytest.mark.parametrize("field,value,message", [
    ("warn", "0.1", "warn must be a number"),
    ("token_ratio", True, "token_ratio must be a number"),
    ("levels", "step", "levels must be a set of level names"),
    ("max_skips", 2.5, "max_skips must be a whole number"),
    ("cache_dtype", torch.int8, "cache_dtype must be None or one of"),
    ("cache_dtype", torch.bool, "cache_dtype must be None or one of"),
    ("cache_device", "bogus", "cache_device must be None or a torch device"),
    ("cache_device", "meta", "'meta' keeps none"),
    ("token_ratio", float("nan"), "token_ratio must lie in"),
    ("mode", 3, "mode must be one of"),
    ("pattern", 7, "pattern must be a string"),
])
def test_config_refuses_wrong_types_naming_field_and_value(field, value, message):
    with pytest.raises(ValueError, match=message) as err:
        XSlimConfig(**{field: value})
    assert field in str(err.value)


@CLEAR
@pytest.mark.parametrize("sigmas", [[], [1.0], [1.0, float("nan")], "abc", None])
def test_a_run_without_a_usable_schedule_is_refused(flux, sigmas):
    with XSlim(flux.model, XSlimConfig(mode="online")) as cache:
        with pytest.raises(ValueError, match="sigmas"):
            with cache.run(sigmas):
                pass


@CLEAR
def test_a_batch_of_zero_is_refused_by_name(flux):
    with XSlim(flux.model, XSlimConfig(mode="online")) as cache, cache.run(SIGMAS):
        with pytest.raises(ValueError, match="empty batch"):
            flux.velocity(flux.model, torch.zeros(0, *flux.latent_shape), 0.5, torch.zeros(0, dtype=torch.long))


@SURVIVED
def test_stats_belong_to_their_run(flux):
    with XSlim(flux.model, XSlimConfig(mode="online")) as cache:
        with cache.run(SIGMAS):
            sample(flux)
        assert cache.stats.block_evals > 0
        with cache.run(flow_sigmas(7)):  # no model call matches these sigmas
            pass
        assert cache.stats.block_evals == 0 and cache.stats.num_steps == 7


@pytest.fixture(scope="module")
def profile(flux):
    return record_profile(flux.model, lambda: sample(flux), SIGMAS)


def _write(tmp_path, text, name="p.json"):
    path = tmp_path / name
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


@CLEAR
@pytest.mark.parametrize("make,message", [
    (lambda p: os.urandom(4096), "not a profile file"),
    (lambda p: "[" * 100_000 + "]" * 100_000, "not a profile file"),
    (lambda p: p.to_json().replace(str(p.step_change[3]), "NaN", 1), "not finite"),
    (lambda p: p.to_json().replace(str(p.step_change[3]), "-1.0", 1), "not finite"),
    (lambda p: json.dumps({**json.loads(p.to_json()), "stacks": [["double", "x"]]}), "stacks must be"),
    (lambda p: json.dumps({**json.loads(p.to_json()), "block_change": [[0.1]] * p.num_steps}), "one value per block"),
    (lambda p: json.dumps({**json.loads(p.to_json()), "sigmas": [1.0]}), "inconsistent"),
    (lambda p: b"{" + b" " * (9 * 10**6) + b"}", "at most 8 MB"),
])
def test_damaged_or_hostile_profiles_are_refused(profile, tmp_path, make, message):
    with pytest.raises(ValueError, match=message):
        Profile.load(_write(tmp_path, make(profile)))


@CLEAR
def test_a_profile_of_200k_steps_is_refused_quickly(profile, tmp_path):
    n = 200_000
    big = json.loads(profile.to_json())
    big.update(sigmas=[1 - i / n for i in range(n + 1)], step_change=[0.01] * n, block_change=[[0.01] * 8] * n)
    path = _write(tmp_path, json.dumps(big, separators=(",", ":")))
    start = time.perf_counter()
    with pytest.raises(ValueError, match="at most 8 MB|1..10000"):
        Profile.load(path)
    assert time.perf_counter() - start < 5.0


@SURVIVED
def test_a_10k_step_profile_is_planned_in_linear_time(profile):
    from xslim_core.schedule import build_schedule

    n = 10_000
    sigmas = [1 - i / n for i in range(n + 1)]
    long = Profile(profile.family, sigmas, [0.0] + [0.01 + 0.001 * (i % 7) for i in range(n - 1)],
                   [[0.01] * 8 for _ in range(n)], profile.stacks)
    start = time.perf_counter()
    schedule = build_schedule(long, sigmas, preset_config("fast"), profile.stacks)
    assert time.perf_counter() - start < 5.0 and len(schedule.kinds) == n


@CLEAR
def test_saving_never_overwrites_nor_follows_a_planted_link(profile, tmp_path):
    path = tmp_path / "mine.json"
    profile.save(path)
    before = path.read_text()
    with pytest.raises(FileExistsError, match="choose another name"):
        profile.save(path)
    outside = tmp_path / "outside.txt"
    outside.write_text("keep me")
    (tmp_path / "mine2.json.tmp").symlink_to(outside)  # the old fixed temp name, planted
    profile.save(tmp_path / "mine2.json")
    assert outside.read_text() == "keep me" and path.read_text() == before
    profile.save(path, overwrite=True)  # an explicit choice
    assert Profile.load(path).sigmas == profile.sigmas


# -- hooks compose -------------------------------------------------------------------------------------------
@CLEAR
def test_a_second_cache_on_the_same_model_is_refused_and_the_first_keeps_working(flux):
    reference = sample(flux)
    with XSlim(flux.model, XSlimConfig(mode="off")) as first:
        with pytest.raises(ValueError, match="already installed on this model"):
            XSlim(flux.model, XSlimConfig(mode="online"))
        with first.run(SIGMAS):
            assert torch.equal(sample(flux), reference)
        assert first.stats.pattern() == "F" * 12
    assert torch.equal(sample(flux), reference)


@SURVIVED
def test_someone_elses_instance_forward_survives_install_and_remove(flux):
    block = flux.model.transformer_blocks[0]
    calls = []
    theirs_inner = block.forward

    def theirs(*a, **k):
        calls.append(1)
        return theirs_inner(*a, **k)

    block.forward = theirs  # installed before X-Slim
    try:
        with XSlim(flux.model, XSlimConfig(mode="off")) as cache, cache.run(SIGMAS):
            sample(flux)
        assert block.__dict__["forward"] is theirs and len(calls) > 0
        cache = XSlim(flux.model, XSlimConfig(mode="off"))
        later = block.forward
        block.forward = lambda *a, **k: later(*a, **k)  # installed after X-Slim, on top of it
        on_top = block.forward
        cache.remove()
        assert block.__dict__["forward"] is on_top  # not stripped
        n = len(calls)
        sample(flux)
        assert len(calls) > n  # their hook below still runs
    finally:
        block.__dict__.pop("forward", None)


@SURVIVED
def test_layerwise_casting_survives_install_and_remove():
    fam = BUILDERS["flux"]()
    fam.model.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.float32)
    before = sample(fam)
    with XSlim(fam.model, XSlimConfig(mode="online")) as cache, cache.run(SIGMAS):
        cached = sample(fam)
    assert torch.isfinite(cached).all()
    after = sample(fam)
    assert torch.equal(after, before)
    assert fam.model.transformer_blocks[0].attn.to_q.weight.dtype == torch.float8_e4m3fn  # still stored in fp8


@SURVIVED
def test_group_offloading_survives_install_and_remove():
    fam = BUILDERS["flux"]()
    fam.model.enable_group_offload(onload_device=torch.device("cpu"), offload_type="block_level", num_blocks_per_group=1)
    before = sample(fam)
    with XSlim(fam.model, XSlimConfig(mode="off")) as cache, cache.run(SIGMAS):
        assert torch.equal(sample(fam), before)
    assert torch.equal(sample(fam), before)


# -- threads -----------------------------------------------------------------------------------------------
@SURVIVED
def test_two_threads_sampling_through_one_cache_each_get_their_own_result(flux, profile):
    config = preset_config("fast")
    with XSlim(flux.model, config, profile) as cache:
        alone = {}
        for seed in (1, 2):
            with cache.run(SIGMAS):
                alone[seed] = sample(flux, seed=seed)
        together, errors = {}, []

        def worker(seed):
            try:
                for _ in range(2):
                    with cache.run(SIGMAS):
                        together[seed] = sample(flux, seed=seed)
            except Exception as err:  # reported below
                errors.append(err)

        threads = [threading.Thread(target=worker, args=(s,)) for s in (1, 2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not errors
    for seed in (1, 2):
        torch.testing.assert_close(together[seed], alone[seed], rtol=1e-5, atol=1e-5)
