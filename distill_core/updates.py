"""Optimiser steps that are guarded against non-finite values and averaged across data-parallel ranks.

Data parallelism averages gradients with one all-reduce per parameter after backward (what DDP does, minus
the bucketing); parameters a rank did not touch count as zero. This keeps working when a step leaves some
parameters without gradients (the skipped blocks of a cached step), which DDP would need find_unused for.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist


class Ranks:
    """This process's place in the run; all collectives are no-ops in a single process."""

    def __init__(self):
        self.active = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank() if self.active else 0
        self.world = dist.get_world_size() if self.active else 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_true(self, flag: bool) -> bool:
        if not self.active:
            return flag
        t = torch.tensor([1.0 if flag else 0.0])
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return bool(t.item() > 0)

    def average_grads(self, params: list[torch.nn.Parameter]) -> None:
        if not self.active:
            return
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            dist.all_reduce(p.grad)
            p.grad /= self.world

    def mean(self, value: float) -> float:
        if not self.active:
            return value
        t = torch.tensor([value], dtype=torch.float64)
        dist.all_reduce(t)
        return t.item() / self.world

    def broadcast_(self, tensor: torch.Tensor) -> None:
        if self.active:
            dist.broadcast(tensor, 0)


def guarded_update(loss: torch.Tensor, steps: list[tuple[list, torch.optim.Optimizer, bool]], clip: float,
                   ranks: Ranks) -> float:
    """Backward, average, clip and step. ``steps`` holds (params, optimiser, whether to step it now).

    Returns the gradient norm before clipping, or NaN when the loss or the gradients were not finite on any
    rank: then nothing is stepped (every rank takes the same decision, so none waits on a collective).
    """
    params = [p for group, _, _ in steps for p in group]
    for _, opt, _ in steps:
        opt.zero_grad(set_to_none=True)
    if not ranks.all_true(bool(torch.isfinite(loss))):
        return math.nan
    loss.backward()
    ranks.average_grads(params)
    norm = float(torch.nn.utils.clip_grad_norm_(params, clip))
    if not math.isfinite(norm):
        for _, opt, _ in steps:
            opt.zero_grad(set_to_none=True)
        return math.nan
    for _, opt, active in steps:
        if active:
            opt.step()
    return norm
