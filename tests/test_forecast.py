"""Forecasting at skipped steps (an option beyond the paper): off is exactly plain reuse, on keeps the
schedule's cost and the row isolation, and the extrapolation itself is exact on residuals linear in sigma."""

from __future__ import annotations

import pytest
import torch

from families import BUILDERS
from test_engine import cached_sample, noise, profile_of
from xslim_core import XSlimConfig
from xslim_core.engine import forecast_residual
from xslim_core.state import RowState


@pytest.fixture(scope="module")
def fam():
    return BUILDERS["flux"]()


def test_forecast_extrapolates_exactly_what_is_polynomial_in_sigma_and_falls_back_safely():
    base, slope, curve = torch.randn(1, 4, 8), torch.randn(1, 4, 8) * 0.1, torch.randn(1, 4, 8) * 0.05
    d = lambda s: base + slope * s + curve * s * s  # noqa: E731
    row = RowState(delta_last=d(0.5), sigma_last=0.5, delta_prev=d(0.6), sigma_prev=0.6, delta_prev2=d(0.7), sigma_prev2=0.7)
    like = torch.zeros(1)
    torch.testing.assert_close(forecast_residual(row, 0.4, 2, 10.0, like), d(0.4), rtol=1e-5, atol=1e-5)
    linear = forecast_residual(row, 0.4, 1, 10.0, like)
    torch.testing.assert_close(linear, d(0.5) + (d(0.5) - d(0.6)) / (0.5 - 0.6) * (0.4 - 0.5))
    short = RowState(delta_last=d(0.5), sigma_last=0.5)  # one computed step: plain reuse
    assert torch.equal(forecast_residual(short, 0.4, 2, 10.0, like), d(0.5))
    assert torch.equal(forecast_residual(row, 0.4, 2, 1e-9, like), d(0.5))  # a diverging forecast is refused


def test_forecast_off_is_exactly_plain_reuse_and_on_costs_exactly_the_schedule(fam):
    prof = profile_of(fam)
    x = noise(fam)
    plain, stats0, schedule, _ = cached_sample(fam, XSlimConfig(levels={"step"}), prof, x, [1])
    off, _, _, _ = cached_sample(fam, XSlimConfig(levels={"step"}, forecast=0), prof, x, [1])
    assert torch.equal(off, plain)
    for order in (1, 2):
        out, stats, sched, _ = cached_sample(fam, XSlimConfig(levels={"step"}, forecast=order), prof, x, [1])
        assert sched.pattern == schedule.pattern and "." in sched.pattern
        assert stats.block_evals / 2 == pytest.approx(sched.predicted_block_evals)  # CFG: two rows
        assert not torch.equal(out, plain) and torch.isfinite(out).all()


def test_batch_and_cfg_rows_stay_isolated_with_forecasting(fam):
    prof = profile_of(fam, prompts=(1, 2))
    config = XSlimConfig(token_ratio=0.5, protected_blocks=1, pattern="FFFF..F.B.F.T.F...FF", forecast=2)
    x = noise(fam, batch=2, seed=5)
    together, _, _, _ = cached_sample(fam, config, prof, x, [1, 2])
    for i, prompt in enumerate([1, 2]):
        alone, _, _, _ = cached_sample(fam, config, prof, x[i : i + 1], [prompt])
        torch.testing.assert_close(together[i : i + 1], alone, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("bad", [3, -1, True, 1.5])
def test_bad_forecast_orders_are_refused(bad):
    with pytest.raises(ValueError, match="forecast"):
        XSlimConfig(forecast=bad)
