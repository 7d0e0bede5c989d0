"""Schedule building (X-Slim "push-then-polish") as small pure functions over a profile.

The coarse pass decides which steps are computed (the push); the fine pass downgrades computed steps in the
stable middle of the U-shaped change curve to block/token refreshes (the polish). Everything is expressed
over sigma, so a profile recorded at 50 steps serves 20 or 100 steps too.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from .config import StepKind, XSlimConfig
from .profile import Profile


def resample_change(profile: Profile, sigmas: list[float]) -> list[float]:
    """Step-change curve of ``profile`` mapped onto another sigma grid.

    The profiled change per unit of sigma is interpolated at the new steps' midpoints and scaled by the new
    sigma spacing, so on the profile's own grid the curve comes back unchanged.
    """
    ps = np.asarray(profile.sigmas, dtype=np.float64)
    v = np.asarray(profile.step_change, dtype=np.float64)
    width = np.abs(ps[:-2] - ps[1:-1])  # sigma distance behind steps 1..T-1
    density = v[1:] / np.maximum(width, 1e-12)
    mids = (ps[:-2] + ps[1:-1]) / 2
    order = np.argsort(mids)
    s = np.asarray(sigmas, dtype=np.float64)
    new_mids = (s[:-2] + s[1:-1]) / 2
    new_density = np.interp(new_mids, mids[order], density[order])
    return [0.0] + (new_density * np.abs(s[:-2] - s[1:-1])).tolist()


def eligible_steps(sigmas: list[float], config: XSlimConfig) -> list[bool]:
    """Steps where caching may act: not among the forced full head/tail, inside [start, end] percent."""
    n = len(sigmas) - 1
    top = max(sigmas[0], 1e-12)
    out = []
    for k in range(n):
        progress = 1.0 - sigmas[k] / top
        forced = k < config.first_full_steps or k >= n - config.last_full_steps
        out.append(not forced and config.start_percent <= progress <= config.end_percent)
    return out


def coarse_pass(change: list[float], eligible: list[bool], threshold: float) -> list[bool]:
    """Which steps are computed: accumulate the change of eligible steps, compute once it reaches ``threshold``."""
    computed, acc = [], 0.0
    for v, ok in zip(change, eligible):
        if not ok:
            computed.append(True)
            acc = 0.0
            continue
        acc += v
        if acc < threshold:
            computed.append(False)
        else:
            computed.append(True)
            acc = 0.0
    return computed


def fine_pass(
    change: list[float], computed: list[bool], eligible: list[bool], partial_kinds: list[StepKind]
) -> list[StepKind]:
    """Downgrade computed steps in the stable span to partial refreshes; every third candidate stays full."""
    return polish(computed, stable_steps(change, eligible) if partial_kinds else [], partial_kinds)


def stable_steps(change: list[float], eligible: list[bool]) -> list[int]:
    """The eligible steps of the stable middle: from the first step at or below the median change to the last
    step above it, those at or below the median (the fine pass's candidates, before the coarse pass's say)."""
    idx = [k for k, ok in enumerate(eligible) if ok]
    if not idx:
        return []
    med = float(np.median([change[k] for k in idx]))
    below = [k for k in idx if change[k] <= med]
    above = [k for k in idx if change[k] > med]
    if not below:
        return []
    start, stop = below[0], (above[-1] if above and above[-1] > below[0] else idx[-1] + 1)
    return [k for k in below if start <= k < stop]


def polish(computed: list[bool], stable: list[int], partial_kinds: list[StepKind]) -> list[StepKind]:
    """The step kinds: computed stable steps cycle full, first partial, second partial."""
    kinds = [StepKind.FULL if c else StepKind.SKIP for c in computed]
    if not partial_kinds:
        return kinds
    cycle = [None, partial_kinds[0], partial_kinds[-1]]  # k mod 3: full, first partial, second partial
    for j, k in enumerate(k for k in stable if computed[k]):
        kind = cycle[j % 3]
        if kind is not None:
            kinds[k] = kind
    return kinds


class BlockSelector:
    """The cumulative block rule: sum the per-block change since the last refreshed block; refresh once the sum
    passes the stack's threshold. The first ``protected`` blocks of every stack always run and reset the sum."""

    def __init__(self, stacks: list[tuple[str, int]], thresholds: dict[str, float], protected: int):
        self.local = [(name, i) for name, count in stacks for i in range(count)]
        self.thresholds = thresholds
        self.protected = protected
        self.acc = 0.0

    def skip(self, block: int, change: float) -> bool:
        stack, local_index = self.local[block]
        if local_index < self.protected:
            self.acc = 0.0
            return False
        self.acc += change
        if self.acc > self.thresholds[stack]:
            self.acc = 0.0
            return False
        return True


