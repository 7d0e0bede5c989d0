"""Block cache with a learned compensation module (the "1.x" in 1.x-step sampling).

At the first student step the whole network runs and the delta of a contiguous block segment n..m is kept
for both streams: delta = output of block m - input of block n. At the second step blocks n..m are skipped
and their output is replaced by input_n + f(delta), where f is a per-stream residual MLP whose last layer
starts at zero, so an untrained f is plain cache reuse.

Blocks come from the model's adapter (``FlowModel.blocks()``: the X-Slim engine's block specs), which say
where each block takes and returns its image and text streams, so SD3's (txt, img) outputs, FLUX's and
HunyuanVideo's work alike. Blocks are patched only inside a ``with`` block (``xslim_core.hooks``: composable,
restored exactly), so weights, state-dict keys and the model outside the context are untouched.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from xslim_core.hooks import wrap_forward
from xslim_core.protocols import PatchableBlock
from xslim_core.segment import range_delta, replay_range


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


def _for_block(handler, spec):
    """A forward wrapper that calls ``handler(spec, inner, args, kwargs)`` for this one block."""
    return lambda inner, *a, **k: handler(spec, inner, a, k)


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


def _specs(blocks: list[PatchableBlock], cache: CacheRange) -> list[PatchableBlock]:
    cache.check(len(blocks))
    return blocks[cache.first : cache.last + 1]


@contextmanager
def recording(blocks: list[PatchableBlock], cache: CacheRange):
    """Run the full model and capture {"img": delta, "txt": delta} of the cached segment (yielded dict).
    ``blocks``: the model's block specs (``FlowModel.blocks()``)."""
    specs = _specs(blocks, cache)
    first, last = specs[0], specs[-1]
    store: dict[str, torch.Tensor] = {}

    def run(spec, inner, args, kwargs):
        call = spec.bind(args, kwargs)
        if spec is first:  # copies: some hosts' blocks (ComfyUI's) add their residuals into their inputs in place
            store["img_in"], store["txt_in"] = call.img.clone(), None if call.txt is None else call.txt.clone()
        img, txt = call.call(inner)
        if spec is last:
            store["img"], store["txt"] = range_delta((store.pop("img_in"), store.pop("txt_in")), (img, txt))
        return call.pack(img, txt)

    patches = [(spec.module, _for_block(run, spec)) for spec in {id(s): s for s in (first, last)}.values()]
    with _patched(patches):
        yield store


@contextmanager
def replaying(
    blocks: list[PatchableBlock], cache: CacheRange, delta: dict[str, torch.Tensor], compensation: Compensation | None
):
    """Skip the cached segment: its output is input + f(delta) (plain reuse when ``compensation`` is None)."""
    specs = _specs(blocks, cache)
    comp_img = compensation.img if compensation is not None else (lambda d: d)
    comp_txt = compensation.txt if compensation is not None else (lambda d: d)

    def first_forward(spec, inner, args, kwargs):
        call = spec.bind(args, kwargs)
        d_txt = None if delta.get("txt") is None else comp_txt(delta["txt"])
        # a range that returned no text stream when recorded returns none when replayed
        return call.pack(
            *replay_range((call.img, None if d_txt is None else call.txt), (comp_img(delta["img"]), d_txt))
        )

    def skipped(spec, inner, args, kwargs):
        call = spec.bind(args, kwargs)
        return call.pack(call.img, call.txt)

    patches = [(specs[0].module, lambda inner, *a, **k: first_forward(specs[0], inner, a, k))]
    patches += [(spec.module, _for_block(skipped, spec)) for spec in specs[1:]]
    with _patched(patches):
        yield
