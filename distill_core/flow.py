"""Flow-matching utilities for distillation: the teacher's shifted sigma grid, the student's N-step schedule
snapped to it, its windows, and re-noising between noise levels.

Convention (as in xslim_demo.sampling): x_sigma = (1 - sigma) x0 + sigma noise, velocity v = noise - x0.
Sigmas may be floats or per-sample tensors; tensors are broadcast over the latent dims.
"""

from __future__ import annotations

import torch

GRID_SIZE = 1000  # the teacher grid has GRID_SIZE + 1 points, index 0 <-> sigma 1


def shift_sigma(u: torch.Tensor, shift: float) -> torch.Tensor:
    return shift * u / (1 + (shift - 1) * u)


def teacher_grid(shift: float, size: int = GRID_SIZE) -> torch.Tensor:
    """sigma_i = s u_i / (1 + (s - 1) u_i), u_i = 1 - i / size, for i = 0..size (float64)."""
    u = 1.0 - torch.arange(size + 1, dtype=torch.float64) / size
    return shift_sigma(u, shift)


def student_schedule(steps: int, student_shift: float, grid: torch.Tensor) -> list[int]:
    """Teacher-grid indices of the student's ``steps`` + 1 sigmas: linspace(1, 0) shifted, snapped to the grid."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    wanted = shift_sigma(torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64), student_shift)
    return [int((grid - s).abs().argmin()) for s in wanted]


def window_bounds(indices: list[int], k: int) -> tuple[int, int]:
    """Teacher indices [idx_k, idx_{k+1} - 1] of window k, i.e. sigma in (sigma_{k+1}, sigma_k]."""
    return indices[k], indices[k + 1] - 1


def expand(sigma, like: torch.Tensor) -> torch.Tensor:
    """A float or [B] sigma as a tensor broadcastable against ``like`` ([B, ...])."""
    s = torch.as_tensor(sigma, dtype=like.dtype, device=like.device)
    return s.reshape(-1, *([1] * (like.dim() - 1))) if s.dim() else s


def euler(x: torch.Tensor, v: torch.Tensor, sigma, sigma_next) -> torch.Tensor:
    return x + (expand(sigma_next, x) - expand(sigma, x)) * v


def x0_from_velocity(x: torch.Tensor, v: torch.Tensor, sigma) -> torch.Tensor:
    return x - expand(sigma, x) * v


def renoise(x: torch.Tensor, sigma_from, sigma_to, noise: torch.Tensor) -> torch.Tensor:
    """Move a sample from noise level s1 to a higher level s2 along the forward process.

    alpha = (1 - s2) / (1 - s1) rescales the clean part; beta = sqrt(s2^2 - (alpha s1)^2) tops the noise up so
    the total noise standard deviation is exactly s2.
    """
    s1, s2 = expand(sigma_from, x), expand(sigma_to, x)
    alpha = (1 - s2) / (1 - s1)
    beta = (s2.square() - (alpha * s1).square()).clamp_min(0).sqrt()
    return alpha * x + beta * noise
