"""Honest measurement helpers: alternating A/B timing and paired fidelity."""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch


def alternating_times(runs: dict[str, Callable[[], object]], repeats: int = 3) -> dict[str, list[float]]:
    """Wall-clock seconds of each run, interleaved (A B C A B C ...) so machine noise hits all alike."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, fn in runs.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


def median(values: list[float]) -> float:
    return statistics.median(values)


def psnr(output: torch.Tensor, reference: torch.Tensor) -> float:
    """PSNR in dB against ``reference``, with the reference's value range as peak."""
    mse = torch.mean((output.double() - reference.double()) ** 2).item()
    peak = (reference.max() - reference.min()).item()
    if mse == 0:
        return float("inf")
    return 10.0 * torch.log10(torch.tensor(peak**2 / mse)).item()


class BlockExecutions:
    """Counts block forwards that really ran, by a forward hook on one submodule of each block (its first
    attention module): independent of any cache's own bookkeeping. Each count covers the whole batch."""

    def __init__(self, probes: list[torch.nn.Module]):
        self.count = 0
        self._handles = [m.register_forward_hook(self._hook) for m in probes]

    def _hook(self, module, args, output):
        self.count += 1

    def close(self) -> None:
        for h in self._handles:
            h.remove()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
