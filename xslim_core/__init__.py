"""X-Slim: training-free feature caching for diffusion transformers at the step, block and token level.

Pure PyTorch: this package never imports ComfyUI. The ComfyUI nodes in ``nodes/`` are a thin layer on top.
"""

from .adapters import adapter_for, supported_models
from .config import FORECASTING, ONLINE_PRESETS, PRESETS, StepKind, XSlimConfig, online_preset_config, preset_config
from .diffusers_host import XSlim, record_profile, run_cached
from .engine import XSlimEngine, check_profile
from .profile import Profile
from .schedule import Schedule, build_schedule
from .state import RunStats

__all__ = [
    "FORECASTING",
    "ONLINE_PRESETS",
    "PRESETS",
    "Profile",
    "RunStats",
    "Schedule",
    "StepKind",
    "XSlim",
    "XSlimConfig",
    "XSlimEngine",
    "check_profile",
    "adapter_for",
    "build_schedule",
    "online_preset_config",
    "preset_config",
    "record_profile",
    "run_cached",
    "supported_models",
]
