"""Forecasting caches from the literature, as bench baselines: TaylorSeer, HiCache and FoCa on the block stack.

All three share one schedule: every model call is one sampling step; the first ``warmup`` steps, every
``interval``-th step after them and the last step run the whole block stack ("activated" steps); the steps in
between run no block at all and take a forecast of the stack's output from the features stored at activated steps.

What is forecast: the stack's output residual on the image tokens, R = (last block's image output) - (first
block's image input), one tensor per call (all batch rows). On a pure forecast step no block runs, so forecasting
every block's own residual and summing them is the same as forecasting R (all three predictors are linear in the
stored features), and forecasting R rather than the last block's output keeps what the step computes anyway: the
input embedding of the current latents (what TaylorSeer keeps too: it forecasts the attention/MLP branches and
adds them to the live residual stream). The text tokens leave the stack unused, so they are passed through.
Measured on the SELECTION images (20 steps, N = 2, 3, 5, Euler and AB2): forecasting the last block's output
instead of the residual changes median PSNR by under 0.15 dB for every predictor.

The predictors are pure functions of the activated history: ``steps`` (step indices, newest first) and ``feats``
(the stored residuals, same order), and the step to forecast. ``divided_differences`` gives Newton's divided
differences f[t0], f[t0,t1], f[t0,t1,t2]; on activated steps spaced N apart, f[t0..ti] = Δ^i F / (i! N^i) with
Δ the backward difference between activated steps, so

* TaylorSeer (Liu et al. 2025, "From Reusing to Forecasting"), order m:
  F(t0 + k) = sum_{i<=m} Δ^i F / (i! N^i) k^i = sum_i f[t0..ti] k^i.
  (Across the warm-up, where the spacing is not N, the divided differences keep the i!-scaled derivative estimates
  consistent.) This is a Taylor series with backward-difference derivatives: exact on polynomials of degree <= 1
  at any order, but order 2 is not exact on quadratics (the backward first difference lags the derivative at t0 by
  half an interval: the error on c t^2 is -c N k).
* HiCache (Feng et al. 2025), the same differences in a scaled physicists' Hermite basis ("dual scaling": the
  offset is contracted by sigma and the i-th term scaled by sigma^i):
  F(t0 + k) = F0 + sum_{1<=i<=m} Δ^i F / i! * sigma^i H_i(sigma k / N).
  sigma^i H_i(sigma x) = a^i He_i(a x) with a = sqrt(2) sigma, so sigma = 1/sqrt(2) gives the probabilists'
  Hermite basis (first-order term equal to TaylorSeer's, second-order term k^2/N^2 - 1), and sigma -> 0 shrinks
  every correction to zero (plain reuse). Exact on constants for every sigma.
* FoCa (Zheng et al. 2025, "Forecast then Calibrate"), a predictor-corrector on the feature ODE dF/dt = g:
  slope at t0 (BDF2, the derivative of the quadratic through the last three activated features):
      g0 = f[t0,t1] + f[t0,t1,t2] (t0 - t1)          (uniform: (3 F0 - 4 F1 + F2) / (2N))
  forecast (explicit Euler):            P = F0 + k g0
  slope at the target, from the stored slope history:  g_k = g0 + 2 f[t0,t1,t2] k
  calibrate (Heun / trapezoid):         C = F0 + k/2 (g0 + g_k) = P + k/2 (g_k - g0)
  With two stored features only, C = P with g0 = f[t0,t1]. Exact on quadratics (it is the quadratic through the
  last three activated features, which TaylorSeer-2 is not); the paper's text was not at hand, so this is the
  brief's reading of it (Euler predictor, Heun corrector with BDF2 slopes), not a transcription.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Sequence

import torch
from torch import nn

from xslim_core.hooks import wrap_forward

log = logging.getLogger(__name__)

Predictor = Callable[[Sequence[float], Sequence[torch.Tensor], float], torch.Tensor]

# HiCache's scale, chosen on the SELECTION images only (`python -m xslim_lab.forecasters --per-class 2`: order 2,
# 20 Euler steps, mean over N = 2, 3, 5 of the median PSNR): sigma 0.1: 35.38, 0.2: 36.64, 0.3: 37.80, 0.4: 36.84,
# 0.5: 37.32, 1/sqrt(2): 31.56 dB.
HICACHE_SIGMA = 0.3


def divided_differences(steps: Sequence[float], feats: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Newton divided differences [f[t0], f[t0,t1], f[t0,t1,t2], ...] of ``feats`` at ``steps`` (newest first)."""
    level = list(feats)
    out = [level[0]]
    for order in range(1, len(feats)):
        level = [(level[j] - level[j + 1]) / (steps[j] - steps[j + order]) for j in range(len(level) - 1)]
        out.append(level[0])
    return out


