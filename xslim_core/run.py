"""One sampling run: its schedule, controller, per-row state and statistics; and where a model call falls in it."""

from __future__ import annotations

import math
import threading
from typing import TYPE_CHECKING

from .controller import FullController, OnlineController, ScheduleController, SegmentController
from .profile import Profile
from .protocols import Controller
from .schedule import block_thresholds, build_schedule
from .state import RowState, RunStats

if TYPE_CHECKING:
    from .call_context import CallContext
    from .engine import XSlimEngine


def locate_step(sigmas: list[float], sigma: float, resolution: float = 0.0) -> int | None:
    """Index of ``sigma`` among the run's step sigmas, or None (e.g. a second-order sampler's extra point).
    ``resolution`` is the relative precision the timestep arrived in (bf16 pipelines round it to 1/128)."""
    tol = max(1e-4 * max(1.0, abs(sigmas[0])), resolution * abs(sigma))
    best = min(range(len(sigmas) - 1), key=lambda k: abs(sigmas[k] - sigma))
    return best if abs(sigmas[best] - sigma) <= tol else None


UNSET = object()


class ThreadState(threading.local):
    """An engine's runs and calls belong to the thread that samples: two threads sampling through one engine
    each get their own run, rows and statistics."""

    def __init__(self) -> None:
        self.run: Run | None = None
        self.call: CallContext | None = None
        self.sigmas = UNSET  # a run() context's sigmas, else the engine's own source
        self.last_stats = RunStats()
        self.last_profile: Profile | None = None
        self.profile_problem: str | None = None  # why the last recorded run gave no profile


MAX_SIGMA = 1e6  # far above any schedule (EDM's 80, SD's 14.6, flow matching's 1): beyond, step differences overflow


def check_sigmas(sigmas) -> list[float]:
    """A run's schedule as floats: at least two finite values (one step)."""
    try:
        values = [float(s) for s in sigmas]
    except (TypeError, ValueError):
        raise ValueError(f"X-Slim: sigmas must be a sequence of numbers, got {type(sigmas).__name__}.") from None
    if len(values) < 2 or not all(math.isfinite(v) and abs(v) <= MAX_SIGMA for v in values):
        raise ValueError(
            f"X-Slim: a run needs at least two finite sigmas (one step) of at most {MAX_SIGMA:g}, got {values[:8]}."
        )
    if any(b > a for a, b in zip(values, values[1:])) or values[0] == values[-1]:
        raise ValueError(
            f"X-Slim: sigmas must fall from the first to the last (noise to clean) and never rise, got "
            f"{values[:8]}; steps could not be told apart."
        )
    return values


class Run:
    """One sampling run: its schedule, controller, per-row state and statistics."""

    def __init__(self, engine: XSlimEngine, sigmas: list[float], shape_key):
        self.sigmas = sigmas
        self.shape_key = shape_key
        self.rows: dict = {}
        self.max_step = -1
        cfg = engine.config
        layers = len(engine.layers)
        self.schedule = None
        if engine.recording or cfg.mode == "off":
            self.controller: Controller = FullController(record=engine.recording)
        elif cfg.mode == "segment":
            assert cfg.segment is not None, "XSlimConfig refuses segment mode without a block range"
            self.controller = SegmentController(cfg.segment, len(sigmas) - 1)
        elif cfg.mode == "schedule":
            self.schedule = build_schedule(engine.profile, sigmas, cfg, engine.stacks)
            self.controller = ScheduleController(self.schedule, layers)
        else:
            self.controller = OnlineController(cfg, sigmas, layers)
        self.stats = RunStats(num_blocks=len(engine.blocks), num_steps=len(sigmas) - 1)
        # Block thresholds: the schedule's, the configured value, the profile's medians, or (online, with
        # neither) the medians of the block changes seen at the previous scoring step.
        self.adaptive_blocks = False
        if self.schedule is not None:
            self.block_thresholds = self.schedule.block_thresholds
        elif cfg.block_threshold is not None or engine.recording:
            self.block_thresholds = {name: cfg.block_threshold or 0.0 for name, _ in engine.stacks}
        elif engine.profile is not None:
            self.block_thresholds = block_thresholds(engine.profile, cfg, engine.stacks)
        else:
            self.block_thresholds = {name: 0.0 for name, _ in engine.stacks}
            self.adaptive_blocks = True
        self.profile_steps: dict[int, list] = {}  # step -> [sum step change, sum block changes, count]
        self.visited: set = set()  # (row key, step) evaluated so far
        self.keeps_state = engine.recording or cfg.mode != "off"  # "off" only counts
        # a token refresh scatters its tokens into the last output; without one ahead, no copy of it is kept
        self.keeps_last_out = self.controller.plans_token_refreshes
        self.block_inputs: dict = {}  # (module name, input shapes) -> its last output (see XSlimEngine.block_only_input)
        self.tracks_rate = isinstance(self.controller, OnlineController)

    def measure_cache(self) -> None:
        """Cache memory now and at its peak; once per model call (every group of rows is in by then)."""
        if self.keeps_state:
            self.stats.cache_bytes = sum(r.nbytes() for r in self.rows.values())
            self.stats.cache_bytes_peak = max(self.stats.cache_bytes_peak, self.stats.cache_bytes)

    def row(self, key) -> RowState:
        return self.rows.setdefault(key, RowState())

    def count_visits(self, keys, step: int) -> None:
        """A second evaluation of a step for the same row (Heun's corrector lands on the next step's sigma) is
        counted: a profile of such a run would mix two evaluations per step."""
        if any((key, step) in self.visited for key in keys):
            self.stats.repeated_calls += 1
        self.visited.update((key, step) for key in keys)