def select_blocks(changes: list[float], stacks, thresholds, protected: int) -> frozenset:
    selector = BlockSelector(stacks, thresholds, protected)
    return frozenset(i for i, e in enumerate(changes) if selector.skip(i, e))


def block_thresholds(profile: Profile | None, config: XSlimConfig, stacks) -> dict[str, float]:
    """Per-stack block threshold: the configured value, or the median of the step-averaged block profile."""
    if config.block_threshold is not None:
        return {name: config.block_threshold for name, _ in stacks}
    if profile is None:
        raise ValueError("X-Slim: block refresh needs a block_threshold or a profile to derive one from.")
    mean_per_block = np.mean(np.asarray(profile.block_change[1:] or profile.block_change), axis=0)
    out, start = {}, 0
    for name, count in profile.stacks:
        out[name] = float(np.median(mean_per_block[start : start + count]))
        start += count
    return out


@dataclass
class Schedule:
    """A resolved per-step plan for one run."""

    sigmas: list[float]
    kinds: list[StepKind]
    block_thresholds: dict[str, float]
    predicted_block_evals: float  # per sample, in block units (a full step = number of blocks)
    num_blocks: int

    @property
    def pattern(self) -> str:
        return "".join(k.value for k in self.kinds)

    @property
    def predicted_nfe(self) -> float:
        return self.predicted_block_evals / self.num_blocks

    def record_blocks_at(self, step: int) -> bool:
        """True at a full step followed by a block refresh: it scores blocks and keeps their residuals."""
        return self.kinds[step] is StepKind.FULL and self._before_next_full(step, StepKind.BLOCK)

    def capture_kv_at(self, step: int) -> bool:
        """True at full/block steps followed by a token refresh: they keep every layer's image K/V."""
        return self.kinds[step] in (StepKind.FULL, StepKind.BLOCK) and self._before_next_full(step, StepKind.TOKEN)

    def _before_next_full(self, step: int, kind: StepKind) -> bool:
        return bool(self._ahead[step] & _AHEAD_BIT[kind])

    @functools.cached_property
    def _ahead(self) -> list[int]:
        """Per step: the partial kinds that come after it before the next full step, as bits (one backward pass
        over plain ints, so a long schedule is planned in linear time and the bisection of ``step_threshold``,
        which rebuilds this some 45 times, stays cheap)."""
        out, seen = [0] * len(self.kinds), 0
        for j in range(len(self.kinds) - 1, -1, -1):
            out[j] = seen
            kind = self.kinds[j]
            seen = 0 if kind is StepKind.FULL else seen | _AHEAD_BIT.get(kind, 0)
        return out


_AHEAD_BIT = {StepKind.BLOCK: 1, StepKind.TOKEN: 2}


def build_schedule(profile: Profile | None, sigmas: list[float], config: XSlimConfig, stacks) -> Schedule:
    """The plan for a run over ``sigmas``: the configured pattern, or the coarse and fine passes over the
    profile (which may have been recorded on another sigma grid)."""
    sigmas = [float(s) for s in sigmas]
    n = len(sigmas) - 1
    if n < 1:
        raise ValueError("X-Slim: a run needs at least one step (two sigmas).")
    plan = _Planner(profile, sigmas, config, stacks)
    if config.mode == "off":
        kinds = [StepKind.FULL] * n
    elif config.pattern is not None:
        if len(config.pattern) != n:
            raise ValueError(f"X-Slim: the pattern has {len(config.pattern)} steps but this run has {n}.")
        kinds = [StepKind(c) for c in config.pattern]
    else:
        if profile is None:
            raise ValueError("X-Slim: schedule mode needs a profile or a pattern.")
        kinds = plan.kinds(step_threshold(profile, config, stacks))
    return plan.schedule(kinds)


def step_threshold(profile: Profile, config: XSlimConfig, stacks) -> float:
    """The early-warning line in the profile's units: ``warn`` x the mean step change, or - with
    ``target_speedup`` - the smallest line at which the schedule on the profile's own grid is that much
    cheaper than full sampling (found by bisection). Either way it is fixed over sigma, so a run with
    another step count spaces its computed steps by the same amount of change."""
    mean = float(np.mean(profile.step_change[1:])) if profile.num_steps > 1 else 0.0
    if config.target_speedup is None:
        return config.warn * mean
    full = profile.num_steps * sum(c for _, c in stacks)
    plan = _Planner(profile, profile.sigmas, config, stacks)  # what does not depend on the line, built once

    def speedup(threshold: float) -> float:
        return full / max(plan.schedule(plan.kinds(threshold)).predicted_block_evals, 1e-9)

    lo, hi = 0.0, max(mean, 1e-12)
    while speedup(hi) < config.target_speedup and hi < 1e6 * max(mean, 1e-12):
        hi *= 2.0
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if speedup(mid) >= config.target_speedup else (mid, hi)
    return hi


