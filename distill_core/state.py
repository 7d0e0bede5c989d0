"""Full training state in one safetensors file: modules, optimiser moments, counters and RNG states.

Optimiser state is flattened to "optim.<name>.<param id>.<key>" tensors, its param groups go to the
metadata as JSON; RNG states are byte tensors (torch's global one, and every rank's data generator).
Written atomically: a crash mid-write leaves the previous file intact.
"""

from __future__ import annotations

import json

import torch
from safetensors import safe_open
from .files import save_atomic

FORMAT = "xslim-1x-distill-state/1"


def optimizer_tensors(name: str, opt: torch.optim.Optimizer | dict) -> tuple[dict, dict]:
    """An optimiser (or its ``state_dict()``, e.g. gathered from FSDP shards) as flat tensors + metadata."""
    sd = opt if isinstance(opt, dict) else opt.state_dict()
    tensors = {}
    for pid, entry in sd["state"].items():
        for key, value in entry.items():
            tensors[f"optim.{name}.{pid}.{key}"] = (
                value.detach().clone() if torch.is_tensor(value) else torch.tensor(value)
            )
    return tensors, {f"optim.{name}.groups": json.dumps(sd["param_groups"])}


def optimizer_state_dict(name: str, tensors: dict, meta: dict) -> dict:
    """The ``state_dict()`` of optimiser ``name`` as stored (parameters numbered in the optimiser's order)."""
    prefix = f"optim.{name}."
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith(prefix):
            pid, field = key[len(prefix) :].split(".", 1)
            state.setdefault(int(pid), {})[field] = value
    return {"state": state, "param_groups": json.loads(meta[f"optim.{name}.groups"])}


def load_optimizer(name: str, opt: torch.optim.Optimizer, tensors: dict, meta: dict) -> None:
    opt.load_state_dict(optimizer_state_dict(name, tensors, meta))


def save_state(path: str, modules: dict, optimizers: dict, rng: dict[str, torch.Tensor], meta: dict) -> None:
    save_state_dicts(path, {n: m.state_dict() for n, m in modules.items()}, optimizers, rng, meta)


def save_state_dicts(
    path: str, modules: dict[str, dict], optimizers: dict, rng: dict[str, torch.Tensor], meta: dict
) -> None:
    """``save_state`` from state dicts (module name -> tensors; optimiser name -> optimiser or its state_dict):
    the same file whether they come from live modules or were gathered from FSDP shards."""
    tensors = {f"module.{n}.{k}": v.detach().contiguous().clone() for n, sd in modules.items() for k, v in sd.items()}
    header = {"format": FORMAT, **{k: str(v) for k, v in meta.items()}}
    for name, opt in optimizers.items():
        t, h = optimizer_tensors(name, opt)
        tensors.update(t)
        header.update(h)
    tensors.update({f"rng.{k}": v for k, v in rng.items()})
    save_atomic(tensors, path, header)


def read_state(path: str, prefix: str = "") -> tuple[dict[str, torch.Tensor], dict]:
    """The tensors whose names start with ``prefix`` and the metadata of a training state file (checked)."""
    try:
        handle = safe_open(path, framework="pt")
    except Exception as err:  # safetensors raises several types for a foreign or damaged header
        raise ValueError(f"{path} is not a readable safetensors training state ({err}).") from None
    with handle as f:
        meta = dict(f.metadata() or {})
        if meta.get("format") != FORMAT:
            raise ValueError(f"{path} is not a 1.x-Distill training state (format {meta.get('format')!r}).")
        return {k: f.get_tensor(k) for k in f.keys() if k.startswith(prefix)}, meta


def _under(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}


def load_module(path: str, name: str) -> dict[str, torch.Tensor]:
    """One module's weights from a training state file (e.g. a finished run's fake score)."""
    tensors, _ = read_state(path, f"module.{name}.")
    if not tensors:
        raise ValueError(f"{path} holds no {name!r} module.")
    return _under(tensors, f"module.{name}.")


def load_state(path: str, modules: dict, optimizers: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Restore modules and optimisers in place; returns (rng tensors, metadata)."""
    tensors, meta = read_state(path)
    for name, module in modules.items():
        module.load_state_dict(_under(tensors, f"module.{name}."))
    for name, opt in optimizers.items():
        load_optimizer(name, opt, tensors, meta)
    return _under(tensors, "rng."), meta
