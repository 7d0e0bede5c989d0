"""Which base model a student belongs to, in a form any host can check without the base model's file.

A student file names its base by the file's SHA-256 (exact, needs the file) and by a *weights signature*:
a hash of the base's tensor names and shapes (its layout) plus four values sampled at fixed positions of every
tensor (of up to 4096, evenly spread, for larger models). A host that only holds the loaded weights (ComfyUI does not keep the file path) recomputes the
signature and compares the values with a tolerance that accepts the same weights in fp32, fp16 or bf16 and
refuses other weights. Quantised copies (fp8) differ more: the loader offers an explicit override for them.
"""

from __future__ import annotations

import hashlib
import json
import math
from typing import Mapping

import torch

MAX_TENSORS = 4096
SAMPLES = 4
# Rounding to bf16 moves a value by at most 2^-9 of itself (fp16: 2^-11, plus 6e-8 below its normal range);
# a fine-tune or another checkpoint moves weights by far more than that somewhere among the sampled values.
RTOL, ATOL = 4e-3, 1e-7


def _positions(numel: int) -> list[int]:
    # fixed, spread-out flat indices (a multiplicative hash), the same on every host
    return sorted({(i * 2654435761 + 97) % numel for i in range(SAMPLES)})


def layout_hash(shapes: Mapping[str, tuple]) -> str:
    text = "\n".join(f"{k}:{list(shapes[k])}" for k in sorted(shapes))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def weights_signature(tensors: Mapping[str, torch.Tensor]) -> dict:
    """{"layout": hash of names and shapes, "values": {name: sampled values}} of a model's floating tensors.
    Tensors may be on any device; only ``SAMPLES`` values of each are read."""
    floating = {k: t for k, t in tensors.items() if t.is_floating_point()}
    keys = sorted(floating)
    stride = max(1, math.ceil(len(keys) / MAX_TENSORS))
    values = {}
    for key in keys[::stride]:
        flat = floating[key].detach().reshape(-1)
        values[key] = [float(flat[p]) for p in _positions(flat.numel())] if flat.numel() else []
    return {"layout": layout_hash({k: tuple(t.shape) for k, t in floating.items()}), "values": values}


def signature_id(signature: dict) -> str:
    """A short printable name of a signature (values rounded to 3 significant digits)."""
    rounded = {k: [float(f"{v:.3g}") for v in vs] for k, vs in sorted(signature.get("values", {}).items())}
    digest = hashlib.sha256(json.dumps(rounded, sort_keys=True).encode()).hexdigest()[:8]
    return f"layout {signature.get('layout', '?')}, weights {digest}"


def signature_mismatch(expected: dict, found: dict) -> str | None:
    """None when ``found`` is the same weights as ``expected`` (any float precision), else what differs."""
    if expected.get("layout") != found.get("layout"):
        return "the tensor names/shapes differ (another architecture or a file in another key format)"
    for key, want in expected.get("values", {}).items():
        got = found.get("values", {}).get(key)
        if got is None or len(got) != len(want):
            return f"tensor {key} was not sampled the same way"
        for a, b in zip(want, got):
            if not abs(a - b) <= ATOL + RTOL * abs(a):
                return f"tensor {key} holds other values ({a:.6g} vs {b:.6g})"
    return None
