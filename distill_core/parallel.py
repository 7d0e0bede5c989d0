"""Devices and data parallelism for the trainer: device choice, torchrun's process group, DDP per role, FSDP2.

Pure PyTorch; no hand-written gradient all-reduce. Two ways to spread a run over N processes:

* **DDP per role** (``wrap_role``): every rank holds the whole frozen base; each role's step (fake score,
  student + compensation) is one forward of a small module that DDP wraps and whose *registered* parameters
  are only that role's trainable ones. DDP then averages exactly that role's gradients in its backward.
* **FSDP2** (``shard``): ``fully_shard`` on every transformer block, then on the root, so each rank holds 1/N
  of the base (and of the adapters); the roles' steps call the model directly and FSDP reduce-scatters the
  gradients of whatever parameters got one.

Why DDP over a role-only view, and the rules that follow: docs/decisions/0001-ddp-per-role.md (measured by
tests/parallel_scripts/reducer_probe.py). FSDP2's rules: docs/decisions/0002-fsdp2-rules.md.
"""

from __future__ import annotations

import gc
import math
import os
import warnings
from dataclasses import dataclass
from datetime import timedelta
from typing import Callable, Iterable, Protocol, Sequence

import torch
import torch.distributed as dist
from torch import nn


# ----------------------------------------------------------------------------------------------- devices


def _local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def pick_device(requested: str | None = None) -> torch.device:
    """The device this process trains on: ``requested`` ('cpu', 'cuda', 'cuda:1', ...) or, when None/'auto',
    CUDA if present else CPU. A bare 'cuda' under torchrun means ``cuda:LOCAL_RANK`` (one GPU per process)."""
    if requested in (None, "", "auto"):
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(requested)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device {requested!r} is not a torch device name (use 'cpu', 'cuda' or 'cuda:N')") from e
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"device {requested!r} was asked for but torch sees no CUDA device "
                f"(torch {torch.__version__}); use 'cpu'"
            )
        index = _local_rank() if device.index is None else device.index
        if index >= torch.cuda.device_count():
            raise ValueError(
                f"device cuda:{index} does not exist: {torch.cuda.device_count()} CUDA device(s) visible"
                " (under torchrun, --nproc_per_node must not exceed the GPUs on the node)"
            )
        device = torch.device("cuda", index)
    return device


# ----------------------------------------------------------------------------------------------- process group


class Placement(Protocol):
    """What the helpers below read of a process's place in the run: ``Dist`` here, the trainer's ``Ranks``."""

    @property
    def device(self) -> torch.device: ...

    @property
    def is_main(self) -> bool: ...

    @property
    def distributed(self) -> bool: ...

    @property
    def world(self) -> int: ...


@dataclass(frozen=True)
class Dist:
    """This process's place in the run. ``world == 1`` means no process group (every helper is a no-op)."""

    rank: int
    world: int
    local_rank: int
    device: torch.device
    backend: str | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1


