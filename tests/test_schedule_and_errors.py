"""Schedule building, profiles on disk, bad input, and the layering rule."""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

import pytest
import torch

from families import BUILDERS
from xslim_core import PRESETS, Profile, StepKind, XSlim, XSlimConfig, build_schedule, preset_config, record_profile
from xslim_demo.sampling import flow_sigmas, sample_euler
from xslim_core.schedule import coarse_pass, fine_pass, resample_change

ROOT = pathlib.Path(__file__).resolve().parents[1]
U_CURVE = [0.0, 9.0, 5.0, 3.0] + [1.0] * 40 + [2.0, 3.0, 4.0, 6.0, 8.0, 9.0]  # 50 steps, U-shaped


def u_profile(stacks=(("double", 6), ("single", 10))) -> Profile:
    sigmas = flow_sigmas(50, shift=3.0)
    n_blocks = sum(c for _, c in stacks)
    blocks = [[0.1 * (1 + (i % 3)) for i in range(n_blocks)] for _ in range(50)]
    return Profile("flux", sigmas, list(U_CURVE), blocks, [tuple(s) for s in stacks])


def test_coarse_pass_skips_until_the_accumulated_change_reaches_the_threshold():
    change = [0.0, 5.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]
    eligible = [False, False, True, True, True, True, True, False]
    assert coarse_pass(change, eligible, threshold=2.5) == [True, True, False, False, True, False, False, True]


def test_fine_pass_turns_every_third_stable_candidate_full_and_the_rest_into_refreshes():
    change = [0.0, 9.0] + [1.0] * 10 + [9.0, 9.0]
    computed = [True] * len(change)
    eligible = [False, False] + [True] * 10 + [True, False]
    kinds = fine_pass(change, computed, eligible, [StepKind.BLOCK, StepKind.TOKEN])
    stable = "".join(k.value for k in kinds[2:12])
    assert stable == "FBTFBTFBTF"
    assert kinds[12] is StepKind.FULL and kinds[0] is StepKind.FULL


def test_resampling_a_profile_onto_its_own_grid_returns_it_unchanged():
    prof = u_profile()
    assert resample_change(prof, prof.sigmas) == pytest.approx(prof.step_change)


def test_presets_meet_their_compute_targets_on_a_u_shaped_profile_and_transfer_over_sigma():
    prof = u_profile()
    stacks = prof.stacks
    slow = build_schedule(prof, prof.sigmas, preset_config("slow"), stacks)
    fast = build_schedule(prof, prof.sigmas, preset_config("fast"), stacks)
    assert slow.pattern[:3] == "FFF" and set(slow.pattern) | set(fast.pattern) == {"F", "."}  # per step only
    for schedule, name in ((slow, "slow"), (fast, "fast")):
        target = PRESETS[name]["target_speedup"]
        # the preset's compute target, not far past it: per-step decisions move in whole steps (one in 12-14 here)
        assert target <= 50 / schedule.predicted_nfe < 1.2 * target
    three_levels = build_schedule(prof, prof.sigmas, preset_config("slow", levels={"step", "block", "token"}), stacks)
    assert {"B", "T"} <= set(three_levels.pattern)  # the coarse-to-fine schedule is one argument away
    # over sigma, 100 steps compute far fewer than twice the steps 50 did (only the forced head and tail,
    # which are counted in steps, grow)
    fine_grid = build_schedule(prof, flow_sigmas(100, shift=3.0), preset_config("slow"), stacks)
    computed = lambda s: sum(c != "." for c in s.pattern)
    assert computed(slow) <= computed(fine_grid) <= 1.5 * computed(slow)


def test_profile_round_trips_through_json_and_rejects_bad_files(tmp_path):
    prof = u_profile()
    path = tmp_path / "p.json"
    prof.save(path)
    back = Profile.load(path)
    assert back == prof
    bad = tmp_path / "bad.json"
    bad.write_text("not json")
    with pytest.raises(ValueError, match="bad.json"):
        Profile.load(bad)
    bad.write_text('{"format": "something-else"}')
    with pytest.raises(ValueError, match="not an X-Slim profile"):
        Profile.load(bad)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(token_ratio=0.0), r"token_ratio must lie in \(0, 1\]"),
        (dict(token_ratio=1.5), r"token_ratio must lie in \(0, 1\]"),
        (dict(warn=-1.0), "threshold warn"),
        (dict(mode="online", warn=0.5, crit=0.2), "critical threshold .* must be above the early-warning"),
        (dict(mode="fastest"), "mode must be one of"),
        (dict(levels={"step", "pixel"}), "unknown cache level"),
        (dict(block_threshold=-0.1), "block_threshold"),
        (dict(start_percent=0.8, end_percent=0.2), "start_percent < end_percent"),
        (dict(pattern="FFX."), "pattern may only use"),
        (dict(target_speedup=0.5), "target_speedup must be >= 1"),
    ],
)
def test_bad_settings_are_refused_with_a_message_naming_the_problem(kwargs, message):
    with pytest.raises(ValueError, match=message):
        XSlimConfig(**kwargs)


