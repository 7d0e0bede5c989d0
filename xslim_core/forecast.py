"""Forecasting a skipped step's residual: Newton extrapolation over sigma of a row's computed residuals."""

from __future__ import annotations

import torch

from .state import RowState, TensorStore


def forecast_residual(
    row: RowState, sigma: float, order: int, limit: float, like: torch.Tensor, gain: float = 1.0
) -> torch.Tensor:
    """Newton extrapolation over sigma of a row's step residuals (order 1: last two computed steps, order 2: last
    three), computed in fp32, its correction scaled by ``gain``. Falls back to the next lower order while the
    history is short or when the correction exceeds ``limit`` x the last residual (a diverging forecast is worse
    than plain reuse)."""
    return forecast_rows([row], sigma, order, limit, like, gain)


def _history(row: RowState, order: int) -> list:
    history = [(row.delta_last, row.sigma_last), (row.delta_prev, row.sigma_prev), (row.delta_prev2, row.sigma_prev2)]
    known = next((i for i, (d, s) in enumerate(history[: order + 1]) if d is None or s is None), order + 1)
    return history[:known]


def forecast_rows(
    rows: list[RowState], sigma: float, order: int, limit: float, like: torch.Tensor, gain: float = 1.0
) -> torch.Tensor:
    """``forecast_residual`` for several rows at once, as one batch [rows, ...]. Rows that share their sigma
    history (the usual case: every row of a call was computed at the same steps) are extrapolated together, with
    the divergence check per row and no host sync; others one by one."""
    histories = [_history(r, order) for r in rows]
    if any([s for _, s in h] != [s for _, s in histories[0]] for h in histories[1:]):
        return torch.cat([forecast_rows([r], sigma, order, limit, like, gain) for r in rows])
    ss = [float(s) for _, s in histories[0]]
    ds = [TensorStore.batch([h[i][0] for h in histories], like).float() for i in range(len(ss))]  # each converted once
    last = ds[0]
    dims = tuple(range(1, last.ndim))
    bound = limit * last.abs().sum(dim=dims)
    out = last
    for k in range(1, len(ss)):  # ascending: the highest accepted order wins
        if len(set(ss[: k + 1])) < k + 1:
            continue
        first = (ds[0] - ds[1]) / (ss[0] - ss[1])
        correction = first * (sigma - ss[0])
        if k == 2:
            second = (first - (ds[1] - ds[2]) / (ss[1] - ss[2])) / (ss[0] - ss[2])
            correction = correction + second * (sigma - ss[0]) * (sigma - ss[1])
        ok = (correction.abs().sum(dim=dims) <= bound).reshape(-1, *([1] * len(dims)))
        out = torch.where(ok, last + gain * correction, out)  # gain 1.0: x * 1.0 is exact, the same bits
    return out.to(like.dtype)