def init_distributed(device: str | None = None, timeout: timedelta = timedelta(minutes=10)) -> Dist:
    """Read torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT) and start the process group:
    NCCL when this process trains on a GPU, gloo on CPU. Without torchrun (no WORLD_SIZE, or 1) nothing is
    started and a single-process ``Dist`` comes back. ``timeout`` bounds how long a collective waits for a
    dead peer (torchrun itself tears the group down as soon as one worker dies)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = _local_rank()
    chosen = pick_device(device)
    if world <= 1 and not dist.is_initialized():
        return Dist(0, 1, 0, chosen)
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing and not dist.is_initialized():
        raise RuntimeError(
            f"WORLD_SIZE={world} but {', '.join(missing)} not set: launch with "
            "`torchrun --nproc_per_node N ...` (it sets all of them)"
        )
    backend = "nccl" if chosen.type == "cuda" else "gloo"
    if chosen.type == "cuda":
        torch.cuda.set_device(chosen)  # NCCL binds each rank's communicator to the current device
    if not dist.is_initialized():
        # device_id (CUDA only) creates the NCCL communicator eagerly, so a wrong GPU fails here, not mid-step
        dist.init_process_group(backend, timeout=timeout, device_id=chosen if chosen.type == "cuda" else None)
    return Dist(dist.get_rank(), dist.get_world_size(), local_rank, chosen, dist.get_backend())


def shutdown(synchronize: bool = False) -> None:
    """Leave the process group (idempotent); without it NCCL warns and torchrun may wait on exit.

    ``synchronize`` (a clean end on every rank): a barrier first, so no rank closes its connections while a peer
    still finishes its last collective; gloo then aborts the late rank at exit now and then ("terminate called
    without an active exception", exit -6), seen in about one torchrun in twenty here. Never on a failure path: a
    peer stuck elsewhere would hold the barrier until the timeout. The garbage collection first drops DDP/FSDP
    wrappers in reference cycles that still hold the group, so its threads end while the interpreter is alive."""
    if dist.is_available() and dist.is_initialized():
        gc.collect()
        if synchronize:
            dist.barrier()
        dist.destroy_process_group()


# ----------------------------------------------------------------------------------------------- small collectives


def all_true(flag: bool, d: Placement) -> bool:
    """True only when ``flag`` holds on every rank: every rank then takes the same branch (skip a non-finite
    step everywhere, or nowhere), so none waits forever on a collective the others skipped."""
    if not d.distributed:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=d.device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item() > 0)


def mean(value: float, d: Placement) -> float:
    """The mean of a scalar (a loss, for logging) over ranks."""
    if not d.distributed:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=d.device)
    dist.all_reduce(t)
    return t.item() / d.world


# ----------------------------------------------------------------------------------------------- DDP per role


class RoleStep(nn.Module):
    """One role's whole loss computation as ONE module call, for DDP.

    ``forward(*args, **kwargs)`` returns ``loss_fn(*args, **kwargs)``. Registered parameters: ``params`` only
    (the very Parameter objects the shared base holds, so DDP's initial broadcast and its averaged gradients
    land in the base). ``loss_fn`` may use the base, the teacher (adapters disabled) and the other role under
    ``torch.no_grad()``, run several forwards (full rows + cached rows) and skip blocks: DDP only sees one
    forward, then one backward in which each parameter's gradient hook fires once (autograd sums all uses of
    a leaf before accumulating it).
    """

    def __init__(self, loss_fn: Callable[..., torch.Tensor], params: Sequence[nn.Parameter]):
        super().__init__()
        if not params:
            raise ValueError("a role needs at least one trainable parameter")
        self.params = nn.ParameterList(params)
        # kept out of nn.Module's registry on purpose: if loss_fn is (or is bound to) a module holding the base,
        # registering it would hand DDP the base's and the other role's parameters again
        self.__dict__["loss_fn"] = loss_fn

    def forward(self, *args, **kwargs):
        return self.loss_fn(*args, **kwargs)


def wrap_role(
    loss_fn: Callable[..., torch.Tensor],
    params: Iterable[nn.Parameter],
    d: Placement,
    find_unused_parameters: bool = True,
) -> nn.Module:
    """``loss = step(batch...)`` for one role; gradients of ``params`` come out averaged over ranks.

    Single process: the RoleStep itself. Under torchrun: DDP over it (``device_ids`` only on CUDA; on CPU DDP
    must get none). ``find_unused_parameters`` stays on by default because a cached step leaves the skipped
    blocks' adapters (and, on a rank without cached rows, the compensation) without a gradient; DDP then
    averages the ranks that used a parameter with zeros from those that did not - exactly the gradient of
    the mean loss over the concatenated batch. The initial broadcast makes the role's parameters equal on
    every rank (randomly initialised adapters included); the frozen base is not broadcast: load it from the
    same file on every rank.
    """
    params = list(params)
    if not all(p.requires_grad for p in params):
        raise ValueError(
            "wrap_role: every parameter of a role must require grad when it is wrapped "
            "(DDP builds its reducer from them once)"
        )
    step = RoleStep(loss_fn, params)
    if not d.distributed:
        return step
    from torch.nn.parallel import DistributedDataParallel as DDP

    # RoleStep registers no buffers: nothing to broadcast per forward (broadcast_buffers is moot)
    return DDP(
        step, device_ids=[d.device] if d.device.type == "cuda" else None, find_unused_parameters=find_unused_parameters
    )


def keep_trainable(params: Iterable[nn.Parameter]):
    """Set requires_grad back on after peft's ``set_adapter``, which clears it on inactive adapters. Under DDP
    this is harmless either way (an inactive role is not in the graph); under FSDP2 a role must not flip its
    flag between ranks' forwards, and keeping every adapter trainable makes the active adapter alone decide
    what gets a gradient."""
    for p in params:
        p.requires_grad_(True)


# ----------------------------------------------------------------------------------------------- FSDP2


# FSDP2 warns on every forward of a wrapped block whose output is a view (diffusers' FLUX/HunyuanVideo single
# blocks split [text; image] by slicing): an in-place op on such a view would skip the pre-backward all-gather.
# Nothing here modifies a wrapped module's output in place (the stages build new tensors; guided_velocity clones
# before writing rows), and tests/test_distill_torchrun.py checks that FSDP ends with exactly DDP's weights, so the
# warning is only noise in every run's log. Only this message is ignored; every other FSDP warning still shows.
FSDP_VIEW_WARNING = r"FSDP2-wrapped module \(.*\) returned a view tensor"


def quiet_fsdp_view_warning() -> None:
    warnings.filterwarnings("ignore", message=FSDP_VIEW_WARNING, category=UserWarning)


# DDP's reducer (C++, during backward: no Python warnings filter reaches it) warns once per process when
# find_unused_parameters=True found no unused parameter in an iteration. It is on for a reason (``wrap_role``), so
# a multi-process run explains the warning in its log before it can appear.
DDP_UNUSED_NOTE = (
    "torch may warn once per process that 'find_unused_parameters=True was specified in DDP constructor, "
    "but did not find any unused parameters': expected here - a cached step can leave some blocks' "
    "adapters (or the compensation) without a gradient on one rank, so each role's DDP looks for unused "
    "parameters every iteration; the cost is one extra graph traversal per backward."
)


def shard(
    model: nn.Module,
    blocks: Iterable[nn.Module],
    d: Placement,
    extra: Iterable[nn.Module] = (),
    reshard_after_forward: bool = True,
    reshard_root_after_forward: bool | None = None,
) -> nn.Module:
    """FSDP2: ``fully_shard`` each transformer block, each module in ``extra`` (e.g. the compensation MLP, which
    lives outside the base but must still be averaged), then the root ``model`` (the rest: embeddings, norms,
    output projection). Each rank keeps 1/N of every parameter; a block is all-gathered just for its forward
    and again for its backward. Afterwards the model's parameters are DTensors: build optimisers *after* this.

    The rules the trainer keeps under FSDP2 (same modules in the same order on every rank, one role per step, when
    ``reshard_root_after_forward`` must be False): docs/decisions/0002-fsdp2-rules.md.
    Single process: the model unchanged.
    """
    if not d.distributed:
        return model
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    quiet_fsdp_view_warning()
    mesh = init_device_mesh(d.device.type, (d.world,))
    for block in blocks:
        fully_shard(block, mesh=mesh, reshard_after_forward=reshard_after_forward)
    for module in extra:
        fully_shard(module, mesh=mesh, reshard_after_forward=reshard_after_forward)
    root_reshard = reshard_after_forward if reshard_root_after_forward is None else reshard_root_after_forward
    fully_shard(model, mesh=mesh, reshard_after_forward=root_reshard)
    return model


def clip_grad_norm(params: Iterable[nn.Parameter], max_norm: float) -> float:
    """Clip and return the global gradient norm (before clipping) as a float, for plain tensors and for FSDP2's
    sharded DTensor gradients (whose norm is a DTensor until it is reduced over the shards)."""
    norm = torch.nn.utils.clip_grad_norm_([p for p in params if p.grad is not None], max_norm)
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    return float(norm)


# ----------------------------------------------------------------------------------------------- state


def full_state_dict(
    model: nn.Module, d: Placement, trainable_only: bool = False, keep: Callable[[str], bool] | None = None
) -> dict[str, torch.Tensor]:
    """The model's full (unsharded) state on CPU, on rank 0 (an empty dict elsewhere), with the model's own key
    names (no DDP ``module.`` prefix, no FSDP wrapping names). Under FSDP2 this is a collective: call it on
    every rank. ``trainable_only`` leaves the frozen base out *before* gathering (a checkpoint of adapters +
    compensation must not all-gather a 12 B base onto rank 0); ``keep(name)`` filters the keys afterwards."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    if d.distributed:
        opts = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=trainable_only)
        state: dict = get_model_state_dict(model, options=opts)
    elif trainable_only:
        state = {k: v.detach().cpu() for k, v in model.named_parameters() if v.requires_grad}
    else:
        state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    if d.distributed and not d.is_main:
        return {}
    return {k: v for k, v in state.items() if keep is None or keep(k)}


