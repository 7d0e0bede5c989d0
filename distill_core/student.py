"""The 1.x student in diffusers: load a student file (``student_file.py``) onto its diffusers architecture and
sample it (Euler over the student's sigmas, the cached last step through the compensation).

Any family the model protocol knows (``models.py``) works: the architecture is rebuilt from the diffusers
config the file declares. A demo-teacher student also carries the teacher's class table ("cond.*"), so it can
be sampled from class labels.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

import torch

from .cache import CacheRange, Compensation, effective_nfe, recording, replaying
from .conditioning import Conditioning
from .flow import euler
from .models import FlowModel
from .student_file import (
    FORMAT,  # noqa: F401 (re-exported)
    MAX_BLOCKS,
    StudentHeader,  # noqa: F401 (re-exported)
    file_hash,  # noqa: F401 (re-exported)
    file_signature,  # noqa: F401 (re-exported)
    MAX_SIDE,
    json_field,
    latent_shape,
    open_student,
    read_header,
    save_student_file,
)

from xslim_core.adapters import adapter_for
from xslim_core.adapters.base import merge_rows  # noqa: F401 (re-exported for the stages)


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
        return run_student(
            self.net, noise, self.conditioning(labels_or_cond), self.sigmas, self.cache, self.compensation
        )


def run_student(
    net,
    noise: torch.Tensor,
    cond: Conditioning,
    sigmas: list[float],
    cache: CacheRange | None = None,
    compensation: Compensation | None = None,
) -> torch.Tensor:
    """Euler over the student's sigmas, no CFG; with ``cache`` the last step reuses the previous step's block
    delta (through ``compensation``). Differentiable: callers choose grad or no_grad."""
    return trajectory(net, noise, cond, sigmas, cache, compensation)[0][-1]


def trajectory(
    net,
    noise: torch.Tensor,
    cond: Conditioning,
    sigmas: list[float],
    cache: CacheRange | None = None,
    compensation: Compensation | None = None,
):
    """The deployed sampler's states [x_0..x_N], velocities [v_0..v_N-1] and the recorded block delta (or None).
    ``net``: a role (``nets.Role``) or a ``FlowModel``."""
    xs, vs, delta, last = [noise], [], None, len(sigmas) - 2
    blocks = blocks_of(net) if cache is not None else []
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


def save_student(
    path: str,
    net,
    sigmas: list[float],
    shift: float,
    cache: CacheRange | None,
    compensation: Compensation | None,
    base: dict,
    dtype: torch.dtype = torch.float32,
    extra: dict | None = None,
    class_table: dict | None = None,
) -> None:
    """Write atomically. ``net``: the student role (its LoRA merged into full weights) or a ``FlowModel``;
    ``base`` carries family, hash, signature and architecture of the teacher; ``class_table`` the demo's classes."""
    state = net.merged_state_dict() if hasattr(net, "merged_state_dict") else net.module.state_dict()
    flow = getattr(net, "flow", net)
    more = {k: v.detach().cpu() for k, v in (class_table or {}).items()}
    latent = {"latent_shape": json.dumps(list(flow.latent_shape)), "call_extra": json.dumps(flow.extra)}
    # a host's own classes (ComfyUI's) keep their key names and block stacks; diffusers models the adapter's
    stacks = flow.stack_sizes() if hasattr(flow, "stack_sizes") else adapter_for(flow.module).stack_sizes(flow.module)
    save_student_file(
        path,
        state,
        getattr(flow, "model_keys", "diffusers"),
        stacks,
        sigmas,
        shift,
        cache,
        compensation,
        base,
        dtype,
        {**latent, **(extra or {})},
        more,
    )


def _read(path: str) -> tuple[dict[str, torch.Tensor], dict]:
    with open_student(path) as handle:
        return {k: handle.get_tensor(k) for k in handle.keys()}, dict(handle.metadata() or {})


def _check_keys(path: str, part: str, expected: set[str], found: set[str]) -> None:
    missing, unexpected = sorted(expected - found), sorted(found - expected)
    if missing:
        raise ValueError(
            f"{path} is missing {len(missing)} {part} tensor(s), e.g. {missing[:3]}; the file is incomplete "
            "or was written for a different architecture."
        )
    if unexpected:
        raise ValueError(f"{path} has {len(unexpected)} unexpected {part} tensor(s), e.g. {unexpected[:3]}.")