class _Planner:
    """The coarse and fine passes and the cost prediction for one profile and sigma grid. The resampled change
    curve, the eligible steps, the block thresholds and the nearest-step lookup do not depend on the step
    threshold, so the bisection in ``step_threshold`` computes them once instead of once per pass."""

    def __init__(self, profile: Profile | None, sigmas: list[float], config: XSlimConfig, stacks):
        self.profile, self.sigmas, self.config, self.stacks = profile, sigmas, config, stacks
        self.partial = [k for lvl, k in (("block", StepKind.BLOCK), ("token", StepKind.TOKEN)) if lvl in config.levels]
        self._skipped: dict[int, int] = {}  # step -> blocks reused after it (the bisection asks again and again)

    @property
    def recorded(self) -> Profile:
        """The profile, for the parts of planning that read it (a pattern alone plans without one)."""
        if self.profile is None:
            raise ValueError("X-Slim: schedule mode needs a profile or a pattern.")
        return self.profile

    @functools.cached_property
    def change(self) -> list[float]:
        return resample_change(self.recorded, self.sigmas)

    @functools.cached_property
    def eligible(self) -> list[bool]:
        return eligible_steps(self.sigmas, self.config)

    @functools.cached_property
    def block_thresholds(self) -> dict[str, float]:
        return block_thresholds(self.profile, self.config, self.stacks)

    @functools.cached_property
    def stable(self) -> list[int]:
        return stable_steps(self.change, self.eligible) if self.partial else []

    @functools.cached_property
    def _nearest(self):
        return _nearest_finder(self.recorded.sigmas[:-1])

    def skipped_blocks(self, step: int) -> int:
        """How many blocks a block refresh after full step ``step`` reuses, by the profile's nearest step."""
        if step not in self._skipped:
            row = self.recorded.block_change[self._nearest(self.sigmas[step])]
            self._skipped[step] = len(
                select_blocks(row, self.recorded.stacks, self.block_thresholds, self.config.protected_blocks)
            )
        return self._skipped[step]

    def kinds(self, threshold: float) -> list[StepKind]:
        """Push (the coarse pass at ``threshold``), then polish (the fine pass)."""
        if "step" in self.config.levels:
            computed = coarse_pass(self.change, self.eligible, threshold)
        else:
            computed = [True] * (len(self.sigmas) - 1)
        return polish(computed, self.stable, self.partial)

    def schedule(self, kinds: list[StepKind]) -> Schedule:
        needs_blocks = StepKind.BLOCK in kinds
        thresholds = self.block_thresholds if needs_blocks else {name: 0.0 for name, _ in self.stacks}
        schedule = Schedule(self.sigmas, kinds, thresholds, 0.0, sum(c for _, c in self.stacks))
        skipped = self.skipped_blocks if self.profile is not None else None
        schedule.predicted_block_evals = _predict_cost(schedule, self.config, skipped)
        return schedule


def _predict_cost(schedule: Schedule, config: XSlimConfig, skipped_blocks) -> float:
    """Block evaluations the schedule should cost per sample, with block refreshes predicted from the profile
    (``skipped_blocks(step)``: the blocks a refresh after full step ``step`` reuses; None without a profile)."""
    total, skipped = 0.0, 0
    for k, kind in enumerate(schedule.kinds):
        if kind is StepKind.FULL:
            total += schedule.num_blocks
            if skipped_blocks is not None and schedule.record_blocks_at(k):
                skipped = skipped_blocks(k)
        elif kind is StepKind.BLOCK:
            total += schedule.num_blocks - skipped
        elif kind is StepKind.TOKEN:
            total += schedule.num_blocks * config.token_ratio
    return total


def _nearest_finder(values: list[float]):
    """index of the value nearest to ``x`` (first on ties), by binary search over the sorted values."""
    arr = np.asarray(values, dtype=np.float64)
    order = np.argsort(arr, kind="stable")
    ordered = arr[order]

    def nearest(x: float) -> int:
        pos = int(np.searchsorted(ordered, x))
        candidates = [i for i in (pos - 1, pos) if 0 <= i < len(ordered)]
        best = min(candidates, key=lambda i: (abs(ordered[i] - x), order[i]))
        return int(order[best])

    return nearest
