"""Bad input through the Python API of the X-Slim engine: configs, schedules, profiles, hooks, threads."""

from __future__ import annotations

import json
import os
import re
import threading
import time

import pytest
import torch

from families import BUILDERS
from xslim_core import Profile, XSlim, XSlimConfig, preset_config, record_profile
from xslim_demo.sampling import flow_sigmas, sample_euler

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
@pytest.mark.parametrize("segment,shown", [
    (5, "got 5 (int)"),
    (("a", "b"), "got ('a', 'b') (tuple)"),
    ((1.5, 3), "got (1.5, 3) (tuple)"),
    ((True, 2), "got (True, 2) (tuple)"),
    ((1, 2, 3), "got (1, 2, 3) (tuple)"),
    ((4, 2), "got (4, 2) (tuple)"),
    ((-1, 2), "got (-1, 2) (tuple)"),
    ("12", "got '12' (str)"),
])
def test_a_segment_that_is_not_two_block_indices_is_refused_by_name(segment, shown):
    with pytest.raises(ValueError, match=r"segment must be segment=\(first, last\): two whole block indices with "
                                         r"0 <= first <= last.*" + re.escape(shown)):
        XSlimConfig(mode="segment", segment=segment)


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
def test_a_profile_file_of_200k_steps_is_refused_quickly(profile, tmp_path):
    n = 200_000
    big = json.loads(profile.to_json())
    big.update(sigmas=[1 - i / n for i in range(n + 1)], step_change=[0.01] * n, block_change=[[0.01] * 8] * n)
    path = _write(tmp_path, json.dumps(big, separators=(",", ":")))
    start = time.perf_counter()
    with pytest.raises(ValueError, match=r"at most 8 MB|1\.\.10000"):
        Profile.load(path)
    assert time.perf_counter() - start < 5.0


def _long_profile(profile, n):
    sigmas = [1 - i / n for i in range(n + 1)]
    return sigmas, dict(family=profile.family, sigmas=sigmas, step_change=[0.0] + [0.01 + 0.001 * (i % 7) for i in range(n - 1)],
                        block_change=[[0.01] * 8 for _ in range(n)], stacks=profile.stacks)


@CLEAR
def test_an_in_memory_profile_of_200k_steps_is_refused_before_planning(flux, profile):
    sigmas, fields = _long_profile(profile, 200_000)
    start = time.perf_counter()
    with pytest.raises(ValueError, match=r"has 200000 steps \(step_change\); a profile has 2\.\.10000"):
        XSlim(flux.model, preset_config("fast"), Profile(**fields))
    assert time.perf_counter() - start < 5.0
    assert getattr(flux.model, "_xslim_cache", None) is None  # nothing was installed


def _fields(profile) -> dict:
    fields = json.loads(profile.to_json())
    del fields["format"]
    return fields


def _poison(fields_or_profile, field, index, value):
    """Put ``value`` at ``field[index]`` (block_change: in row ``index``, block 1); returns the name shown."""
    get = fields_or_profile.get if isinstance(fields_or_profile, dict) else lambda name: getattr(fields_or_profile, name)
    if field == "block_change":
        get(field)[index][1] = value
        return f"block_change[1] is {value!r}"
    get(field)[index] = value
    return f"{field}[{index}] is {value!r}"


@CLEAR
@pytest.mark.parametrize("field,index,value", [
    ("step_change", 3, float("nan")), ("step_change", 5, -0.5), ("sigmas", 2, float("inf")), ("block_change", 4, float("nan")),
])
def test_an_in_memory_non_finite_profile_is_refused_naming_the_field(flux, profile, field, index, value):
    fields = _fields(profile)
    shown = _poison(fields, field, index, value)
    with pytest.raises(ValueError, match=re.escape(shown) + r".*accepted: finite numbers"):
        Profile(**fields)
    changed = Profile(**_fields(profile))
    shown = _poison(changed, field, index, value)  # changed after it was made: refused when it is used
    with pytest.raises(ValueError, match=re.escape(shown)):
        XSlim(flux.model, preset_config("fast"), changed)
    assert getattr(flux.model, "_xslim_cache", None) is None


