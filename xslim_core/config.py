"""X-Slim configuration: one validated dataclass, the step kinds, and the speed presets."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field, replace

import torch


class StepKind(str, enum.Enum):
    """What one sampling step does for one sample. The value is its letter in decision maps."""

    FULL = "F"
    BLOCK = "B"  # block refresh: some blocks reuse their cached residual
    TOKEN = "T"  # token refresh: only the most-changing image tokens are recomputed
    SKIP = "."  # the whole block stack is replaced by the cached step residual


LEVELS = frozenset({"step", "block", "token"})
MODES = ("schedule", "online", "off", "segment")


@dataclass(frozen=True)
class XSlimConfig:
    """All knobs of the engine.

    ``mode``:
      * ``"schedule"`` - decisions come from a profile of one uncached run (the released X-Slim method):
        a coarse pass skips steps while the accumulated change stays under ``warn`` x mean(change), a fine
        pass turns computed steps in the stable middle into block/token refreshes (every third stays full).
      * ``"online"`` - the dual-threshold controller: err(t) is the relative L1 change of the step residual,
        extrapolated in sigma from the last two computed steps. err < ``warn`` skips, ``warn`` <= err < ``crit``
        refreshes blocks or tokens, err >= ``crit`` computes fully.
      * ``"off"`` - every step computes fully; outputs equal the model's own forward.
      * ``"segment"`` - a 1.x-step student's sampler: every step computes fully except the last, where the
        blocks ``segment`` = (first, last) reuse the delta (output of ``last`` - input of ``first``) that the
        step before recorded, through the engine's ``segment_transform`` (a learned compensation).
    """

    mode: str = "schedule"
    levels: frozenset = LEVELS
    warn: float = 1.0  # schedule: multiple of the profile's mean step change; online: relative L1
    target_speedup: float | None = None  # schedule: set warn so the profiled run gets this much cheaper
    crit: float = 2.0  # online only: critical line (must exceed warn)
    block_threshold: float | None = None  # None: median of the profiled per-block change (per stack)
    token_ratio: float = 0.5  # fraction of image tokens recomputed at a token refresh, in (0, 1]
    first_full_steps: int = 4
    last_full_steps: int = 1
    protected_blocks: int = 4  # first blocks of each stack that are never skipped
    max_skips: int = 8  # online: longest run of skipped steps
    max_refreshes: int = 2  # online: partial refreshes in a row before a forced full step
    start_percent: float = 0.0  # caching acts only between these fractions of the sigma range
    end_percent: float = 1.0
    pattern: str | None = None  # schedule: a fixed per-step plan in letters (F B T .), used instead of a profile
    cache_dtype: torch.dtype | None = None  # e.g. torch.float16 / bfloat16 to halve cache memory
    cache_device: str | None = None  # e.g. "cpu" to keep caches off the GPU
    segment: tuple[int, int] | None = None  # segment mode: first and last (inclusive) block of the reused range
    # a skipped step's residual: 0 reuses the last computed one as is (the paper); 1 / 2 extrapolate it over
    # sigma from the last two / three computed steps (falling back to lower order while history is short
    # or when the correction is larger than ``forecast_limit`` x the last residual)
    forecast: int = 0
    forecast_limit: float = 0.5
    # the extrapolation's correction is scaled by this gain (1: plain Newton). Below 1 it shrinks the step taken
    # along the measured slope: the residual's slope decays towards the end of a gap, so a full-length linear
    # step overshoots (chosen on the selection set: docs/decisions/0003-speed-presets.md)
    forecast_gain: float = 1.0

    def __post_init__(self):
        _check_types(self)
        if self.mode not in MODES:
            raise ValueError(f"X-Slim: mode must be one of {MODES}, got {self.mode!r}.")
        levels = frozenset(self.levels)
        if not levels <= LEVELS:
            raise ValueError(f"X-Slim: unknown cache level(s) {sorted(levels - LEVELS)}; choose from {sorted(LEVELS)}.")
        object.__setattr__(self, "levels", levels)
        if not 0.0 < self.token_ratio <= 1.0:
            raise ValueError(
                f"X-Slim: token_ratio must lie in (0, 1] (fraction of image tokens recomputed), got {self.token_ratio}."
            )
        for name in ("warn", "crit"):
            if not 0.0 <= getattr(self, name) < float("inf"):
                raise ValueError(f"X-Slim: threshold {name} must be a finite number >= 0, got {getattr(self, name)}.")
        if self.mode == "online" and self.crit < self.warn:
            raise ValueError(
                f"X-Slim: the critical threshold ({self.crit}) must be above the early-warning threshold "
                f"({self.warn}); swap them or raise crit. (Equal lines leave no refresh band: step reuse only.)"
            )
        if self.target_speedup is not None and not self.target_speedup >= 1.0:
            raise ValueError(f"X-Slim: target_speedup must be >= 1 (a compute ratio), got {self.target_speedup}.")
        if self.block_threshold is not None and not self.block_threshold >= 0.0:
            raise ValueError(f"X-Slim: block_threshold must be >= 0 or None, got {self.block_threshold}.")
        for name in ("first_full_steps", "last_full_steps", "protected_blocks", "max_skips", "max_refreshes"):
            if getattr(self, name) < 0:
                raise ValueError(f"X-Slim: {name} must be >= 0, got {getattr(self, name)}.")
        if self.pattern is not None:
            bad = set(self.pattern) - {k.value for k in StepKind}
            if bad or not self.pattern:
                raise ValueError(
                    f"X-Slim: pattern may only use F (full), B (block), T (token) and . (skip); got {sorted(bad)}."
                )
        if self.mode == "segment" or self.segment is not None:
            object.__setattr__(self, "segment", _check_segment(self.mode, self.segment))
        if self.forecast not in (0, 1, 2) or not 0.0 < self.forecast_limit < float("inf"):
            raise ValueError(
                f"X-Slim: forecast must be 0 (reuse), 1 or 2 (extrapolation order) and forecast_limit a positive number; "
                f"got {self.forecast!r} and {self.forecast_limit!r}."
            )
        if not 0.0 < self.forecast_gain <= 2.0:
            raise ValueError(
                f"X-Slim: forecast_gain must lie in (0, 2] (1 = plain linear extrapolation), got {self.forecast_gain!r}."
            )
        if not 0.0 <= self.start_percent < self.end_percent <= 1.0:
            raise ValueError(
                f"X-Slim: need 0 <= start_percent < end_percent <= 1, got {self.start_percent} and {self.end_percent}."
            )

    def with_(self, **changes) -> "XSlimConfig":
        return replace(self, **changes)


NUMBERS = ("warn", "crit", "token_ratio", "start_percent", "end_percent", "forecast_limit", "forecast_gain")
OPTIONAL_NUMBERS = ("target_speedup", "block_threshold")
COUNTS = ("first_full_steps", "last_full_steps", "protected_blocks", "max_skips", "max_refreshes", "forecast")
CACHE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _check_types(cfg: "XSlimConfig") -> None:
    """Wrong types and values are refused here, naming the field, the value and what is accepted, rather than
    failing later deep inside torch (or silently caching wrong)."""

    def bad(name, accepted):
        value = getattr(cfg, name)
        raise ValueError(f"X-Slim: {name} must be {accepted}, got {value!r} ({type(value).__name__}).")

    if not isinstance(cfg.mode, str):
        bad("mode", f"one of {MODES}")
    if (
        isinstance(cfg.levels, str)
        or not hasattr(cfg.levels, "__iter__")
        or not all(isinstance(x, str) for x in cfg.levels)
    ):
        bad("levels", f"a set of level names from {sorted(LEVELS)}")
    for name in NUMBERS:
        if not _is_number(getattr(cfg, name)):
            bad(name, "a number")
    for name in OPTIONAL_NUMBERS:
        if getattr(cfg, name) is not None and not _is_number(getattr(cfg, name)):
            bad(name, "a number or None")
    for name in COUNTS:
        if not isinstance(getattr(cfg, name), int) or isinstance(getattr(cfg, name), bool):
            bad(name, "a whole number >= 0")
    if cfg.pattern is not None and not isinstance(cfg.pattern, str):
        bad("pattern", "a string of step letters (F B T .) or None")
    if cfg.cache_dtype is not None and cfg.cache_dtype not in CACHE_DTYPES:
        bad(
            "cache_dtype",
            "None or one of torch.float16, torch.bfloat16, torch.float32, torch.float64 (an integer or "
            "bool cache would round the cached residuals away)",
        )
    if cfg.cache_device is not None:
        try:
            device = torch.device(cfg.cache_device)
        except (RuntimeError, TypeError):
            bad("cache_device", "None or a torch device such as 'cpu' or 'cuda:0'")
        if device.type == "meta":
            bad("cache_device", "a device that holds data ('meta' keeps none)")
        if device.type == "cuda" and not torch.cuda.is_available():
            bad("cache_device", "a device present on this machine (no CUDA device here)")


def _check_segment(mode: str, seg) -> tuple[int, int]:
    """(first, last) as two whole block indices with 0 <= first <= last, only in segment mode; a bare number, a
    pair of strings or floats would otherwise fail inside int() or len() with no field named."""
    accepted = "segment=(first, last): two whole block indices with 0 <= first <= last, in mode='segment'"
    if mode != "segment":
        raise ValueError(
            f"X-Slim: a segment only works in segment mode: {accepted}; got mode={mode!r}, segment={seg!r}."
        )
    if seg is None:
        raise ValueError(f"X-Slim: segment mode needs {accepted}; got segment=None.")
    pair = isinstance(seg, (tuple, list)) and len(seg) == 2
    if not pair or not all(isinstance(v, int) and not isinstance(v, bool) for v in seg) or not 0 <= seg[0] <= seg[1]:
        raise ValueError(f"X-Slim: segment must be {accepted}; got {seg!r} ({type(seg).__name__}).")
    return int(seg[0]), int(seg[1])


# How every preset treats a skipped step: its residual extrapolated to first order over sigma with the correction
# damped to 0.8, from three full steps at the start. Chosen on the selection set, like the lines below
# (docs/decisions/0003-speed-presets.md); the damping alone was worth 1-4 dB of 5th-percentile PSNR there.
FORECASTING: dict = dict(forecast=1, forecast_gain=0.8, first_full_steps=3)

# Speed presets name the compute ratio they reach on the model's own profile (a threshold means nothing across
# models). They decide per step (skip or compute), the last step forecast too: on the selection set the block and
# token refreshes of the fine pass gave no more fidelity per block evaluation and cost wall-clock, so ``levels`` =
# step; the three-level schedule stays one argument away (``levels`` = all, or the node's custom setting).
_PER_STEP: dict = dict(levels=frozenset({"step"}), last_full_steps=0, **FORECASTING)
PRESETS: dict[str, dict] = {
    "slow": dict(target_speedup=3.6, token_ratio=0.5, **_PER_STEP),
    "fast": dict(target_speedup=5.0, token_ratio=0.7, **_PER_STEP),
}


# Online presets (no profile): a line on the predicted relative error of a skipped step's forecast residual, the
# last step computed (it bought 1-3 dB per image for under one model call there); chosen as above.
ONLINE_PRESETS: dict[str, dict] = {
    "slow": dict(mode="online", warn=0.1, crit=0.1, last_full_steps=1, **FORECASTING),
    "fast": dict(mode="online", warn=0.2, crit=0.2, last_full_steps=1, **FORECASTING),
}


def preset_config(name: str, **overrides) -> XSlimConfig:
    if name not in PRESETS:
        raise ValueError(f"X-Slim: unknown preset {name!r}; choose from {sorted(PRESETS)}.")
    return XSlimConfig(**{**PRESETS[name], **overrides})


def online_preset_config(name: str, **overrides) -> XSlimConfig:
    """The online preset ``name`` (no profile needed), with the profiled preset's token ratio, as the node builds it."""
    if name not in ONLINE_PRESETS:
        raise ValueError(f"X-Slim: unknown online preset {name!r}; choose from {sorted(ONLINE_PRESETS)}.")
    return XSlimConfig(**{"token_ratio": PRESETS[name]["token_ratio"], **ONLINE_PRESETS[name], **overrides})


@dataclass
class StepPlan:
    """The decision for one sample at one step."""

    kind: StepKind
    skip_blocks: frozenset = field(default_factory=frozenset)  # BLOCK: block indices that reuse residuals
    record_blocks: bool = False  # FULL: score blocks and keep residuals for a coming block refresh
    capture_kv: bool = False  # FULL/BLOCK: keep image K/V of every attention layer for a coming token refresh
    segment: tuple[int, int] | None = None  # FULL: record this block range's delta; BLOCK: reuse it instead
