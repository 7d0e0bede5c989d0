"""Student checkpoints and the host-agnostic 1.x-step sampler.

A student file is safetensors holding the student transformer ("model.*", diffusers names), the base model's
conditioning table ("cond.*"), the compensation MLPs ("comp.*", when a block range is cached) and metadata:
base family and hash, architecture, sigmas, shift, cached blocks, CFG 1. ``load_student`` configures a
sampler from that alone and refuses a file for another base model, a file with missing or unexpected tensors
and a file that is not safetensors, naming the file and the problem.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from xslim_core.demo_model.teacher import ClassConditioner, build_model

from .cache import CacheRange, Compensation, effective_nfe, model_blocks, recording, replaying
from .flow import euler
from .nets import FlowNet

FORMAT = "xslim-1x-student/1"


def file_hash(path: str) -> str:
    """First 16 hex digits of the file's SHA-256: identifies the exact base weights a student was made from."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


@dataclass
class Student:
    net: FlowNet
    sigmas: list[float]
    cache: CacheRange | None
    compensation: Compensation | None
    meta: dict

    @property
    def effective_nfe(self) -> float:
        return effective_nfe(len(self.sigmas) - 1, self.cache, len(model_blocks(self.net.model)))

    @torch.no_grad()
    def sample(self, noise: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return run_student(self.net, noise, labels, self.sigmas, self.cache, self.compensation)


def run_student(net: FlowNet, noise: torch.Tensor, labels: torch.Tensor, sigmas: list[float],
                cache: CacheRange | None = None, compensation: Compensation | None = None) -> torch.Tensor:
    """Euler over the student's sigmas, no CFG; with ``cache`` the last step reuses the previous step's block
    delta (through ``compensation``). Differentiable: callers choose grad or no_grad."""
    return trajectory(net, noise, labels, sigmas, cache, compensation)[0][-1]


def trajectory(net: FlowNet, noise: torch.Tensor, labels: torch.Tensor, sigmas: list[float],
               cache: CacheRange | None = None, compensation: Compensation | None = None):
    """The deployed sampler's states [x_0..x_N], velocities [v_0..v_N-1] and the recorded block delta (or None)."""
    xs, vs, delta, last = [noise], [], None, len(sigmas) - 2
    for i, (s, s_next) in enumerate(zip(sigmas[:-1], sigmas[1:])):
        x = xs[-1]
        sigma = torch.full((x.shape[0],), s, dtype=x.dtype, device=x.device)
        if cache is not None and i == last and delta is not None:
            with replaying(net.model, cache, delta, compensation):
                v = net(x, sigma, labels)
        elif cache is not None and i == last - 1:
            with recording(net.model, cache) as store:
                v = net(x, sigma, labels)
            delta = dict(store)
        else:
            v = net(x, sigma, labels)
        vs.append(v)
        xs.append(euler(x, v, s, s_next))
    return xs, vs, delta


def save_student(path: str, net: FlowNet, sigmas: list[float], shift: float, cache: CacheRange | None,
                 compensation: Compensation | None, base: dict, dtype: torch.dtype = torch.float32, extra: dict | None = None) -> None:
    """Write atomically (tmp + os.replace). ``base`` carries family, hash and architecture of the teacher."""
    tensors = {f"model.{k}": v for k, v in net.model.state_dict().items()}
    tensors.update({f"cond.{k}": v for k, v in net.conditioner.state_dict().items()})
    if cache is not None and compensation is not None:
        tensors.update({f"comp.{k}": v for k, v in compensation.state_dict().items()})
    tensors = {k: v.detach().to("cpu", dtype).contiguous() for k, v in tensors.items()}
    meta = {
        "format": FORMAT, "base_family": base["family"], "base_hash": base["hash"], "architecture": base["architecture"],
        "sigmas": json.dumps(sigmas), "shift": str(shift), "steps": str(len(sigmas) - 1),
        "cached_blocks": json.dumps([cache.first, cache.last] if cache else None), "cfg": "1",
        "effective_nfe": f"{effective_nfe(len(sigmas) - 1, cache, len(model_blocks(net.model))):.4f}",
        "prediction": "flow velocity (noise - x0), x_t = (1 - sigma) x0 + sigma noise, timestep = sigma * 1000",
        **{k: str(v) for k, v in (extra or {}).items()},
    }
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    save_file(tensors, path + ".tmp", metadata=meta)
    os.replace(path + ".tmp", path)


def _read(path: str) -> tuple[dict[str, torch.Tensor], dict]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Student checkpoint {path} not found.")
    try:
        handle = safe_open(path, framework="pt")
    except Exception as err:  # safetensors raises several types for a foreign or damaged header
        raise ValueError(f"{path} is not a safetensors file ({type(err).__name__}: {err}); student checkpoints are "
                         "safetensors only.") from None
    with handle:
        return {k: handle.get_tensor(k) for k in handle.keys()}, dict(handle.metadata() or {})


def _check_keys(path: str, part: str, expected: set[str], found: set[str]) -> None:
    missing, unexpected = sorted(expected - found), sorted(found - expected)
    if missing:
        raise ValueError(f"{path} is missing {len(missing)} {part} tensor(s), e.g. {missing[:3]}; the file is incomplete "
                         "or was written for a different architecture.")
    if unexpected:
        raise ValueError(f"{path} has {len(unexpected)} unexpected {part} tensor(s), e.g. {unexpected[:3]}.")


def load_student(path: str, base_hash: str | None = None, base_family: str | None = None) -> Student:
    """Load and validate a student file; pass the host's base model hash/family to refuse a foreign student."""
    tensors, meta = _read(path)
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path} is not a 1.x-Distill student checkpoint (format {meta.get('format')!r}, expected {FORMAT!r}).")
    if base_family is not None and meta.get("base_family") != base_family:
        raise ValueError(f"{path} is a student of a {meta.get('base_family')!r} model; the base model here is {base_family!r}.")
    if base_hash is not None and meta.get("base_hash") != base_hash:
        raise ValueError(f"{path} was distilled from base model {meta.get('base_hash')}; the base model here is {base_hash}. "
                         "A student only works with the weights it was distilled from.")
    architecture = json.loads(meta["architecture"])
    architecture["rope_axes_dim"] = tuple(architecture["rope_axes_dim"])
    model = build_model(architecture)
    groups = {p: {k[len(p) + 1 :]: v for k, v in tensors.items() if k.startswith(p + ".")} for p in ("model", "cond", "comp")}
    _check_keys(path, "model", set(model.state_dict()), set(groups["model"]))
    _check_keys(path, "conditioning", {"context", "pooled"}, set(groups["cond"]))
    model.load_state_dict({k: v.float() for k, v in groups["model"].items()})
    context, pooled = groups["cond"]["context"].float(), groups["cond"]["pooled"].float()
    conditioner = ClassConditioner(context.shape[0] - 1, context.shape[1], context.shape[2], pooled.shape[1])
    conditioner.load_state_dict({"context": context, "pooled": pooled})
    cached = json.loads(meta.get("cached_blocks", "null"))
    cache = CacheRange(*cached) if cached else None
    compensation = None
    if cache is not None:
        compensation = Compensation(architecture["num_attention_heads"] * architecture["attention_head_dim"])
        _check_keys(path, "compensation", set(compensation.state_dict()), set(groups["comp"]))
        compensation.load_state_dict({k: v.float() for k, v in groups["comp"].items()})
        compensation.eval().requires_grad_(False)
    net = FlowNet(model.eval().requires_grad_(False), conditioner.requires_grad_(False))
    return Student(net, json.loads(meta["sigmas"]), cache, compensation, meta)
