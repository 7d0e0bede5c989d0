"""Forecasting at skipped steps (an option beyond the paper): off is exactly plain reuse, on keeps the
schedule's cost and the row isolation, and the extrapolation itself is exact on residuals linear in sigma."""

from __future__ import annotations

import pytest
import torch

from families import BUILDERS
from test_engine import cached_sample, noise, profile_of
from xslim_core import XSlimConfig
from xslim_core.forecast import forecast_residual
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
    # a gain scales the step along the slope, nothing else: 0.8 lands 80 % of the way from reuse to the line
    damped = forecast_residual(row, 0.4, 1, 10.0, like, gain=0.8)
    torch.testing.assert_close(damped, d(0.5) + 0.8 * (linear - d(0.5)))
    assert torch.equal(forecast_residual(row, 0.4, 1, 10.0, like, gain=1.0), linear)


@pytest.mark.parametrize("bad", [0.0, -0.5, 2.5, float("nan"), float("inf")])
def test_a_forecast_gain_outside_0_to_2_is_refused_by_name(bad):
    with pytest.raises(ValueError, match=r"forecast_gain must lie in \(0, 2\]"):
        XSlimConfig(forecast=1, forecast_gain=bad)


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


def test_online_error_with_forecasting_is_the_remainder_of_the_linear_forecast():
    from types import SimpleNamespace

    from xslim_core.controller import OnlineController
    from xslim_core.call_context import CallContext

    sigmas = [1.0 - k / 20 for k in range(21)]
    base, slope, curve = torch.randn(1, 4, 8), torch.randn(1, 4, 8), torch.randn(1, 4, 8)
    d = lambda s: base + slope * s + curve * s * s  # noqa: E731
    errors = {}
    for order in (0, 1):
        ctx = SimpleNamespace(sigma=0.6, engine=SimpleNamespace(config=XSlimConfig(mode="online", forecast=order)))
        row = RowState(delta_last=d(0.7), sigma_last=0.7, delta_prev=d(0.8), sigma_prev=0.8)
        CallContext._track_change(ctx, row, d(0.6))  # what the engine measures after a computed step at 0.6
        rel = ((d(0.6) - d(0.7)).abs().sum() / d(0.7).abs().sum()).item()
        assert row.rate == pytest.approx(rel / 0.1, rel=1e-5)
        if order == 0:
            assert row.curvature is None
        else:  # the second divided difference of a quadratic is its curvature coefficient, exactly
            assert row.curvature == pytest.approx((curve.abs().sum() / d(0.7).abs().sum()).item(), rel=1e-3)
        row.delta_prev, row.sigma_prev, row.delta_last, row.sigma_last = row.delta_last, 0.7, d(0.6), 0.6
        controller = OnlineController(XSlimConfig(mode="online", forecast=order), sigmas, 0)
        errors[order] = [controller.error(row, k) for k in (9, 10, 11)]  # 0.55, 0.5, 0.45
    assert errors[0] == pytest.approx([row.rate * x for x in (0.05, 0.1, 0.15)])
    assert errors[1] == pytest.approx([row.curvature * a * b for a, b in ((0.05, 0.15), (0.1, 0.2), (0.15, 0.25))])
    assert errors[1][2] / errors[1][0] > 1.5 * (0.15 / 0.05)  # grows faster than linearly with the distance


@pytest.mark.parametrize("name", ["hunyuan_video", "flux"])
def test_skipped_steps_leave_out_what_only_the_blocks_read_and_change_nothing(name, monkeypatch):
    """A skipped step serves the text refiner / RoPE table (adapter.block_only_inputs) from the last computed
    call: the same images to the bit as computing them, and those modules run only at computed calls."""
    from xslim_core import adapter_for

    f = BUILDERS[name]()
    adapter = type(adapter_for(f.model))
    assert adapter.block_only_inputs
    prof, x = profile_of(f), noise(f)
    config = XSlimConfig(levels={"step"}, forecast=1)
    calls = {n: 0 for n in adapter.block_only_inputs}
    for n in calls:  # count the module's own computation (under X-Slim's wrapper; a forward hook would also
        module = getattr(f.model, n)  # see an output served without computing)

        def counted(*args, _n=n, _forward=module.forward, **kwargs):
            calls[_n] += 1
            return _forward(*args, **kwargs)

        monkeypatch.setattr(module, "forward", counted)
    shortcut, stats, schedule, _ = cached_sample(f, config, prof, x, [1])
    computed = {n: c for n, c in calls.items()}
    monkeypatch.setattr(adapter, "block_only_inputs", ())
    calls.update({n: 0 for n in calls})
    full, _, _, _ = cached_sample(f, config, prof, x, [1])
    assert torch.equal(shortcut, full)
    skipped = schedule.pattern.count(".")
    assert skipped > 0
    for n in calls:  # one model call per step (CFG rows share it); skipped steps left these modules out
        assert calls[n] == len(schedule.pattern) and computed[n] == len(schedule.pattern) - skipped