# the block lists each declared count builds, under the student file's "model." names (SD3, FLUX, HunyuanVideo)
BLOCK_FIELDS = {
    "num_layers": "transformer_blocks.",
    "num_single_layers": "single_transformer_blocks.",
    "num_refiner_layers": "context_embedder.token_refiner.refiner_blocks.",
}
MAX_DECLARED = 65_536  # any whole number in an architecture (widths, heads, channels): FLUX's widest is 3072*4


def _architecture_class(path: str, architecture: dict):
    import diffusers

    from_demo = "_class_name" not in architecture  # the demo teacher's files list its constructor arguments only
    name = "HunyuanVideoTransformer3DModel" if from_demo else str(architecture["_class_name"])
    cls = getattr(diffusers, name, None)
    if not (isinstance(cls, type) and issubclass(cls, torch.nn.Module)):
        raise ValueError(f"{path} declares the architecture class {name!r}, which diffusers does not have.")
    kwargs = {
        k: (tuple(v) if isinstance(v, list) and k == "rope_axes_dim" else v)
        for k, v in architecture.items()
        if not k.startswith("_")
    }
    made: Any = cls  # a diffusers model class: from_config is its ConfigMixin's
    return name, (lambda: made(**kwargs)) if from_demo else (lambda: made.from_config(kwargs))


def build_architecture(path: str, architecture: dict, shapes: dict):
    """The diffusers transformer a student file declares (its config), with random weights. It is first built on
    the meta device, which allocates nothing, and its parameter names and shapes compared with ``shapes`` (the
    header's): the real model is then never larger than the weights the file holds."""
    name, make = _architecture_class(path, architecture)
    with torch.device("meta"):
        skeleton = _built(path, name, make)
    _check_shapes(path, skeleton, shapes)
    return _built(path, name, make)


def _built(path: str, name: str, make):
    try:
        return make()
    except (
        TypeError,
        ValueError,
        RuntimeError,
        AttributeError,
        KeyError,
    ) as err:  # a crafted config, not a diffusers bug
        raise ValueError(f"{path}: its architecture ({name}) cannot be built: {type(err).__name__}: {err}.") from None


def _check_shapes(path: str, skeleton: torch.nn.Module, shapes: dict) -> None:
    expected = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
    held = {k[len("model.") :]: tuple(v) for k, v in shapes.items() if k.startswith("model.")}
    _check_keys(path, "model", set(expected), set(held))
    wrong = [(k, expected[k], held[k]) for k in sorted(expected) if expected[k] != held[k]]
    if wrong:
        key, want, got = wrong[0]
        raise ValueError(
            f"{path}: its architecture makes {key} {list(want)} but the file holds {list(got)} "
            f"({len(wrong)} tensor(s) differ); the file is damaged or crafted."
        )


def call_extra(path: str, meta: dict) -> dict:
    """The model-call options a student file carries (``call_extra``): a JSON object whose known fields are
    checked like a config - ``guidance`` a finite number, ``grid`` two whole numbers from 1 to MAX_SIDE - so a
    damaged field is named here rather than failing inside the model."""
    extra = json_field(path, meta, "call_extra") or {}
    if not isinstance(extra, dict):
        raise ValueError(f"{path}: its call_extra must be a JSON object, got {str(extra)[:60]!r}; the file is damaged.")
    guidance = extra.get("guidance", 0.0)
    if not isinstance(guidance, (int, float)) or isinstance(guidance, bool) or not math.isfinite(guidance):
        raise ValueError(
            f"{path}: call_extra.guidance must be a finite number, got {str(guidance)[:40]!r}; the file is damaged."
        )
    grid = extra.get("grid", [1, 1])
    if (
        not isinstance(grid, list)
        or len(grid) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= MAX_SIDE for v in grid)
    ):
        raise ValueError(
            f"{path}: call_extra.grid must be two whole numbers from 1 to {MAX_SIDE} (the token grid), got "
            f"{str(grid)[:40]!r}; the file is damaged."
        )
    return extra