def taylor_forecast(steps: Sequence[float], feats: Sequence[torch.Tensor], target: float, order: int) -> torch.Tensor:
    """TaylorSeer: sum_i f[t0..ti] k^i (= Δ^i F / (i! N^i) k^i on a uniform grid), k = target - t0; the order is
    capped by the history's length."""
    dd = divided_differences(steps[: order + 1], feats[: order + 1])
    k = target - steps[0]
    out = dd[0]
    for i in range(1, len(dd)):
        out = out + dd[i] * k**i
    return out


def hermite(n: int, x: float) -> float:
    """Physicists' Hermite polynomial H_n(x) (H_0 = 1, H_1 = 2x, H_{n+1} = 2x H_n - 2n H_{n-1})."""
    prev, cur = 1.0, 2.0 * x
    if n == 0:
        return prev
    for m in range(1, n):
        prev, cur = cur, 2.0 * x * cur - 2.0 * m * prev
    return cur


def hermite_forecast(steps: Sequence[float], feats: Sequence[torch.Tensor], target: float, order: int,
                     sigma: float) -> torch.Tensor:
    """HiCache: F0 + sum_{i>=1} Δ^i F / i! * sigma^i H_i(sigma k / N), N the spacing of the last two activated steps;
    Δ^i F / i! = f[t0..ti] N^i."""
    dd = divided_differences(steps[: order + 1], feats[: order + 1])
    if len(dd) == 1:
        return dd[0]
    k, n = target - steps[0], steps[0] - steps[1]
    out = dd[0]
    for i in range(1, len(dd)):
        out = out + dd[i] * (n**i * sigma**i * hermite(i, sigma * k / n))
    return out


def foca_forecast(steps: Sequence[float], feats: Sequence[torch.Tensor], target: float) -> torch.Tensor:
    """FoCa as read here: Euler forecast with the BDF2 slope at the last activated step, Heun calibration with the
    slope at the target extrapolated from the stored slopes (module docstring)."""
    dd = divided_differences(steps[:3], feats[:3])
    k = target - steps[0]
    if len(dd) == 1:
        return dd[0]
    if len(dd) == 2:
        return dd[0] + k * dd[1]
    slope0 = dd[1] + dd[2] * (steps[0] - steps[1])
    forecast = dd[0] + k * slope0
    slope_k = slope0 + 2.0 * dd[2] * k
    return forecast + 0.5 * k * (slope_k - slope0)


def activated(step: int, steps: int, interval: int, warmup: int = 3) -> bool:
    """Whether ``step`` (0-based) of ``steps`` runs the block stack: the first ``warmup`` steps, every ``interval``-th
    step from ``warmup`` on, and the last step."""
    return step < warmup or step == steps - 1 or (step - warmup) % interval == 0


@dataclass(frozen=True)
class Forecaster:
    """A named predictor: ``predict(steps, feats, target)``, and how much history it reads."""

    name: str
    predict: Predictor
    history: int


def taylorseer(order: int) -> Forecaster:
    return Forecaster(f"TaylorSeer o{order}", partial(taylor_forecast, order=order), order + 1)


def hicache(order: int = 2, sigma: float = HICACHE_SIGMA) -> Forecaster:
    return Forecaster(f"HiCache o{order}", partial(hermite_forecast, order=order, sigma=sigma), order + 1)


def foca() -> Forecaster:
    return Forecaster("FoCa", foca_forecast, 3)


