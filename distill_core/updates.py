"""Optimiser steps that are guarded against non-finite values, with gradients averaged across ranks by torch.

Each role's loss comes from one call of its ``parallel.wrap_role`` module (DDP under torchrun), so the
gradient all-reduce happens inside ``loss.backward()``; nothing here averages gradients by hand.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from .parallel import clip_grad_norm


class Ranks:
    """This process's place in the run (a ``parallel.Dist`` view plus the few collectives the loop needs);
    every collective is a no-op in a single process."""

    def __init__(self, device: torch.device | None = None):
        self.active = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank() if self.active else 0
        self.world = dist.get_world_size() if self.active else 1
        self.device = device or torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.active and self.world > 1

    def all_true(self, flag: bool) -> bool:
        if not self.active:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=self._collective_device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return bool(t.item() > 0)

    def mean(self, value: float) -> float:
        if not self.active:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self._collective_device)
        dist.all_reduce(t)
        return t.item() / self.world

    def broadcast_(self, tensor: torch.Tensor) -> None:
        if self.active:
            dist.broadcast(tensor, 0)

    @property
    def _collective_device(self) -> torch.device:
        return self.device if dist.get_backend() == "nccl" else torch.device("cpu")


def guarded_update(loss: torch.Tensor, steps: list[tuple[list, torch.optim.Optimizer, bool]], clip: float,
                   ranks: Ranks) -> float:
    """Backward (averaging across ranks when ``loss`` came from a DDP-wrapped role), clip and step. ``steps``
    holds (params, optimiser, whether to step it now).

    Returns the gradient norm before clipping, or NaN when the loss or the gradients were not finite on any
    rank: then nothing is stepped (every rank takes the same decision, so none waits on a collective).
    """
    params = [p for group, _, _ in steps for p in group]
    for _, opt, _ in steps:
        opt.zero_grad(set_to_none=True)
    if not ranks.all_true(bool(torch.isfinite(loss))):
        return math.nan
    loss.backward()
    norm = clip_grad_norm(params, clip)
    if not ranks.all_true(math.isfinite(norm)):
        for _, opt, _ in steps:
            opt.zero_grad(set_to_none=True)
        return math.nan
    for _, opt, active in steps:
        if active:
            opt.step()
    return norm