def load_student(path: str, base_hash: str | None = None, base_family: str | None = None) -> Student:
    """Load and validate a student file; pass the host's base model hash/family to refuse a foreign student."""
    header = read_header(path)
    meta = header.meta
    if header.model_keys != "diffusers":
        raise ValueError(
            f"{path} holds its weights under {header.model_keys!r} names; load it in that host (ComfyUI's Load 1.x Student)."
        )
    if base_family is not None and meta.get("base_family") != base_family:
        raise ValueError(
            f"{path} is a student of a {meta.get('base_family')!r} model; the base model here is {base_family!r}."
        )
    if base_hash is not None and meta.get("base_hash") != base_hash:
        raise ValueError(
            f"{path} was distilled from base model {meta.get('base_hash')}; the base model here is {base_hash}. "
            "A student only works with the weights it was distilled from."
        )
    architecture = json_field(path, meta, "architecture")
    if not isinstance(architecture, dict):
        raise ValueError(f"{path} declares no architecture; export it again.")
    check_architecture(path, architecture, header.shapes)  # from the header alone, before anything is built
    model = build_architecture(path, architecture, header.shapes)  # names and shapes checked against the header
    tensors, _ = _read(path)
    not_finite = next(
        (k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())), None
    )
    if not_finite is not None:  # it would sample NaN without a word
        raise ValueError(
            f"{path}: tensor {not_finite} holds NaN or infinite values; the file is damaged. Export the student again."
        )
    groups = {
        p: {k[len(p) + 1 :]: v for k, v in tensors.items() if k.startswith(p + ".")} for p in ("model", "cond", "comp")
    }
    model.load_state_dict({k: v.float() for k, v in groups["model"].items()})
    model.eval().requires_grad_(False)
    shape = latent_shape(path, meta, [16, 1, 8, 8])  # the demo's, for files written before the field
    flow = FlowModel(model, shape, call_extra(path, meta))
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


def check_architecture(path: str, architecture: dict, shapes: dict) -> None:
    """Bounds a declared architecture by the file's own tensors before anything is built: every whole number is
    at most MAX_DECLARED, every block count it declares is the number of such blocks the file holds, and the
    attention width (heads x head_dim) is the first block's query width. A diffusers config naming its class is
    checked like the demo's: 40k declared layers would otherwise be allocated before any key was compared."""
    _check_numbers(path, architecture)
    demo = "_class_name" not in architecture  # the demo's files always declare both stacks
    for field, prefix in BLOCK_FIELDS.items():
        if field in architecture or (demo and field != "num_refiner_layers"):
            _check_declared_blocks(path, field, architecture.get(field), "model." + prefix, shapes)
    _check_attention_width(path, architecture, shapes)


def _check_numbers(path: str, architecture: dict) -> None:
    for key, value in architecture.items():
        for v in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(v, int) and not isinstance(v, bool) and not 0 <= v <= MAX_DECLARED:
                raise ValueError(
                    f"{path} declares {key}={value!r:.60}; a whole number in an architecture lies in "
                    f"0..{MAX_DECLARED}. The file is damaged or crafted."
                )


def _check_declared_blocks(path: str, field: str, declared, prefix: str, shapes: dict) -> None:
    held = len({k[len(prefix) :].split(".", 1)[0] for k in shapes if k.startswith(prefix)})
    if declared != held or isinstance(declared, bool):
        raise ValueError(
            f"{path} declares {field}={declared!r} but holds {held} such blocks; the file is damaged or crafted."
        )
    if declared > MAX_BLOCKS:  # even when the file holds them (tiny ones): no real DiT has as many
        raise ValueError(f"{path} declares {field}={declared}; a student has at most {MAX_BLOCKS} blocks per stack.")


def _check_attention_width(path: str, architecture: dict, shapes: dict) -> None:
    heads, head_dim = architecture.get("num_attention_heads"), architecture.get("attention_head_dim")
    query = shapes.get("model.transformer_blocks.0.attn.to_q.weight")
    if not (isinstance(heads, int) and isinstance(head_dim, int)) or query is None:
        return  # nothing to compare: the meta build compares every shape
    if heads * head_dim != query[0]:
        raise ValueError(
            f"{path} declares num_attention_heads={heads} x attention_head_dim={head_dim} = {heads * head_dim} "
            f"but its first block's queries are {query[0]} wide; the file is damaged or crafted."
        )
