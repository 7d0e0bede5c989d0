"""From node widgets to X-Slim settings: presets, saved profiles, and the compare node's setting lines.

Profiles live in ComfyUI's user folder (``<user>/xslim/profiles/<name>.json``); the pack ships a few in
``profiles/``. A profile turns the presets into compute targets on that model (schedule mode); without
one the dual-threshold controller decides online.
"""

from __future__ import annotations

import os
import re

import torch

from xslim_core import FORECASTING, Profile, XSlimConfig, online_preset_config, preset_config
from .host import XSlimSetupError, XSlimSettings

PRESET_NAMES = ["auto", "slow", "fast", "custom"]
NO_PROFILE = "none (online)"
SHIPPED_PROFILES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "profiles")
CACHE_DTYPES = {"same as model": None, "fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
CACHE_DEVICES = {"same as model": None, "cpu": "cpu"}


def user_profile_dir() -> str:
    import folder_paths

    return os.path.join(folder_paths.get_user_directory(), "xslim", "profiles")


def profile_files() -> dict[str, str]:
    """name -> path. A shipped profile keeps its name: a user file of the same name (placed by hand; the
    Profile node refuses that name) is listed as ``<name> (user)`` so a workflow never changes meaning."""
    found = {}
    for folder in (SHIPPED_PROFILES, user_profile_dir()):
        if os.path.isdir(folder):
            for name in sorted(os.listdir(folder)):
                if name.endswith(".json"):
                    key = name[: -len(".json")]
                    found[f"{key} (user)" if key in found else key] = os.path.join(folder, name)
    return found


def profile_names() -> list[str]:
    return [NO_PROFILE] + sorted(profile_files())


def load_profile(name: str) -> Profile | None:
    if name in (None, "", NO_PROFILE):
        return None
    path = profile_files().get(name)
    if path is None:
        raise XSlimSetupError(f"X-Slim: no profile named {name!r} (looked in {SHIPPED_PROFILES} and {user_profile_dir()}). Record one with the X-Slim Profile node.")
    try:
        return Profile.load(path)
    except Exception as e:  # a damaged file must not reach the sampler
        raise XSlimSetupError(f"X-Slim: the profile file {path} cannot be read ({e}). Record it again.") from None


def save_profile(profile: Profile, name: str, overwrite: bool = False) -> str:
    """Save under the user folder; an existing profile is kept unless ``overwrite`` (a free name is suggested),
    and a shipped profile's name is never taken."""
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_\- ][A-Za-z0-9_.\- ]{0,79}", name) or name.strip(" .") != name.strip():
        raise XSlimSetupError(f"X-Slim: profile name {name!r} may only use letters, digits, spaces, '.', '_' and '-' (1-80 characters, not starting with '.').")
    if os.path.exists(os.path.join(SHIPPED_PROFILES, f"{name}.json")):
        raise XSlimSetupError(f"X-Slim: {name!r} is the name of a shipped profile; choose another name, e.g. {free_name(name)!r}.")
    folder = user_profile_dir()
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"{name}.json")
    try:
        profile.save(path, overwrite=overwrite)
    except FileExistsError:
        raise XSlimSetupError(f"X-Slim: a profile named {name!r} exists already ({path}); choose another name, e.g. "
                              f"{free_name(name)!r}, or turn on overwrite.") from None
    return path


def free_name(name: str) -> str:
    taken = set(profile_files())
    return next(f"{name}-{i}" for i in range(2, 10_000) if f"{name}-{i}" not in taken)