@CLEAR
@pytest.mark.parametrize("change,message", [
    (dict(step_change="ab"), "step_change must be a list of numbers, got 'ab' (str)"),
    (dict(sigmas=[1.0, None]), "sigmas must be a list of numbers; it holds None (NoneType)"),
    (dict(stacks=[("double", 0)]), "stacks must be [name, block count] pairs (1..1000 blocks), got [('double', 0)]"),
    (dict(family=3), "family must be a model family name (a string), got 3"),
    (dict(sigmas=[1.0, 0.0]), "differ in length): 2 sigmas, 12 step_change values, 12 block_change rows"),
])
def test_an_in_memory_profile_of_wrong_types_or_lengths_is_refused_naming_the_field(profile, change, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        Profile(**{**_fields(profile), **change})


@SURVIVED
def test_a_10k_step_profile_is_planned_in_linear_time(profile):
    from xslim_core.schedule import build_schedule

    sigmas, fields = _long_profile(profile, 10_000)
    long = Profile(**fields)
    start = time.perf_counter()
    schedule = build_schedule(long, sigmas, preset_config("fast"), profile.stacks)
    assert time.perf_counter() - start < 5.0 and len(schedule.kinds) == 10_000


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


def _caching_engaged(stats) -> bool:
    """Fewer block evaluations than computing every step of every row fully, and not every step full."""
    full = stats.num_steps * stats.num_blocks * len(stats.decisions)
    return 0 < stats.block_evals < full and set(stats.pattern()) != {"F"}


@SURVIVED
def test_layerwise_casting_survives_install_and_remove():
    fam = BUILDERS["flux"]()
    fam.model.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.float32)
    before = sample(fam)
    with XSlim(fam.model, XSlimConfig(mode="online")) as cache, cache.run(SIGMAS):
        cached = sample(fam)
    assert torch.isfinite(cached).all()
    assert _caching_engaged(cache.stats)
    after = sample(fam)
    assert torch.equal(after, before)
    assert fam.model.transformer_blocks[0].attn.to_q.weight.dtype == torch.float8_e4m3fn  # still stored in fp8


@SURVIVED
@pytest.mark.parametrize("cached", [False, True])
def test_group_offloading_survives_install_and_remove(cached):
    fam = BUILDERS["flux"]()
    fam.model.enable_group_offload(onload_device=torch.device("cpu"), offload_type="block_level", num_blocks_per_group=1)
    before = sample(fam)
    config = XSlimConfig(mode="online") if cached else XSlimConfig(mode="off")
    with XSlim(fam.model, config) as cache, cache.run(SIGMAS):
        out = sample(fam)
    if cached:  # the same decisions and result as on the same weights without offloading
        plain = BUILDERS["flux"]()
        with XSlim(plain.model, config) as reference, reference.run(SIGMAS):
            expected = sample(plain)
        assert cache.stats.pattern() == reference.stats.pattern() and _caching_engaged(cache.stats)
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    else:
        assert torch.equal(out, before)
    assert torch.equal(sample(fam), before)


@SURVIVED
def test_stats_survive_remove_and_a_new_cache_on_the_same_model_starts_at_zero(flux):
    cache = XSlim(flux.model, XSlimConfig(mode="online"))
    with cache.run(SIGMAS):
        sample(flux)
    figures = cache.stats.as_dict()
    assert figures["block_evals"] > 0
    cache.remove()
    assert cache.stats.as_dict() == figures  # the finished run's figures are still there to read
    with XSlim(flux.model, XSlimConfig(mode="online")) as fresh:
        assert fresh.stats.block_evals == 0 and fresh.stats.decisions == {}
        with fresh.run(SIGMAS):
            sample(flux)
        assert fresh.stats.as_dict() == figures  # its own run only: the same work again, nothing carried over
    assert cache.stats.as_dict() == figures


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
        # Both threads meet at their sixth call of the first block, so their runs provably overlap (mid-run, each
        # with its own state); an engine that serialised runs would time the barrier out and fail the test.
        barrier, calls = threading.Barrier(2, timeout=30), threading.local()

        def meet(module, args):
            calls.n = getattr(calls, "n", 0) + 1
            if calls.n == 6:
                barrier.wait()

        hook = flux.model.transformer_blocks[0].register_forward_pre_hook(meet)

        def worker(seed):
            try:
                for _ in range(2):
                    with cache.run(SIGMAS):
                        together[seed] = sample(flux, seed=seed)
            except Exception as err:  # reported below
                errors.append(err)

        threads = [threading.Thread(target=worker, args=(s,)) for s in (1, 2)]
        try:
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        finally:
            hook.remove()
    assert not errors and barrier.n_waiting == 0 and not barrier.broken
    for seed in (1, 2):
        torch.testing.assert_close(together[seed], alone[seed], rtol=1e-5, atol=1e-5)


