"""The 1.x student in diffusers: load a student file (``student_file.py``) into the demo architecture and
sample it (Euler over the student's sigmas, the cached last step through the compensation)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from safetensors import safe_open

from xslim_core.adapters import adapter_for
from xslim_lab.demo_model.teacher import ClassConditioner, build_model

from .cache import CacheRange, Compensation, effective_nfe, model_blocks, recording, replaying
from .flow import euler
from .nets import FlowNet
from .student_file import FORMAT, StudentHeader, file_hash, file_signature, json_field, open_student, read_header, save_student_file  # noqa: F401 (re-exported)


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
    """Write atomically (tmp + os.replace). ``base`` carries family, hash, signature and architecture of the teacher."""
    tensors = {f"cond.{k}": v for k, v in net.conditioner.state_dict().items()}
    save_student_file(path, net.model.state_dict(), "diffusers", adapter_for(net.model).stack_sizes(net.model), sigmas,
                      shift, cache, compensation, base, dtype, extra, tensors)


def _read(path: str) -> tuple[dict[str, torch.Tensor], dict]:
    with open_student(path) as handle:
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
    header = read_header(path)
    meta = header.meta
    if header.model_keys != "diffusers":
        raise ValueError(f"{path} holds its weights under {header.model_keys!r} names; load it in that host (ComfyUI's Load 1.x Student).")
    if base_family is not None and meta.get("base_family") != base_family:
        raise ValueError(f"{path} is a student of a {meta.get('base_family')!r} model; the base model here is {base_family!r}.")
    if base_hash is not None and meta.get("base_hash") != base_hash:
        raise ValueError(f"{path} was distilled from base model {meta.get('base_hash')}; the base model here is {base_hash}. "
                         "A student only works with the weights it was distilled from.")
    architecture = json_field(path, meta, "architecture")
    if not isinstance(architecture, dict):
        raise ValueError(f"{path} declares no architecture; export it again.")
    _check_declared_blocks(path, architecture, header.shapes)
    architecture["rope_axes_dim"] = tuple(architecture["rope_axes_dim"])
    tensors, _ = _read(path)
    model = build_model(architecture)
    groups = {p: {k[len(p) + 1 :]: v for k, v in tensors.items() if k.startswith(p + ".")} for p in ("model", "cond", "comp")}
    _check_keys(path, "model", set(model.state_dict()), set(groups["model"]))
    _check_keys(path, "conditioning", {"context", "pooled"}, set(groups["cond"]))
    model.load_state_dict({k: v.float() for k, v in groups["model"].items()})
    context, pooled = groups["cond"]["context"].float(), groups["cond"]["pooled"].float()
    conditioner = ClassConditioner(context.shape[0] - 1, context.shape[1], context.shape[2], pooled.shape[1])
    conditioner.load_state_dict({"context": context, "pooled": pooled})
    cache = header.cache
    compensation = None
    if cache is not None:
        compensation = Compensation(architecture["num_attention_heads"] * architecture["attention_head_dim"])
        _check_keys(path, "compensation", set(compensation.state_dict()), set(groups["comp"]))
        compensation.load_state_dict({k: v.float() for k, v in groups["comp"].items()})
        compensation.eval().requires_grad_(False)
    net = FlowNet(model.eval().requires_grad_(False), conditioner.requires_grad_(False))
    return Student(net, header.sigmas, cache, compensation, meta)


def _check_declared_blocks(path: str, architecture: dict, shapes: dict) -> None:
    """The block counts the metadata declares must be the ones the tensors hold (checked before building)."""
    for field, prefix in (("num_layers", "model.transformer_blocks."), ("num_single_layers", "model.single_transformer_blocks.")):
        held = len({k[len(prefix):].split(".", 1)[0] for k in shapes if k.startswith(prefix)})
        declared = architecture.get(field)
        if declared != held:
            raise ValueError(f"{path} declares {field}={declared!r} but holds {held} such blocks; the file is damaged or crafted.")
