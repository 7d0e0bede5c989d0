"""Step controllers: they turn (row state, step) into a StepPlan. Pure decisions, no tensors touched."""

from __future__ import annotations

from .config import StepKind, StepPlan, XSlimConfig
from .schedule import Schedule, eligible_steps
from .state import RowState


def _downgrade(kind: StepKind, row: RowState, has_all_kv: bool) -> StepKind:
    """A cheap step needs what an earlier step recorded; without it the step is computed fully."""
    if kind is StepKind.SKIP and row.delta_last is None:
        return StepKind.FULL
    if kind is StepKind.BLOCK and row.skip_blocks is None:
        return StepKind.FULL
    if kind is StepKind.TOKEN and (row.delta_prev is None or row.last_out is None or not has_all_kv):
        return StepKind.FULL
    return kind


def _reused_blocks(kind: StepKind, row: RowState) -> frozenset:
    """The blocks a block refresh reuses: those the last full step chose (``_downgrade`` makes sure it chose)."""
    if kind is not StepKind.BLOCK:
        return frozenset()
    assert row.skip_blocks is not None, "X-Slim: a block refresh was planned before any blocks were chosen"
    return row.skip_blocks


class ScheduleController:
    """Follows a schedule built from a profile (the released X-Slim method)."""

    def __init__(self, schedule: Schedule, num_attention_layers: int):
        self.schedule = schedule
        self.num_layers = num_attention_layers
        self.plans_token_refreshes = StepKind.TOKEN in schedule.kinds

    def plan(self, row: RowState, step: int) -> StepPlan:
        kind = _downgrade(self.schedule.kinds[step], row, len(row.kv) == self.num_layers)
        return StepPlan(
            kind,
            skip_blocks=_reused_blocks(kind, row),
            record_blocks=kind is StepKind.FULL and self.schedule.record_blocks_at(step),
            capture_kv=kind in (StepKind.FULL, StepKind.BLOCK) and self.schedule.capture_kv_at(step),
        )


class OnlineController:
    """The dual-threshold controller ("push-then-polish").

    err(t) is the relative L1 change of the step residual between the last two computed steps, per unit of
    sigma, times the sigma travelled since the last computed step: a prediction of the accumulated reuse
    error that needs no extra model work. Below ``warn`` the step is skipped, between ``warn`` and ``crit`` a
    block or token refresh runs (alternating), above ``crit`` the step is computed fully.
    """

    def __init__(self, config: XSlimConfig, sigmas: list[float], num_attention_layers: int):
        self.config = config
        self.sigmas = sigmas
        self.eligible = eligible_steps(sigmas, config)
        self.num_layers = num_attention_layers
        self.band = (
            config.crit > config.warn
        )  # equal lines: skip or compute fully, so nothing is recorded for refreshes
        self.plans_token_refreshes = self.band and "token" in config.levels

    def error(self, row: RowState, step: int) -> float:
        """The predicted relative error of the residual a skipped step would add. Plain reuse: the rate of change
        times the sigma travelled since the last computed step. With forecasting (once three computed steps give
        a curvature): the remainder of the linear extrapolation, curvature x (sigma - sigma_last) x (sigma -
        sigma_prev), which is second order in the distance."""
        if row.rate is None or row.sigma_last is None:
            return float("inf")
        sigma = self.sigmas[step]
        if self.config.forecast >= 1 and row.curvature is not None and row.sigma_prev is not None:
            return row.curvature * abs(row.sigma_last - sigma) * abs(row.sigma_prev - sigma)
        return row.rate * abs(row.sigma_last - sigma)

    def plan(self, row: RowState, step: int) -> StepPlan:
        cfg = self.config
        levels = cfg.levels
        kind = StepKind.FULL
        band = self.band
        if self.eligible[step]:
            err = self.error(row, step)
            if err < cfg.warn and "step" in levels and row.skips_in_row < cfg.max_skips:
                kind = StepKind.SKIP
            elif band and err < cfg.crit and row.refreshes_in_row < cfg.max_refreshes:
                kind = self._refresh_kind(row)
        kind = _downgrade(kind, row, len(row.kv) == self.num_layers)
        return StepPlan(
            kind,
            skip_blocks=_reused_blocks(kind, row),
            record_blocks=band and kind is StepKind.FULL and "block" in levels,
            capture_kv=band and kind in (StepKind.FULL, StepKind.BLOCK) and "token" in levels,
        )

    def _refresh_kind(self, row: RowState) -> StepKind:
        options = [k for lvl, k in (("block", StepKind.BLOCK), ("token", StepKind.TOKEN)) if lvl in self.config.levels]
        if not options:
            return StepKind.FULL
        if len(options) == 2 and row.last_partial is StepKind.BLOCK:
            return StepKind.TOKEN
        return options[0]


class SegmentController:
    """A 1.x-step student's plan: full steps; the step before the last records the delta of the block range
    ``segment``, the last step reuses it for those blocks and computes the rest."""

    plans_token_refreshes = False

    def __init__(self, segment: tuple[int, int], num_steps: int):
        self.segment = segment
        self.blocks = frozenset(range(segment[0], segment[1] + 1))
        self.num_steps = num_steps

    def plan(self, row: RowState, step: int) -> StepPlan:
        if step == self.num_steps - 1 and row.segment_delta is not None:
            return StepPlan(StepKind.BLOCK, skip_blocks=self.blocks, segment=self.segment)
        return StepPlan(StepKind.FULL, segment=self.segment if step == self.num_steps - 2 else None)


class FullController:
    """Computes every step; used for mode "off" and for profiling."""

    plans_token_refreshes = False

    def __init__(self, record: bool = False):
        self.record = record

    def plan(self, row: RowState, step: int) -> StepPlan:
        return StepPlan(StepKind.FULL, record_blocks=self.record)
