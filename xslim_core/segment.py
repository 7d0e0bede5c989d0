"""A block range replayed from one recorded delta: the engine's segment mode (a 1.x student sampling) and the
student's cached step while it trains (``distill_core.cache``) both record and replay through these two, so
the compensation a student learns is applied to the same quantity it sees in training."""

from __future__ import annotations

import operator
from typing import Callable

import torch

Streams = tuple[torch.Tensor | None, ...]  # (image tokens, text tokens); None where a stream is absent


def range_delta(inputs: Streams, outputs: Streams) -> Streams:
    """What the block range added to each stream: output minus input, None where either side lacks the stream."""
    return tuple(None if o is None or i is None else o - i for i, o in zip(inputs, outputs))


def replay_range(
    inputs: tuple[torch.Tensor, torch.Tensor | None], delta: Streams, add: Callable = operator.add
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The range's output without running it: each stream's input plus its (compensated) delta; a stream
    without a delta passes as it came. ``add``: how a residual is added (the engine clamps fp16 sums)."""
    (image, text), (d_image, d_text) = inputs, delta
    return (image if d_image is None else add(image, d_image)), (text if d_text is None else add(text, d_text))