def make_settings(
    preset: str = "auto",
    profile: str = NO_PROFILE,
    early_warning: float = 0.1,
    critical: float = 0.3,
    block_threshold: float = 0.0,
    token_ratio: float = 0.5,
    start_percent: float = 0.0,
    end_percent: float = 1.0,
    cache_precision: str = "same as model",
    cache_device: str = "same as model",
) -> XSlimSettings:
    """The cache node's widgets as settings. ``auto`` is the slow preset (the quality-first one).
    Errors name the widget and the fix; ComfyUI shows them in its error dialog."""
    if preset not in PRESET_NAMES:
        raise XSlimSetupError(f"X-Slim: unknown preset {preset!r}; choose one of {PRESET_NAMES}.")
    if cache_precision not in CACHE_DTYPES or cache_device not in CACHE_DEVICES:
        raise XSlimSetupError(f"X-Slim: cache_precision must be one of {list(CACHE_DTYPES)} and cache_device one of "
                              f"{list(CACHE_DEVICES)}; got {cache_precision!r} and {cache_device!r}.")
    prof = load_profile(profile)
    speed = "slow" if preset == "auto" else preset
    common = dict(
        block_threshold=block_threshold or None,
        start_percent=start_percent,
        end_percent=end_percent,
        cache_dtype=CACHE_DTYPES[cache_precision],
        cache_device=CACHE_DEVICES[cache_device],
    )
    if critical < early_warning:
        raise XSlimSetupError(
            f"X-Slim: the critical threshold ({critical}) is below the early-warning threshold ({early_warning}). "
            "Critical must be the higher line: swap the two values."
        )
    try:
        if speed == "custom":
            mode = dict(mode="schedule", warn=early_warning) if prof else dict(mode="online", warn=early_warning, crit=critical)
            config = XSlimConfig(**mode, token_ratio=token_ratio, **FORECASTING, **common)  # as the presets
        elif prof is not None:
            config = preset_config(speed, **common)
        else:
            config = online_preset_config(speed, **common)
    except ValueError as e:
        raise XSlimSetupError(str(e)) from None
    return XSlimSettings(config, prof)


EXAMPLE_VALUES = {"warn": "0.2", "crit": "0.5", "block": "0.1", "ratio": "0.5"}  # the accepted form, in messages


def parse_setting_line(line: str) -> tuple[str, XSlimSettings | None]:
    """One line of the compare node: ``uncached``, ``slow``, ``fast``, ``custom warn=0.2 crit=0.5``,
    optionally with ``profile=<name>``, ``block=<threshold>`` and ``ratio=<token ratio>``.
    Returns (label, settings or None)."""
    words = line.split()
    if not words:
        raise XSlimSetupError("X-Slim Compare: empty setting line.")
    head, options = words[0].lower(), {}
    for word in words[1:]:
        key, sep, value = word.partition("=")
        if not sep:
            raise XSlimSetupError(f"X-Slim Compare: {word!r} in line {line!r} is not key=value (keys: warn, crit, block, "
                                  "ratio, profile), e.g. 'custom warn=0.2 crit=0.5'.")
        options[key.lower()] = value
    if head in ("uncached", "off", "none"):
        return "uncached", None
    unknown = set(options) - {"warn", "crit", "block", "ratio", "profile"}
    if unknown:
        raise XSlimSetupError(f"X-Slim Compare: unknown key(s) {sorted(unknown)} in line {line!r}; use warn, crit, block, ratio, profile.")
    numbers = {}
    for k in ("warn", "crit", "block", "ratio"):
        if k in options:
            try:
                numbers[k] = float(options[k])
            except ValueError:
                raise XSlimSetupError(
                    f"X-Slim Compare: {k}={options[k]!r} in line {line!r} is not a number; write it as a decimal with "
                    f"no spaces around '=', e.g. {k}={EXAMPLE_VALUES[k]} (a whole line: 'custom warn=0.2 crit=0.5').") from None
    settings = make_settings(
        preset=head,
        profile=options.get("profile", NO_PROFILE),
        early_warning=numbers.get("warn", 0.1),
        critical=numbers.get("crit", max(0.3, numbers.get("warn", 0.1))),
        block_threshold=numbers.get("block", 0.0),
        token_ratio=numbers.get("ratio", 0.5),
    )
    return line.strip(), settings
