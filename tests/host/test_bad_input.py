"""Bad input reaches the user as a clear message while the node runs (ComfyUI's error dialog), never as a
crash inside the sampler; the model without the node keeps working."""

from __future__ import annotations

import pytest
import torch

import comfy_env as ce

CLEAR, SURVIVED = pytest.mark.bad_input("clear error"), pytest.mark.bad_input("survived")


def xslim_cache(model, **widgets):
    from comfyui_xslim.nodes.xslim_nodes import XSlimCache

    values = dict(preset="custom", profile="none (online)", early_warning=0.1, critical=0.3, block_threshold=0.0,
                  token_ratio=0.5, start_percent=0.0, end_percent=1.0, cache_precision="same as model", cache_device="same as model")
    values.update(widgets)
    return XSlimCache.execute(model, **values).args[0]


@CLEAR
def test_unsupported_model_type_names_the_model_and_the_supported_families(pack):
    from comfyui_xslim.nodes.host import XSlimSetupError

    lumina = ce.tiny_lumina2()
    with pytest.raises(XSlimSetupError, match=r"does not support NextDiT.*FLUX.*HunyuanVideo.*SD3.*Wan.*Remove the X-Slim node"):
        xslim_cache(lumina)


@CLEAR
def test_critical_below_early_warning_is_refused_with_the_fix(pack):
    from comfyui_xslim.nodes.host import XSlimSetupError

    with pytest.raises(XSlimSetupError, match=r"critical threshold \(0.1\) is below the early-warning threshold \(0.5\).*swap"):
        xslim_cache(ce.tiny_model("sd3"), early_warning=0.5, critical=0.1)


@CLEAR
def test_profile_of_another_family_is_refused_and_the_model_still_samples(pack, user_dir):
    from comfyui_xslim.nodes.host import XSlimSetupError
    from comfyui_xslim.nodes.settings import save_profile
    from xslim_core import Profile

    flux_profile = Profile(family="flux", sigmas=[1.0, 0.5, 0.0], step_change=[0.1, 0.1], block_change=[[0.1] * 5] * 2,
                           stacks=[("double", 2), ("single", 3)])
    save_profile(flux_profile, "flux-profile")
    sd3 = ce.tiny_model("sd3")
    with pytest.raises(XSlimSetupError, match=r"profile/preset is for 'flux' models.*SD3.*choose another profile"):
        xslim_cache(sd3, preset="fast", profile="flux-profile")
    out = ce.sample(sd3, "sd3", steps=4)
    assert torch.isfinite(out).all()


@CLEAR
def test_unknown_and_damaged_profiles_are_named(pack, user_dir):
    from comfyui_xslim.nodes.host import XSlimSetupError

    with pytest.raises(XSlimSetupError, match=r"no profile named 'missing'.*X-Slim Profile node"):
        xslim_cache(ce.tiny_model("sd3"), preset="slow", profile="missing")
    folder = user_dir / "xslim" / "profiles"
    folder.mkdir(parents=True)
    (folder / "broken.json").write_text("{not json")
    with pytest.raises(XSlimSetupError, match=r"broken.json cannot be read.*Record it again"):
        xslim_cache(ce.tiny_model("sd3"), preset="slow", profile="broken")


@CLEAR
def test_compare_lines_are_checked_before_any_sampling(pack):
    from comfyui_xslim.nodes.host import XSlimSetupError
    from comfyui_xslim.nodes.settings import parse_setting_line

    assert parse_setting_line("uncached") == ("uncached", None)
    label, settings = parse_setting_line("custom warn=0.2 crit=0.4")
    assert label == "custom warn=0.2 crit=0.4" and settings.config.warn == 0.2 and settings.config.crit == 0.4
    for line, message in (("custom warn=abc", r"warn='abc' in line 'custom warn=abc' is not a number; .* e\.g\. warn=0\.2 "),
                          ("custom crit=0,5", r"crit='0,5' .* e\.g\. crit=0\.5 \(a whole line: 'custom warn=0\.2 crit=0\.5'\)"),
                          ("custom warn 0.2", r"'warn' in line 'custom warn 0\.2' is not key=value .* e\.g\. 'custom warn=0\.2 crit=0\.5'"),
                          ("slow speed=2", "unknown key"), ("turbo", "unknown preset"),
                          ("custom warn=0.5 crit=0.1", "below the early-warning")):
        with pytest.raises(XSlimSetupError, match=message):
            parse_setting_line(line)


@CLEAR
def test_compare_refuses_more_setting_lines_than_it_can_run_before_sampling_anything(pack, monkeypatch):
    from comfyui_xslim.nodes import xslim_nodes
    from comfyui_xslim.nodes.host import XSlimSetupError

    sampled = []
    monkeypatch.setattr(xslim_nodes, "sample_latent", lambda *a, **k: sampled.append(1))
    lines = "\n".join(["fast"] * 200)  # ran for many minutes and held the queue before the bound
    with pytest.raises(XSlimSetupError, match=r"200 setting lines; at most 12 .*Split them"):
        xslim_nodes.XSlimCompare.execute(ce.tiny_model("sd3"), ce.conditioning("sd3", 1), ce.conditioning("sd3", 2),
                                         {"samples": torch.zeros(1, 16, 8, 8)}, 0, 4, 2.0, "euler", "simple", lines)
    assert not sampled


@CLEAR
def test_saving_a_profile_never_overwrites_or_takes_a_shipped_name(pack, user_dir):
    from comfyui_xslim.nodes.host import XSlimSetupError
    from comfyui_xslim.nodes.settings import load_profile, save_profile

    shipped = load_profile("demo_teacher")
    path = save_profile(shipped, "mine")
    with pytest.raises(XSlimSetupError, match="exists already.*e.g. 'mine-2'"):
        save_profile(shipped, "mine")
    with pytest.raises(XSlimSetupError, match="name of a shipped profile"):
        save_profile(shipped, "demo_teacher")
    for bad in ("../escape", ".hidden", "a/b", "", "x" * 81):
        with pytest.raises(XSlimSetupError, match="may only use"):
            save_profile(shipped, bad)
    assert save_profile(shipped, "mine", overwrite=True) == path


@SURVIVED
def test_a_user_profile_placed_under_a_shipped_name_does_not_shadow_it(pack, user_dir):
    from comfyui_xslim.nodes.settings import load_profile, profile_files, user_profile_dir

    shipped = load_profile("demo_teacher")
    (user_dir / "xslim" / "profiles").mkdir(parents=True, exist_ok=True)
    other = type(shipped)(**{**shipped.__dict__, "step_change": [v * 3 for v in shipped.step_change]})
    other.save(f"{user_profile_dir()}/demo_teacher.json")
    assert profile_files()["demo_teacher"].endswith("profiles/demo_teacher.json") and "demo_teacher (user)" in profile_files()
    assert load_profile("demo_teacher").step_change == shipped.step_change


@CLEAR
@pytest.mark.parametrize("widget,value", [("cache_precision", "int8"), ("cache_device", "meta")])
def test_cache_widgets_outside_their_lists_are_refused_by_name(pack, widget, value):
    from comfyui_xslim.nodes.host import XSlimSetupError

    with pytest.raises(XSlimSetupError, match=f"cache_precision must be one of .* got .*{value}"):
        xslim_cache(ce.tiny_model("flux"), **{widget: value})