def load_full_state_dict(model: nn.Module, state: dict[str, torch.Tensor], d: Placement, strict: bool = False) -> None:
    """Load a full state dict that only rank 0 needs to have read (the others pass ``{}``): it is broadcast and
    each rank keeps its shard (FSDP2) or its copy (DDP / plain). ``strict=False`` allows an adapters-only dict."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    if not d.distributed:
        model.load_state_dict(state, strict=strict)
        return
    opts = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=strict)
    set_model_state_dict(model, dict(state) if d.is_main else {}, options=opts)


def storage_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind ``tensors`` (DTensors count their local shard): the memory a
    process really holds for them, with views and shared weights counted once."""
    seen: dict[tuple, int] = {}
    for t in tensors:
        local = t.to_local() if hasattr(t, "to_local") else t
        s = local.untyped_storage()
        seen[(s.device.type, s.data_ptr())] = s.nbytes()
    return sum(seen.values())


def is_finite(loss: torch.Tensor, d: Placement) -> bool:
    """The loss is finite on every rank (then all ranks step; otherwise none does)."""
    return all_true(bool(math.isfinite(float(loss.detach()))), d)


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, d: Placement) -> dict:
    """The optimiser's state keyed by the model's parameter names, unsharded, on CPU: the same format from 1 or N
    processes, DDP or FSDP2, so a run can resume with another world size. A collective under torchrun."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict, d: Placement) -> None:
    """Inverse of ``full_optimizer_state`` (every rank passes the full dict; under FSDP2 each keeps its shard)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    # torch materialises the optimiser's state with a zero-lr step first, and skips that when any gradient exists
    optimizer.zero_grad(set_to_none=True)
    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))
