"""The 1.x student file: its format, its writer, and the checks made from its header alone.

A student file is safetensors holding the student transformer ("model.*", diffusers names unless the
metadata says ``model_keys: comfy``), the base model's conditioning table ("cond.*", the demo's), the
compensation MLPs ("comp.*", when a block range is cached) and metadata: base family, file hash and weights
signature (``identity.py``), architecture, block stacks, sigmas, shift, cached blocks, CFG 1. ``read_header``
checks all of that without loading a tensor or building a model, so any host (the diffusers sampler in
``student.py``, the ComfyUI loader) can refuse a foreign or crafted file before allocating anything. This
module needs neither diffusers nor the X-Slim engine.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass

import torch
from safetensors import safe_open

from .cache import CacheRange, Compensation, effective_nfe
from .files import save_atomic
from .jobfiles import content_hash as file_hash  # noqa: F401 (re-exported: the exact base weights a student was made from)
from .identity import weights_signature

FORMAT = "xslim-1x-student/1"
MAX_TENSORS = 100_000  # far above any real DiT; a header declaring more is refused before it is read
MAX_BLOCKS = 1_000
MAX_STEPS = 64  # a 1.x student takes one or two steps; more is a damaged header
MAX_SIDE, MAX_LATENT = 4096, 1 << 26  # one latent axis, and values in one sample's latent (64 Mi: far above any video)


def file_signature(path: str) -> dict:
    """The weights signature (``identity.py``) of a base model file, over its tensors as stored."""
    with safe_open(path, framework="pt") as f:
        return weights_signature({k: f.get_tensor(k) for k in f.keys()})


def save_student_file(
    path: str,
    model_state: dict,
    model_keys: str,
    stacks: list,
    sigmas: list[float],
    shift: float,
    cache: CacheRange | None,
    compensation: Compensation | None,
    base: dict,
    dtype: torch.dtype = torch.float32,
    extra: dict | None = None,
    more: dict | None = None,
    overwrite: bool = True,
) -> None:
    """A student file from a state dict under ``model_keys`` names ("diffusers", or "comfy" for ComfyUI's own
    classes) and its block ``stacks`` [(name, count)]; written atomically (``files.save_atomic``)."""
    tensors = {f"model.{k}": v for k, v in model_state.items()}
    tensors.update(more or {})
    if cache is not None and compensation is not None:
        tensors.update({f"comp.{k}": v for k, v in compensation.state_dict().items()})
    tensors = {k: v.detach().to("cpu", dtype).contiguous() for k, v in tensors.items()}
    total = sum(n for _, n in stacks)
    meta = {
        "format": FORMAT,
        "base_family": base["family"],
        "base_hash": base.get("hash", "unknown"),
        "architecture": base.get("architecture", ""),
        "model_keys": model_keys,
        "stacks": json.dumps([list(s) for s in stacks]),
        "sigmas": json.dumps(sigmas),
        "shift": str(shift),
        "steps": str(len(sigmas) - 1),
        "cached_blocks": json.dumps([cache.first, cache.last] if cache else None),
        "cfg": "1",
        "effective_nfe": f"{effective_nfe(len(sigmas) - 1, cache, total):.4f}",
        "prediction": "flow velocity (noise - x0), x_t = (1 - sigma) x0 + sigma noise, timestep = sigma * 1000",
        **({"base_signature": json.dumps(base["signature"])} if base.get("signature") else {}),
        **{k: str(v) for k, v in (extra or {}).items()},
    }
    save_atomic(tensors, path, meta, overwrite=overwrite)


@dataclass
class StudentHeader:
    """What a student file declares, read and checked from its header alone."""

    path: str
    meta: dict
    shapes: dict  # tensor name -> shape
    sigmas: list[float]
    cache: CacheRange | None
    stacks: list[tuple[str, int]] | None
    signature: dict | None

    @property
    def model_keys(self) -> str:
        return self.meta.get("model_keys", "diffusers")

    @property
    def steps(self) -> int:
        return len(self.sigmas) - 1

    @property
    def total_blocks(self) -> int | None:
        return sum(n for _, n in self.stacks) if self.stacks else None

    @property
    def effective_nfe(self) -> float:
        total = self.total_blocks
        return (
            effective_nfe(self.steps, self.cache, total) if total else float(self.meta.get("effective_nfe", self.steps))
        )

    def describe(self) -> str:
        cached = f"blocks {self.cache.first}..{self.cache.last} cached" if self.cache else "no cached blocks"
        return f"{self.steps} steps, {cached} - effective NFE {self.effective_nfe:.2f}"


def json_field(path: str, meta: dict, name: str, default=None):
    raw = meta.get(name)
    if raw in (None, ""):
        return default
    try:
        return json.loads(raw)
    except ValueError:
        raise ValueError(f"{path}: metadata field {name!r} is not valid JSON ({raw[:60]!r}).") from None


def _sigmas(path: str, meta: dict) -> list[float]:
    sigmas = json_field(path, meta, "sigmas")
    if not isinstance(sigmas, list) or len(sigmas) < 2:
        raise ValueError(
            f"{path} declares no usable sigmas ({meta.get('sigmas')!r}); a student needs at least two "
            "(one step). The file is incomplete: export it again."
        )
    if len(sigmas) > MAX_STEPS + 1:
        raise ValueError(f"{path} declares {len(sigmas) - 1} steps; a 1.x student takes at most {MAX_STEPS}.")
    if not all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and 0.0 <= v <= 1.0 for v in sigmas
    ) or any(a <= b for a, b in zip(sigmas, sigmas[1:])):
        raise ValueError(
            f"{path}: its sigmas {sigmas[:8]} must be numbers from 1 down to 0, strictly decreasing (flow "
            "matching noise levels); the file is damaged or crafted."
        )
    return [float(v) for v in sigmas]


def latent_shape(path: str, meta: dict, default: list[int]) -> tuple[int, ...]:
    """One sample's latent shape from the header: 2 to 5 whole numbers (FLUX's packed tokens are [tokens,
    channels]) from 1 to MAX_SIDE, at most MAX_LATENT values in all (a crafted shape would allocate without bound
    before the first step)."""
    shape = json_field(path, meta, "latent_shape", default)
    if (
        not isinstance(shape, list)
        or not 2 <= len(shape) <= 5
        or not all(isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= MAX_SIDE for v in shape)
        or math.prod(shape) > MAX_LATENT
    ):
        raise ValueError(
            f"{path}: its latent_shape {str(shape)[:60]} must be 2 to 5 whole numbers from 1 to {MAX_SIDE}, "
            f"at most {MAX_LATENT} values in all (e.g. [16, 1, 8, 8]); the file is damaged or crafted."
        )
    return tuple(shape)


def open_student(path: str):
    """``safe_open`` on a student file, with errors that name the file (never unpickles anything)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Student checkpoint {path} not found.")
    try:
        return safe_open(path, framework="pt")
    except Exception as err:  # safetensors raises several types for a foreign or damaged header
        raise ValueError(
            f"{path} is not a safetensors file ({type(err).__name__}: {err}); student checkpoints are safetensors only."
        ) from None


