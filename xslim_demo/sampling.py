"""Flow-matching sampling as small pure functions (x_t = (1 - sigma) x0 + sigma noise, model predicts noise - x0)."""

from __future__ import annotations

from typing import Callable

import torch


def flow_sigmas(steps: int, shift: float = 1.0) -> list[float]:
    """``steps`` + 1 sigmas from 1 to 0, shifted towards high noise by ``shift`` (SD3 uses 3.0)."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    t = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    return (shift * t / (1 + (shift - 1) * t)).tolist()


def euler_step(x: torch.Tensor, velocity: torch.Tensor, sigma: float, sigma_next: float) -> torch.Tensor:
    return x + (sigma_next - sigma) * velocity


def cfg_velocity(
    velocity_fn: Callable[[torch.Tensor, float], torch.Tensor], x: torch.Tensor, sigma: float, scale: float
):
    """Classifier-free guidance with [uncond; cond] batched in one call (the layout diffusers pipelines use)."""
    v_uncond, v_cond = velocity_fn(torch.cat([x, x]), sigma).chunk(2)
    return v_uncond + scale * (v_cond - v_uncond)


@torch.no_grad()
def sample_euler(velocity_fn, x: torch.Tensor, sigmas: list[float], cfg_scale: float | None = None) -> torch.Tensor:
    """Euler sampling over ``sigmas``; with ``cfg_scale`` the velocity function receives a doubled batch."""
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        v = velocity_fn(x, sigma) if cfg_scale is None else cfg_velocity(velocity_fn, x, sigma, cfg_scale)
        x = euler_step(x, v.to(x.dtype), sigma, sigma_next)
    return x


def ab2_step(
    x: torch.Tensor,
    velocity: torch.Tensor,
    previous: torch.Tensor | None,
    sigma: float,
    sigma_next: float,
    h_previous: float | None,
) -> torch.Tensor:
    """One Adams-Bashforth-2 step on the velocity with variable step sizes: the velocity is extrapolated to the
    middle of the step from this step's and the previous step's velocity (Euler while there is no previous)."""
    h = sigma_next - sigma
    if previous is None or not h_previous:
        return x + h * velocity
    r = h / (2.0 * h_previous)
    return x + h * ((1.0 + r) * velocity - r * previous)


@torch.no_grad()
def sample_ab2(velocity_fn, x: torch.Tensor, sigmas: list[float], cfg_scale: float | None = None) -> torch.Tensor:
    """Second-order multistep sampling (Adams-Bashforth-2 on the velocity, the family of ComfyUI's
    ``res_multistep``): one model call per step, like Euler, but second-order accurate in the step size."""
    previous, h_previous = None, None
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        v = (velocity_fn(x, sigma) if cfg_scale is None else cfg_velocity(velocity_fn, x, sigma, cfg_scale)).to(x.dtype)
        x = ab2_step(x, v, previous, sigma, sigma_next, h_previous)
        previous, h_previous = v, sigma_next - sigma
    return x


SAMPLERS = {"euler": sample_euler, "ab2": sample_ab2}
