"""Noise-level sampling inside a student window: the Stage-I importance weights and a uniform sampler.

Weights over teacher indices 0..1000 (0 <-> sigma 1): piecewise linear through fixed anchors, smoothed by a
Gaussian in log space (std 100 indices, edge padding), floored, then normalised within the window the
sample belongs to. The anchors favour the structure-forming noisy half of the trajectory.
"""

from __future__ import annotations

import torch

from .flow import GRID_SIZE

ANCHORS = ((0, 0.6), (300, 1.3), (500, 0.05), (1000, 0.001))


def importance_weights(size: int = GRID_SIZE, smooth_std: float = 100.0, floor: float = 1e-6) -> torch.Tensor:
    idx = torch.arange(size + 1, dtype=torch.float64)
    xs = torch.tensor([a for a, _ in ANCHORS], dtype=torch.float64) * size / GRID_SIZE
    ys = torch.tensor([b for _, b in ANCHORS], dtype=torch.float64)
    seg = torch.searchsorted(xs, idx, right=True).clamp(1, len(xs) - 1)
    frac = (idx - xs[seg - 1]) / (xs[seg] - xs[seg - 1])
    curve = (ys[seg - 1] + frac * (ys[seg] - ys[seg - 1])).log()
    radius = int(3 * smooth_std)
    kernel = torch.exp(-0.5 * (torch.arange(-radius, radius + 1, dtype=torch.float64) / smooth_std) ** 2)
    padded = torch.cat([curve[:1].expand(radius), curve, curve[-1:].expand(radius)])
    smoothed = torch.nn.functional.conv1d(padded[None, None], (kernel / kernel.sum())[None, None])[0, 0]
    return smoothed.exp().clamp_min(floor)


def sample_in_windows(
    windows: torch.Tensor, indices: list[int], weights: torch.Tensor | None, generator: torch.Generator
) -> torch.Tensor:
    """One teacher index per sample inside its window k (uniform when ``weights`` is None)."""
    out = torch.empty(len(windows), dtype=torch.long)
    for i, k in enumerate(windows.tolist()):
        lo, hi = indices[k], indices[k + 1] - 1
        if weights is None:
            out[i] = lo + int(torch.randint(hi - lo + 1, (1,), generator=generator))
        else:
            w = weights[lo : hi + 1]
            out[i] = lo + int(torch.multinomial(w / w.sum(), 1, generator=generator))
    return out