# -- counts that stay true (second round) -------------------------------------------------------------------
@CLEAR
def test_a_batch_change_in_the_middle_of_a_run_is_refused_instead_of_undercounting(flux):
    """Before: 6 full calls reported as effective NFE 3.0 (the run started counting afresh at the new batch)."""
    sigmas = flow_sigmas(6, shift=3.0)
    x = torch.randn(1, *flux.latent_shape, generator=torch.Generator().manual_seed(0))
    with XSlim(flux.model, XSlimConfig(mode="online")) as cache, cache.run(sigmas):
        for i in range(3):
            x = x + (sigmas[i + 1] - sigmas[i]) * flux.velocity_fn([1])(x, sigmas[i])
        with pytest.raises(ValueError, match=r"latent changed in the middle of a run \(at step 3.*start a new run"):
            flux.velocity_fn([1, 2])(torch.cat([x, x]), sigmas[3])


@SURVIVED
def test_a_new_batch_at_the_first_step_is_a_new_run_counted_whole(flux):
    sigmas = flow_sigmas(4, shift=3.0)
    with XSlim(flux.model, XSlimConfig(mode="online"), sigmas=sigmas) as cache:
        sample(flux, prompts=(1,), sigmas=sigmas)
        sample(flux, prompts=(1, 2), sigmas=sigmas)
        cache.end_run()
        stats = cache.stats
    # the second run alone, whole: two samples x two CFG branches, every step decided for every row
    assert stats.num_rows == 4 and all("?" not in stats.pattern(row) for row in stats.decisions)
    assert stats.effective_nfe == pytest.approx(stats.block_evals / stats.num_blocks / 4)


@CLEAR
@pytest.mark.parametrize("sigmas,message", [
    ([0.0, 0.0, 0.0], "must fall from the first to the last"),
    ([0.5, 0.8, 0.0], "never rise"),
    ([3.0e38, 1.0e38, 0.0], "at most 1e\\+06"),
])
def test_sigmas_that_cannot_be_a_schedule_are_refused_by_name(flux, sigmas, message):
    with XSlim(flux.model, XSlimConfig(mode="online")) as cache:
        with pytest.raises(ValueError, match=message):
            with cache.run(sigmas):
                pass


@CLEAR
def test_a_one_step_profile_is_refused_when_it_is_made(flux):
    sigmas = flow_sigmas(1, shift=3.0)
    x = torch.randn(1, *flux.latent_shape, generator=torch.Generator().manual_seed(0))
    with pytest.raises(RuntimeError, match=r"1 steps \(step_change\); a profile has 2\.\.10000"):
        record_profile(flux.model, lambda: sample_euler(flux.velocity_fn([1]), x, sigmas, cfg_scale=1.0), sigmas)


@CLEAR
@pytest.mark.parametrize("mode", ["online", "profiled"])
@pytest.mark.parametrize("where", ["input latent", "late blow-up"])
def test_a_run_that_turns_nan_says_its_result_is_invalid(flux, profile, mode, where):
    """Before: a NaN latent summarised as an ordinary run ("12/12 full ... effective NFE 12.0") beside an all-NaN
    image. Now the summary, the stats and a warning name the first checked step whose output was not finite."""
    x = torch.randn(1, *flux.latent_shape, generator=torch.Generator().manual_seed(0))
    velocity = flux.velocity_fn([1])
    if where == "input latent":
        x.view(-1)[0] = float("nan")
    else:  # a blow-up on the way: what enters the model at the last step is already inf
        last_sigma, clean = SIGMAS[-2], velocity
        velocity = lambda x, s: clean(x * float("inf") if s == last_sigma else x, s)  # noqa: E731
    config = preset_config("fast") if mode == "profiled" else XSlimConfig(mode="online")
    with XSlim(flux.model, config, profile=profile if mode == "profiled" else None, sigmas=SIGMAS) as cache:
        with pytest.warns(UserWarning, match="holds NaN or inf at step"):
            x = sample_euler(velocity, x, SIGMAS, cfg_scale=1.0)
        cache.end_run()
        stats = cache.stats
    step = 0 if where == "input latent" else len(SIGMAS) - 2
    assert stats.non_finite_step == step and stats.as_dict()["non_finite_step"] == step
    assert f"INVALID RESULT: the model's output held NaN or inf at step {step}" in stats.summary()


@SURVIVED
def test_a_finite_run_reports_no_invalid_result(flux):
    with XSlim(flux.model, XSlimConfig(mode="online"), sigmas=SIGMAS) as cache:
        sample(flux)
        cache.end_run()
    assert cache.stats.non_finite_step is None and "INVALID" not in cache.stats.summary()