def read_header(path: str) -> StudentHeader:
    """Check a student file's format, sigmas, cache range and stacks from its header; loads no tensor."""
    with open_student(path) as handle:
        meta = dict(handle.metadata() or {})
        if meta.get("format") != FORMAT:
            raise ValueError(
                f"{path} is not a 1.x-Distill student checkpoint (format {meta.get('format')!r}, expected {FORMAT!r})."
            )
        names = list(handle.keys())
        if len(names) > MAX_TENSORS:
            raise ValueError(f"{path} declares {len(names)} tensors (at most {MAX_TENSORS} are accepted).")
        shapes = {k: tuple(handle.get_slice(k).get_shape()) for k in names}
    stacks = json_field(path, meta, "stacks")
    if stacks is not None:
        if not (
            isinstance(stacks, list)
            and all(
                isinstance(s, list) and len(s) == 2 and isinstance(s[1], int) and 0 <= s[1] <= MAX_BLOCKS
                for s in stacks
            )
        ):
            raise ValueError(
                f"{path}: metadata 'stacks' must list [name, block count] pairs with at most {MAX_BLOCKS} blocks, got {meta['stacks'][:80]!r}."
            )
        stacks = [(str(name), n) for name, n in stacks]
    cached = json_field(path, meta, "cached_blocks")
    cache = None
    if cached is not None:
        if not (isinstance(cached, list) and len(cached) == 2 and all(isinstance(v, int) for v in cached)):
            raise ValueError(f"{path}: metadata 'cached_blocks' must be [first, last] or null, got {cached!r}.")
        try:
            cache = CacheRange(*cached)
            if stacks is not None:
                cache.check(sum(n for _, n in stacks))
        except ValueError as err:
            raise ValueError(f"{path}: {err}.") from None
    return StudentHeader(
        path, meta, shapes, _sigmas(path, meta), cache, stacks, json_field(path, meta, "base_signature")
    )