class StackForecastHook:
    """Runs the block stack of a diffusers double/single-stream transformer (``transformer_blocks`` then
    ``single_transformer_blocks``, blocks called as ``block(hidden_states, encoder_hidden_states, ...)`` and
    returning both) only at activated steps, and a forecast of its image residual in between (module docstring).

    Use as a context manager around one sampling run with one model call per step. Skipped blocks do not run at
    all, so hooks on them (``BlockExecutions``) count only real evaluations. ``schedule`` records F (ran) and
    . (forecast) per call."""

    def __init__(self, model: nn.Module, forecaster: Forecaster, interval: int, steps: int, warmup: int = 3):
        stacks: tuple[Any, Any] = (model.transformer_blocks, model.single_transformer_blocks)
        self.blocks: list[nn.Module] = [*stacks[0], *stacks[1]]
        self.model, self.forecaster = model, forecaster
        self.interval, self.steps, self.warmup = interval, steps, warmup
        self.step = -1
        self.full = True
        self.history_steps: list[float] = []
        self.history_feats: list[torch.Tensor] = []
        self.schedule = ""
        self._input: torch.Tensor | None = None
        self._handle = None
        self._undo: list[Callable[[], None]] = []

    def __enter__(self):
        self._handle = self.model.register_forward_pre_hook(self._new_call)
        last = len(self.blocks) - 1
        # composing wrappers (another party's forward on a block stays, and comes back as it was on exit)
        self._undo = [wrap_forward(block, partial(self._block, i == 0, i == last)) for i, block in enumerate(self.blocks)]
        return self

    def __exit__(self, *exc):
        for undo in reversed(self._undo):
            undo()
        self._undo = []
        if self._handle is not None:
            self._handle.remove()

    def _new_call(self, module, args):
        self.step += 1
        if self.step >= self.steps:
            raise RuntimeError(f"model called {self.step + 1} times; the schedule is for {self.steps} steps")
        self.full = activated(self.step, self.steps, self.interval, self.warmup) or not self.history_feats
        self.schedule += "F" if self.full else "."

    def _block(self, first: bool, last: bool, original, hidden_states, encoder_hidden_states, *args, **kwargs):
        if first:
            self._input = hidden_states
        if self.full:
            out = original(hidden_states, encoder_hidden_states, *args, **kwargs)
            if last:
                self._store(out[0])
            return out
        if not last:
            return hidden_states, encoder_hidden_states
        assert self._input is not None
        pred = self.forecaster.predict(self.history_steps, self.history_feats, float(self.step))
        return self._input + pred.to(self._input.dtype), encoder_hidden_states

    def _store(self, output: torch.Tensor) -> None:
        assert self._input is not None
        residual = (output.float() - self._input.float()).detach()
        self.history_steps.insert(0, float(self.step))
        self.history_feats.insert(0, residual)
        del self.history_steps[self.forecaster.history:], self.history_feats[self.forecaster.history:]


def forecast_methods(intervals: Sequence[int]) -> list[tuple[Forecaster, int]]:
    """The bench's forecasting rows: TaylorSeer orders 1 and 2, HiCache order 2, FoCa, at every interval."""
    return [(f, n) for f in (taylorseer(1), taylorseer(2), hicache(2), foca()) for n in intervals]


def choose_hicache_sigma(sigmas: Sequence[float] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.7071), steps: int = 20,
                         intervals: Sequence[int] = (2, 3, 5), per_class: int = 1) -> dict:
    """HiCache's scale on the SELECTION images only (never the held-out ones): median PSNR against full Euler
    sampling, averaged over ``intervals``; returns {sigma: score} and logs the pick."""
    from .bench import SELECTION, TeacherBench, per_image_fidelity
    from xslim_demo import latent_to_image, load_teacher

    teacher = load_teacher()
    bench = TeacherBench(teacher, "euler", steps)
    noise, labels = SELECTION.tensors(per_class)
    with torch.inference_mode():
        ref = latent_to_image(bench.plain(steps, noise, labels))
        scores = {}
        for sigma in sigmas:
            psnrs = []
            for n in intervals:
                with StackForecastHook(teacher.model, hicache(2, sigma), n, steps):
                    out = latent_to_image(bench.plain(steps, noise, labels))
                psnrs.append(per_image_fidelity(out, ref)["psnr"])
            scores[sigma] = sum(psnrs) / len(psnrs)
            log.info("HiCache sigma %.4f: mean median PSNR %.2f dB", sigma, scores[sigma])
    best = max(scores, key=lambda s: scores[s])
    log.info("best sigma on SELECTION: %s", best)
    return scores


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="choose HiCache's scale on the SELECTION images")
    parser.add_argument("--per-class", type=int, default=1)
    parser.add_argument("--steps", type=int, default=20)
    a = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    result = choose_hicache_sigma(steps=a.steps, per_class=a.per_class)
    print({s: round(v, 2) for s, v in result.items()})
