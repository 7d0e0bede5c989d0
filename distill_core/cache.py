"""Block cache with a learned compensation module (the "1.x" in 1.x-step sampling).

At the first student step the whole network runs and the delta of a contiguous block segment n..m is kept
for both streams: delta = output of block m - input of block n. At the second step blocks n..m are skipped
and their output is replaced by input_n + f(delta), where f is a per-stream residual MLP whose last layer
starts at zero, so an untrained f is plain cache reuse.

Blocks are patched only inside a ``with`` block (instance ``forward``), so weights, state-dict keys and the
model outside the context are untouched. Blocks must take (img, txt, ...) and return (img, txt), as the
diffusers HunyuanVideo double and single blocks do; for SD3's JointTransformerBlock the returned pair is
(txt, img) and ``outputs`` would be set to ("txt", "img").
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

try:
    from ..xslim_core.hooks import wrap_forward  # inside the ComfyUI pack (the package comfyui_xslim)
except ImportError:  # run from the repository root, where distill_core is a top-level package
    from xslim_core.hooks import wrap_forward

BLOCK_STACKS = ("transformer_blocks", "single_transformer_blocks")


def model_blocks(model: nn.Module) -> list[nn.Module]:
    """All transformer blocks in execution order (double-stream first, then single-stream)."""
    return [b for name in BLOCK_STACKS for b in getattr(model, name, [])]


@dataclass(frozen=True)
class CacheRange:
    first: int
    last: int  # inclusive

    def __post_init__(self):
        if not 0 <= self.first <= self.last:
            raise ValueError(f"cache range needs 0 <= first <= last, got {self.first}..{self.last}")

    @property
    def size(self) -> int:
        return self.last - self.first + 1

    def check(self, total_blocks: int) -> None:
        if self.last >= total_blocks:
            raise ValueError(f"cache range {self.first}..{self.last} exceeds the model's {total_blocks} blocks")


def effective_nfe(steps: int, cache: CacheRange | None, total_blocks: int) -> float:
    """Full network evaluations: every step counts 1, the cached (last) step counts its computed blocks / all."""
    if cache is None:
        return float(steps)
    return steps - 1 + (total_blocks - cache.size) / total_blocks


class DeltaMLP(nn.Module):
    """f(delta) = delta + W2 GELU(W1 LN(delta) + b1) + b2, with W2 and b2 zero-initialised."""

    def __init__(self, width: int, hidden_mult: int = 2):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, hidden_mult * width)
        self.fc2 = nn.Linear(hidden_mult * width, width)
        nn.init.zeros_(self.fc2.weight)
        nn.init.zeros_(self.fc2.bias)

    def forward(self, delta: torch.Tensor) -> torch.Tensor:
        return delta + self.fc2(nn.functional.gelu(self.fc1(self.norm(delta))))


class Compensation(nn.Module):
    """One DeltaMLP per stream (image tokens, text tokens)."""

    def __init__(self, width: int):
        super().__init__()
        self.img = DeltaMLP(width)
        self.txt = DeltaMLP(width)


@contextmanager
def _patched(blocks_and_forwards):
    """Each block's forward routed through ``forward(inner, ...)`` (``inner``: what the block's forward was,
    including another party's hooks), restored exactly afterwards (``xslim_core.hooks``)."""
    undo = []
    try:
        for block, forward in blocks_and_forwards:
            undo.append(wrap_forward(block, forward))
        yield
    finally:
        for u in reversed(undo):
            u()


@contextmanager
def recording(model: nn.Module, cache: CacheRange):
    """Run the full model and capture {"img": delta, "txt": delta} of the cached segment (yielded dict)."""
    blocks = model_blocks(model)
    cache.check(len(blocks))
    first, last = blocks[cache.first], blocks[cache.last]
    store: dict[str, torch.Tensor] = {}

    def first_forward(inner, img, txt, *args, **kwargs):
        store["img_in"], store["txt_in"] = img, txt
        return inner(img, txt, *args, **kwargs)

    def last_forward(inner, img, txt, *args, **kwargs):
        if first is not last:
            img, txt = inner(img, txt, *args, **kwargs)
        else:
            img, txt = first_forward(inner, img, txt, *args, **kwargs)
        store["img"], store["txt"] = img - store.pop("img_in"), txt - store.pop("txt_in")
        return img, txt

    patches = [(last, last_forward)] if first is last else [(first, first_forward), (last, last_forward)]
    with _patched(patches):
        yield store


@contextmanager
def replaying(model: nn.Module, cache: CacheRange, delta: dict[str, torch.Tensor], compensation: Compensation | None):
    """Skip the cached segment: its output is input + f(delta) (plain reuse when ``compensation`` is None)."""
    blocks = model_blocks(model)
    cache.check(len(blocks))
    comp_img = compensation.img if compensation is not None else (lambda d: d)
    comp_txt = compensation.txt if compensation is not None else (lambda d: d)

    def first_forward(inner, img, txt, *args, **kwargs):
        return img + comp_img(delta["img"]), txt + comp_txt(delta["txt"])

    def skipped(inner, img, txt, *args, **kwargs):
        return img, txt

    patches = [(blocks[cache.first], first_forward)]
    patches += [(blocks[i], skipped) for i in range(cache.first + 1, cache.last + 1)]
    with _patched(patches):
        yield
