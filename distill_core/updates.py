"""Optimiser steps that are guarded against non-finite values, with gradients averaged across ranks by torch.

Each role's loss comes from one call of its ``Ranks.objective`` (``parallel.wrap_role``: DDP under torchrun,
or, with ``parallel="fsdp"``, the plain call on an FSDP2-sharded base), so the gradient all-reduce (DDP) or
reduce-scatter (FSDP2) happens inside ``loss.backward()``; nothing here averages gradients by hand.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from torch import nn

from .parallel import clip_grad_norm, shard, wrap_role


class Ranks:
    """This process's place in the run (a ``parallel.Dist`` view plus the few collectives the loop needs);
    every collective is a no-op in a single process."""

    def __init__(self, device: torch.device | None = None, parallel: str = "ddp", offload_optimizer: bool = False):
        self.offload_optimizer = offload_optimizer
        self.active = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank() if self.active else 0
        self.world = dist.get_world_size() if self.active else 1
        self.device = device or torch.device("cpu")
        if parallel not in ("ddp", "fsdp"):
            raise ValueError(f"parallel must be 'ddp' or 'fsdp', got {parallel!r}")
        # FSDP2 only means something with several processes; one process keeps the plain (bit-identical) path
        self.fsdp = parallel == "fsdp" and self.distributed

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def adamw(self, params: list, lr: float, betas: tuple, weight_decay: float):
        """The stages' optimiser: AdamW, with its moments in CPU memory when the run offloads them."""
        if self.offload_optimizer:
            if self.fsdp:
                raise ValueError(
                    "offload_optimizer does not combine with parallel 'fsdp' (FSDP2 shards the states "
                    "across GPUs instead); use one of them."
                )
            return OffloadedAdamW(params, lr, betas, weight_decay)
        return torch.optim.AdamW(params, lr, betas, weight_decay=weight_decay)

    @property
    def distributed(self) -> bool:
        return self.active and self.world > 1

    def all_true(self, flag: bool) -> bool:
        if not self.active:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=self._collective_device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return bool(t.item() > 0)

    def mean(self, value: float) -> float:
        if not self.active:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self._collective_device)
        dist.all_reduce(t)
        return t.item() / self.world

    def broadcast_(self, tensor: torch.Tensor) -> None:
        if self.active:
            dist.broadcast(tensor, 0)

    def objective(self, loss_fn, params, sharded: bool = True):
        """One role's loss as one call. DDP (``parallel.wrap_role``) unless the role's parameters live in the
        FSDP2-sharded base (then FSDP's own hooks reduce their gradients and the call is the plain function);
        ``sharded=False`` marks a role outside the sharded modules (Stage II's discriminator heads): DDP."""
        if self.fsdp and sharded:
            return loss_fn
        return wrap_role(loss_fn, params, self)

    @property
    def _collective_device(self) -> torch.device:
        return self.device if dist.get_backend() == "nccl" else torch.device("cpu")


class OffloadedAdamW:
    """AdamW whose moments and an fp32 master copy of the parameters live in CPU memory (what
    ``memory.Setup.offload_optimizer`` plans): each step copies the gradients to the host, steps there and copies
    the parameters back. Two host transfers per step buy 12 bytes per trainable parameter of GPU memory; on the
    CPU it is the plain AdamW computed on copies (bit-identical results, tested)."""

    def __init__(self, params: list, lr: float, betas: tuple, weight_decay: float):
        self.params = list(params)
        self.master = [p.detach().to("cpu", torch.float32, copy=True).requires_grad_(True) for p in self.params]
        self.inner = torch.optim.AdamW(self.master, lr, betas, weight_decay=weight_decay)

    @property
    def param_groups(self):
        return self.inner.param_groups

    @property
    def state(self):
        return self.inner.state

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            p.grad = None
        self.inner.zero_grad(set_to_none=set_to_none)

    @torch.no_grad()
    def step(self) -> None:
        for p, m in zip(self.params, self.master):
            m.grad = None if p.grad is None else p.grad.detach().to("cpu", torch.float32)
        self.inner.step()
        for p, m in zip(self.params, self.master):
            p.copy_(m.to(p.device, p.dtype))

    def state_dict(self) -> dict:
        return self.inner.state_dict()

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        """The moments of a checkpoint; the master copies follow the parameters, which load before (state.py)."""
        self.inner.load_state_dict(state)
        for p, m in zip(self.params, self.master):
            m.copy_(p.detach().to("cpu", torch.float32))


def guarded_update(
    loss: torch.Tensor,
    steps: list[tuple[list, torch.optim.Optimizer, bool]],
    clip: float,
    ranks: Ranks,
    idle: list | None = None,
) -> float:
    """Backward (averaging across ranks when ``loss`` came from a DDP-wrapped role), clip and step. ``steps``
    holds (params, optimiser, whether to step it now).

    ``idle``: parameters whose gradient is dropped after backward (set to None, so AdamW skips them): under FSDP
    the ones only a zero-weighted dummy pass used on every rank, which DDP would have left without a gradient.

    Returns the gradient norm before clipping, or NaN when the loss or the gradients were not finite on any
    rank: then nothing is stepped (every rank takes the same decision, so none waits on a collective).
    """
    params = [p for group, _, _ in steps for p in group]
    for _, opt, _ in steps:
        opt.zero_grad(set_to_none=True)
    if not ranks.all_true(bool(torch.isfinite(loss))):
        return math.nan
    loss.backward()
    for p in idle or ():
        p.grad = None
    norm = clip_grad_norm(params, clip)
    if not ranks.all_true(math.isfinite(norm)):
        for _, opt, _ in steps:
            opt.zero_grad(set_to_none=True)
        return math.nan
    for _, opt, active in steps:
        if active:
            opt.step()
    return norm


def place_shared_base(ranks: Ranks, role, extra: list[nn.Module]) -> None:
    """Under ``parallel="fsdp"`` (torchrun): shard the one shared base of the LoRA layout with FSDP2
    (``parallel.shard``: every block of the model's block protocol, each module in ``extra``, then the base).

    Call it after every trainable tensor exists (adapters, compensation) and before any optimiser is built:
    rank 0's values are broadcast first (plain tensors: the adapters' and the compensation's random init, a
    starting student), then each rank keeps its shard, and the LoRA layout's parameter lists are looked up
    again (``fully_shard`` replaces every Parameter by a DTensor one). ``extra`` modules must be the ones that
    are *called* (FSDP2 gathers a module's parameters in its own forward hooks), e.g. the compensation's
    per-stream MLPs, not their container. Without FSDP: nothing happens."""
    if not ranks.fsdp:
        return
    lora = role.lora
    if lora is None:
        raise ValueError("parallel 'fsdp' shards the one shared base of the LoRA layout; set lora_rank >= 1.")
    module = role.module
    with torch.no_grad():
        for tensor in [p for ps in lora.params.values() for p in ps] + [
            t for m in extra for t in m.state_dict().values()
        ]:
            ranks.broadcast_(tensor.detach())
    blocks = [spec.module for spec in role.flow.blocks()]
    # the root's own layers stay gathered from forward to backward: Stage II's discriminator takes block features
    # by hooks, so the root's output is not in the loss and FSDP2 would not re-gather it for backward
    shard(module, blocks, ranks, extra=extra, reshard_root_after_forward=False)
    params = dict(module.named_parameters())
    lora.params = {r: [params[n] for n in names] for r, names in lora.names.items()}
