"""The 1.x student in diffusers: load a student file (``student_file.py``) onto its diffusers architecture and
sample it (Euler over the student's sigmas, the cached last step through the compensation).

Any family the model protocol knows (``models.py``) works: the architecture is rebuilt from the diffusers
config the file declares. A demo-teacher student also carries the teacher's class table ("cond.*"), so it can
be sampled from class labels.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch
from safetensors import safe_open

from .cache import CacheRange, Compensation, effective_nfe, recording, replaying
from .conditioning import Conditioning
from .flow import euler
from .models import FlowModel
from .student_file import FORMAT, StudentHeader, file_hash, file_signature, json_field, open_student, read_header, save_student_file  # noqa: F401 (re-exported)

try:
    from ..xslim_core.adapters import adapter_for
    from ..xslim_core.adapters.base import merge_rows  # noqa: F401 (re-exported for the stages)
except ImportError:  # run from the repository root
    from xslim_core.adapters import adapter_for
    from xslim_core.adapters.base import merge_rows  # noqa: F401


def blocks_of(net) -> list:
    """The block specs of a role (``nets.Role``) or a ``FlowModel``."""
    flow = getattr(net, "flow", net)
    return flow.blocks()


@dataclass
class Student:
    net: FlowModel
    sigmas: list[float]
    cache: CacheRange | None
    compensation: Compensation | None
    meta: dict
    class_table: Conditioning | None = None  # the demo teacher's classes (last row: unconditional)

    @property
    def effective_nfe(self) -> float:
        return effective_nfe(len(self.sigmas) - 1, self.cache, len(self.net.blocks()))

    def conditioning(self, labels_or_cond) -> Conditioning:
        if isinstance(labels_or_cond, Conditioning):
            return labels_or_cond
        if self.class_table is None:
            raise ValueError("this student has no class table; pass its text conditioning (a Conditioning).")
        return self.class_table.rows(labels_or_cond)

    @torch.no_grad()
    def sample(self, noise: torch.Tensor, labels_or_cond) -> torch.Tensor:
        return run_student(self.net, noise, self.conditioning(labels_or_cond), self.sigmas, self.cache, self.compensation)


def run_student(net, noise: torch.Tensor, cond: Conditioning, sigmas: list[float],
                cache: CacheRange | None = None, compensation: Compensation | None = None) -> torch.Tensor:
    """Euler over the student's sigmas, no CFG; with ``cache`` the last step reuses the previous step's block
    delta (through ``compensation``). Differentiable: callers choose grad or no_grad."""
    return trajectory(net, noise, cond, sigmas, cache, compensation)[0][-1]


def trajectory(net, noise: torch.Tensor, cond: Conditioning, sigmas: list[float],
               cache: CacheRange | None = None, compensation: Compensation | None = None):
    """The deployed sampler's states [x_0..x_N], velocities [v_0..v_N-1] and the recorded block delta (or None).
    ``net``: a role (``nets.Role``) or a ``FlowModel``."""
    xs, vs, delta, last = [noise], [], None, len(sigmas) - 2
    blocks = blocks_of(net) if cache is not None else None
    for i, (s, s_next) in enumerate(zip(sigmas[:-1], sigmas[1:])):
        x = xs[-1]
        sigma = torch.full((x.shape[0],), s, dtype=x.dtype, device=x.device)
        if cache is not None and i == last and delta is not None:
            with replaying(blocks, cache, delta, compensation):
                v = net(x, sigma, cond)
        elif cache is not None and i == last - 1:
            with recording(blocks, cache) as store:
                v = net(x, sigma, cond)
            delta = dict(store)
        else:
            v = net(x, sigma, cond)
        vs.append(v)
        xs.append(euler(x, v, s, s_next))
    return xs, vs, delta


def save_student(path: str, net, sigmas: list[float], shift: float, cache: CacheRange | None,
                 compensation: Compensation | None, base: dict, dtype: torch.dtype = torch.float32, extra: dict | None = None,
                 class_table: dict | None = None) -> None:
    """Write atomically. ``net``: the student role (its LoRA merged into full weights) or a ``FlowModel``;
    ``base`` carries family, hash, signature and architecture of the teacher; ``class_table`` the demo's classes."""
    state = net.merged_state_dict() if hasattr(net, "merged_state_dict") else net.module.state_dict()
    flow = getattr(net, "flow", net)
    more = {k: v.detach().cpu() for k, v in (class_table or {}).items()}
    latent = {"latent_shape": json.dumps(list(flow.latent_shape)), "call_extra": json.dumps(flow.extra)}
    # a host's own classes (ComfyUI's) keep their key names and block stacks; diffusers models the adapter's
    stacks = flow.stack_sizes() if hasattr(flow, "stack_sizes") else adapter_for(flow.module).stack_sizes(flow.module)
    save_student_file(path, state, getattr(flow, "model_keys", "diffusers"), stacks, sigmas, shift, cache, compensation,
                      base, dtype, {**latent, **(extra or {})}, more)


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


def build_architecture(path: str, architecture: dict):
    """The diffusers transformer a student file declares (its config), with random weights."""
    import diffusers

    from_demo = "_class_name" not in architecture  # the demo teacher's files list its constructor arguments only
    name = "HunyuanVideoTransformer3DModel" if from_demo else str(architecture["_class_name"])
    cls = getattr(diffusers, name, None)
    if cls is None:
        raise ValueError(f"{path} declares the architecture class {name!r}, which diffusers does not have.")
    kwargs = {k: (tuple(v) if isinstance(v, list) and k == "rope_axes_dim" else v) for k, v in architecture.items() if not k.startswith("_")}
    return cls.from_config(kwargs) if not from_demo else cls(**kwargs)


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
    if "_class_name" not in architecture:
        _check_declared_blocks(path, architecture, header.shapes)
    tensors, _ = _read(path)
    model = build_architecture(path, architecture)
    groups = {p: {k[len(p) + 1 :]: v for k, v in tensors.items() if k.startswith(p + ".")} for p in ("model", "cond", "comp")}
    _check_keys(path, "model", set(model.state_dict()), set(groups["model"]))
    model.load_state_dict({k: v.float() for k, v in groups["model"].items()})
    model.eval().requires_grad_(False)
    latent_shape = json_field(path, meta, "latent_shape") or [16, 1, 8, 8]  # the demo's, for files written before
    flow = FlowModel(model, tuple(latent_shape), json_field(path, meta, "call_extra") or {})
    table = None
    if groups["cond"]:
        _check_keys(path, "conditioning", {"context", "pooled"}, set(groups["cond"]))
        table = Conditioning(groups["cond"]["context"].float(), groups["cond"]["pooled"].float())
    cache = header.cache
    compensation = None
    if cache is not None:
        compensation = Compensation(flow.width)
        _check_keys(path, "compensation", set(compensation.state_dict()), set(groups["comp"]))
        compensation.load_state_dict({k: v.float() for k, v in groups["comp"].items()})
        compensation.eval().requires_grad_(False)
    return Student(flow, header.sigmas, cache, compensation, meta, table)


def _check_declared_blocks(path: str, architecture: dict, shapes: dict) -> None:
    """The block counts the metadata declares must be the ones the tensors hold (checked before building)."""
    for field, prefix in (("num_layers", "model.transformer_blocks."), ("num_single_layers", "model.single_transformer_blocks.")):
        held = len({k[len(prefix):].split(".", 1)[0] for k in shapes if k.startswith(prefix)})
        declared = architecture.get(field)
        if declared != held:
            raise ValueError(f"{path} declares {field}={declared!r} but holds {held} such blocks; the file is damaged or crafted.")