def test_unknown_preset_name_lists_the_choices():
    with pytest.raises(ValueError, match="choose from"):
        preset_config("warp")


def test_unsupported_model_class_lists_the_supported_ones():
    with pytest.raises(TypeError, match="Supported models: SD3Transformer2DModel, FluxTransformer2DModel"):
        XSlim(torch.nn.Linear(2, 2), XSlimConfig(mode="online"))


def test_a_preset_for_another_model_family_is_refused():
    fam = BUILDERS["sd3"]()
    with pytest.raises(ValueError, match="for 'flux' models, but the model is SD3"):
        XSlim(fam.model, XSlimConfig(), u_profile())


def test_schedule_mode_without_a_profile_says_what_to_do():
    fam = BUILDERS["dit"]()
    with pytest.raises(ValueError, match="record_profile"):
        XSlim(fam.model, XSlimConfig(mode="schedule"))


def test_a_run_without_a_known_schedule_says_how_to_give_one():
    fam = BUILDERS["dit"]()
    x = torch.randn(1, *fam.latent_shape)
    with XSlim(fam.model, XSlimConfig(mode="online")):
        with pytest.raises(RuntimeError, match="cache.run\\(sigmas\\)"):
            sample_euler(fam.velocity_fn([1]), x, flow_sigmas(4))


def test_pattern_of_the_wrong_length_is_refused():
    fam = BUILDERS["dit"]()
    x = torch.randn(1, *fam.latent_shape)
    with XSlim(fam.model, XSlimConfig(pattern="FFFF.F", block_threshold=0.1)) as cache:
        with pytest.raises(ValueError, match="pattern has 6 steps but this run has 4"):
            with cache.run(flow_sigmas(4)):
                sample_euler(fam.velocity_fn([1]), x, flow_sigmas(4))


def test_profile_recording_needs_a_complete_run():
    fam = BUILDERS["dit"]()
    x = torch.randn(1, *fam.latent_shape)
    sig = flow_sigmas(6)
    prof = record_profile(fam.model, lambda: sample_euler(fam.velocity_fn([1]), x, sig), sig)
    assert prof.family == "dit" and prof.num_steps == 6 and len(prof.block_change[0]) == 8
    with pytest.raises(RuntimeError, match="no complete profiled run"):
        record_profile(fam.model, lambda: sample_euler(fam.velocity_fn([1]), x, sig[:4]), sig)


FORBIDDEN = ("comfy", "comfy_api", "comfy_extras", "folder_paths", "server", "nodes", "execution")


@pytest.mark.parametrize("package", ["xslim_core", "distill_core"])
def test_core_packages_never_import_comfyui(package):
    for path in (ROOT / package).rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            for name in names:
                assert name.split(".")[0] not in FORBIDDEN, f"{path.relative_to(ROOT)} imports {name}"
    code = f"import sys, {package}; bad = [m for m in sys.modules if m.split('.')[0] in {FORBIDDEN!r}]; print(bad)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_steps_are_found_from_timesteps_rounded_to_bfloat16():
    from xslim_core.run import locate_step

    sigmas = flow_sigmas(50, shift=3.0)
    eps = torch.finfo(torch.bfloat16).eps
    for scale in (1.0, 1000.0):  # FLUX passes sigma, SD3 / HunyuanVideo pass sigma * 1000
        for k, s in enumerate(sigmas[:-1]):
            rounded = torch.tensor(s * scale).to(torch.bfloat16).item() / scale
            assert locate_step(sigmas, rounded, eps) == k
    midpoint = (sigmas[10] + sigmas[11]) / 2  # a second-order sampler's extra evaluation
    assert locate_step(sigmas, midpoint, 0.0) is None
