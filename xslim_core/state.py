"""Cache state. It lives per sampling run and per batch row (one row = one sample of one CFG branch)."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import overload

import torch

from .config import StepKind, XSlimConfig


class TensorStore:
    """Moves cache tensors to the configured precision/device and back.

    ``allocation_guard`` (a host's context manager factory, e.g. ComfyUI's ``pause_malloc_graph``) wraps every
    allocation of state that outlives the block it is made in: a host that records allocations per block must
    not see them. With a guard every kept tensor is a copy made under it (never a view of the block's own)."""

    def __init__(self, config: XSlimConfig, allocation_guard=None):
        self.dtype = config.cache_dtype
        self.device = torch.device(config.cache_device) if config.cache_device else None
        self.guard = allocation_guard

    @overload
    def put(self, t: torch.Tensor, copy: bool = True) -> torch.Tensor: ...
    @overload
    def put(self, t: None, copy: bool = True) -> None: ...
    def put(self, t: torch.Tensor | None, copy: bool = True) -> torch.Tensor | None:
        """``copy=False`` only for tensors nothing writes to later (fresh attention K/V)."""
        if t is None:
            return None
        if not copy and self.guard is None and self.dtype in (None, t.dtype) and self.device in (None, t.device):
            return t.detach()
        with self.guarded():
            return t.detach().to(device=self.device or t.device, dtype=self.dtype or t.dtype, copy=True)

    @overload
    def keep(self, t: torch.Tensor) -> torch.Tensor: ...
    @overload
    def keep(self, t: None) -> None: ...
    def keep(self, t: torch.Tensor | None) -> torch.Tensor | None:
        """A same-precision copy of a block's input that the engine holds beyond the block."""
        if t is None:
            return None
        with self.guarded():
            return t.clone()

    def guarded(self):
        return self.guard() if self.guard is not None else contextlib.nullcontext()

    @overload
    @staticmethod
    def get(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor: ...
    @overload
    @staticmethod
    def get(t: None, like: torch.Tensor) -> None: ...
    @staticmethod
    def get(t: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor | None:
        if t is None or (t.dtype == like.dtype and t.device == like.device):
            return t
        return t.to(device=like.device, dtype=like.dtype)

    @staticmethod
    def batch(tensors: list[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
        """Row tensors as one batch in ``like``'s dtype and device (no copy for a single row)."""
        if len(tensors) == 1:
            return TensorStore.get(tensors[0], like)
        return torch.cat([TensorStore.get(t, like) for t in tensors], dim=0)


@dataclass
class RowState:
    """Everything X-Slim remembers about one batch row between steps."""

    delta_last: torch.Tensor | None = None  # O - I of the last computed step (image tokens, [1, N, D])
    delta_prev: torch.Tensor | None = None  # the same, one computed step earlier
    sigma_last: float | None = None
    sigma_prev: float | None = None
    delta_prev2: torch.Tensor | None = None  # forecasting of order 2: one computed step further back
    sigma_prev2: float | None = None
    last_out: torch.Tensor | None = None  # O of the latest step of any kind
    block_residuals: dict = field(default_factory=dict)  # block index -> (image residual, text residual | None)
    skip_blocks: frozenset | None = None  # blocks chosen for reuse at the last full step (None: not scored)
    rate: float | None = None  # relative L1 change of the step residual per unit sigma (online controller)
    curvature: float | None = None  # relative L1 second divided difference over sigma (online, forecasting on)
    last_partial: StepKind | None = None
    kv: dict = field(default_factory=dict)  # attention layer -> (K, V) of image tokens, [1, H, N, Dh]
    segment_delta: tuple | None = None  # segment mode: (image, text | None) delta of the block range
    skips_in_row: int = 0
    refreshes_in_row: int = 0

    def nbytes(self) -> int:
        tensors = [self.delta_last, self.delta_prev, self.delta_prev2, self.last_out, *(self.segment_delta or ())]
        for img, txt in self.block_residuals.values():
            tensors += [img, txt]
        for k, v in self.kv.values():
            tensors += [k, v]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)


@dataclass
class RunStats:
    """Per-run accounting. Block evaluations are counted per row and weighted by the fraction of image tokens
    computed, so a full step of one sample costs ``num_blocks`` and effective NFE = evaluations / blocks / rows."""

    num_blocks: int = 0
    num_steps: int = 0
    decisions: dict = field(default_factory=dict)  # row -> {step: StepKind}
    block_evals: float = 0.0
    block_calls: int = 0  # block forwards actually executed (each over a batch of rows)
    tokens_computed: int = 0
    tokens_total: int = 0
    cache_bytes: int = 0
    cache_bytes_peak: int = 0
    uncached_calls: int = 0  # model calls run without X-Slim (midpoints, ControlNet steps): counted in full
    repeated_calls: int = 0  # model calls at a step a row was already evaluated at (e.g. Heun's corrector)
    non_finite_step: int | None = None  # first checked step whose model output held NaN or inf

    def add_uncached(self, rows: int) -> None:
        self.uncached_calls += 1
        self.block_evals += rows * self.num_blocks
        self.block_calls += self.num_blocks

    def record(self, row, step: int, kind: StepKind) -> None:
        self.decisions.setdefault(row, {})[step] = kind

    @property
    def num_rows(self) -> int:
        return max(1, len(self.decisions))

    @property
    def effective_nfe(self) -> float:
        return self.block_evals / max(1, self.num_blocks) / self.num_rows

    def pattern(self, row=None) -> str:
        """The decision map of one row as letters (F full, B block, T token, . skipped)."""
        row = next(iter(self.decisions), None) if row is None else row
        steps = self.decisions.get(row, {})
        return "".join(steps[k].value if k in steps else "?" for k in range(self.num_steps))

    def counts(self, row=None) -> dict[StepKind, int]:
        p = self.pattern(row)
        return {kind: p.count(kind.value) for kind in StepKind}

    def summary(self) -> str:
        c = self.counts()
        return (
            f"X-Slim: {c[StepKind.FULL]}/{self.num_steps} full, {c[StepKind.BLOCK]} block, "
            f"{c[StepKind.TOKEN]} token, {c[StepKind.SKIP]} skipped - effective NFE {self.effective_nfe:.1f}"
            + (f" (incl. {self.uncached_calls} uncached model calls)" if self.uncached_calls else "")
            + (
                f" - INVALID RESULT: the model's output held NaN or inf at step {self.non_finite_step} (the input "
                "latent or the model produced them; X-Slim's decisions from there on measured nothing)"
                if self.non_finite_step is not None
                else ""
            )
        )

    def as_dict(self) -> dict:
        return {
            "steps": self.num_steps,
            "blocks_per_pass": self.num_blocks,
            "patterns": {str(r): self.pattern(r) for r in self.decisions},
            "block_evals": round(self.block_evals, 3),
            "block_calls": self.block_calls,
            "effective_nfe": round(self.effective_nfe, 3),
            "tokens_computed": self.tokens_computed,
            "tokens_total": self.tokens_total,
            "cache_bytes_peak": self.cache_bytes_peak,
            "uncached_calls": self.uncached_calls,
            "repeated_calls": self.repeated_calls,
            "non_finite_step": self.non_finite_step,
        }

    @property
    def one_call_per_step(self) -> bool:
        """True when every model call was the single evaluation of its step (what a profile needs)."""
        return self.uncached_calls == 0 and self.repeated_calls == 0
