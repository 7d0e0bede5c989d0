"""The three networks of distribution matching (teacher, student, fake score) as roles on a ``FlowModel``.

Two layouts:
- full copies (``lora_rank`` 0): student and fake score are trainable deep copies of the transformer, the
  teacher the frozen original. Three copies of the weights: right for small models (the demo teacher has
  5.1M parameters) and the measured demo recipe.
- one shared base (``lora_rank`` > 0): student and fake score are two LoRA adapters (peft) on the single
  frozen transformer; the teacher is that transformer with the adapters disabled. One copy of the big
  weights, whatever the model: this is how SD3.5/FLUX/HunyuanVideo fit one GPU.
Every role is called the same way, ``role(x, sigma, cond)``, and exposes its trainable parameters and its
state (only what it trains) for checkpoints.
"""

from __future__ import annotations

import copy
import warnings
from contextlib import contextmanager

import torch
from torch import nn

from .models import FlowModel

from xslim_core.families import DIFFUSERS_LORA_TARGETS
from xslim_core.hooks import wrap_forward

ROLES = ("student", "fake")
# LoRA on the blocks' attention and MLP projections (diffusers names, the families' default); others stay frozen.
LORA_TARGETS = DIFFUSERS_LORA_TARGETS


class SharedLora:
    """Student and fake-score LoRA adapters on one frozen module; ``using(role)`` activates one of them
    (``None``: the teacher, adapters disabled)."""

    def __init__(self, module: nn.Module, rank: int, alpha: float | None = None, targets: str = LORA_TARGETS):
        if not isinstance(rank, int) or isinstance(rank, bool) or rank <= 0:
            raise ValueError(
                f"LoRA rank must be a whole number > 0, got {rank!r}; use lora_rank 0 for full trainable copies."
            )
        try:
            from peft import LoraConfig, inject_adapter_in_model
            from peft.tuners.tuners_utils import BaseTunerLayer
        except ImportError:
            raise ImportError(
                "LoRA training needs the peft package: pip install 'peft>=0.17' (in ComfyUI's Python), "
                "or use lora_rank 0 (full copies) for a small model."
            ) from None

        module.requires_grad_(False)
        # peft takes a float alpha too (its annotation says int)
        config = LoraConfig(r=rank, lora_alpha=alpha or rank, target_modules=targets, init_lora_weights=True)  # type: ignore[arg-type]
        with warnings.catch_warnings():  # peft warns that a second adapter joins the first: that is the point here
            warnings.filterwarnings("ignore", message="Already found a `peft_config`")
            for role in ROLES:  # B starts at zero: both roles start as the teacher, as full copies do
                inject_adapter_in_model(config, module, adapter_name=role)
        self.module, self.rank = module, rank
        self.layers = [m for m in module.modules() if isinstance(m, BaseTunerLayer)]
        if not self.layers:
            raise ValueError(f"no layer of {type(module).__name__} matches the LoRA targets; nothing would train.")
        self.params = {
            role: [p for n, p in module.named_parameters() if "lora_" in n and f".{role}." in n] for role in ROLES
        }
        self.names = {
            role: [n for n, p in module.named_parameters() if "lora_" in n and f".{role}." in n] for role in ROLES
        }
        self.active: str | None = "unset"

    def _select(self, role: str | None) -> None:
        if role == self.active:
            return
        for layer in self.layers:
            layer.enable_adapters(role is not None)
            if role is not None:
                layer.set_adapter(role)
        for params in self.params.values():  # peft flips requires_grad when switching; both roles keep training
            for p in params:
                p.requires_grad_(True)
        self.active = role

    @contextmanager
    def using(self, role: str | None):
        self._select(role)
        yield


class RoleState:
    """The checkpointed part of a role: a state_dict/load_state_dict pair over its trainable tensors only."""

    def __init__(self, named: dict[str, nn.Parameter]):
        self.named = named

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: p.detach() for k, p in self.named.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing, unexpected = sorted(set(self.named) - set(state)), sorted(set(state) - set(self.named))
        if missing or unexpected:
            raise ValueError(
                f"the saved state does not fit this network: missing {missing[:3]}, unexpected {unexpected[:3]} "
                "(was it trained with another LoRA rank or model?)"
            )
        with torch.no_grad():
            for k, p in self.named.items():
                p.copy_(state[k].to(p.dtype))

    def parameters(self):
        return iter(self.named.values())


class Role(nn.Module):
    """One network of the method: ``flow`` with ``adapter`` active (LoRA layout) or its own copy (full layout)."""

    def __init__(self, flow: FlowModel, lora: SharedLora | None = None, adapter: str | None = None):
        super().__init__()
        self.flow, self.lora, self.adapter = flow, lora, adapter

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, cond) -> torch.Tensor:
        if self.lora is None:
            return self.flow(x, sigma, cond)
        with self.lora.using(self.adapter):
            return self.flow(x, sigma, cond)

    @contextmanager
    def active(self):
        """The role's adapter selected for code that calls the module directly (block hooks, features)."""
        if self.lora is None:
            yield
        else:
            with self.lora.using(self.adapter):
                yield

    @property
    def module(self) -> nn.Module:
        return self.flow.module

    @property
    def width(self) -> int:
        return self.flow.width

    def trainable(self) -> list[nn.Parameter]:
        if self.lora is None:
            return [p for p in self.flow.module.parameters() if p.requires_grad]
        return list(self.lora.params[self.adapter]) if self.adapter else []

    @property
    def adapter_name(self) -> str:
        """This role's adapter (a LoRA role always has one; full-copy roles have none)."""
        if self.adapter is None:
            raise ValueError("a full-copy role has no adapter")
        return self.adapter

    def state(self) -> RoleState | nn.Module:
        if self.lora is None:
            return self.flow.module
        return RoleState(dict(zip(self.lora.names[self.adapter_name], self.lora.params[self.adapter_name])))

    def merged_state_dict(self) -> dict[str, torch.Tensor]:
        """The transformer's weights as this role computes them (LoRA merged in), under the base's own names."""
        if self.lora is None:
            return {k: v.detach() for k, v in self.flow.module.state_dict().items()}
        return merged_weights(self.lora, self.adapter_name)


def merged_weights(lora: SharedLora, role: str, state: dict | None = None) -> dict[str, torch.Tensor]:
    """base + scale * B @ A for every adapted linear layer (peft's own delta: ``transpose(B @ A, fan_in_fan_out)
    * scaling``), under the base's own names, without touching the shared module. ``state``: the module's full
    state dict when it is sharded (FSDP gathers it on rank 0); None reads the module itself."""
    from peft.tuners.lora import Linear as LoraLinear

    state = {k: v.detach() for k, v in (state if state is not None else lora.module.state_dict()).items()}
    adapted = {}
    for name, m in lora.module.named_modules():
        if isinstance(m, LoraLinear) and role in m.lora_A:
            delta = state[f"{name}.lora_B.{role}.weight"] @ state[f"{name}.lora_A.{role}.weight"]
            delta = (delta.T if m.fan_in_fan_out else delta) * m.scaling[role]
            adapted[f"{name}.base_layer.weight"] = (f"{name}.weight", state[f"{name}.base_layer.weight"] + delta)
            if f"{name}.base_layer.bias" in state:
                adapted[f"{name}.base_layer.bias"] = (f"{name}.bias", state[f"{name}.base_layer.bias"])
    out = {}
    for key, value in state.items():
        if "lora_" in key:
            continue
        name, tensor = adapted.get(key, (key.replace(".base_layer.", "."), value))
        out[name] = tensor
    return out


def checkpoint_blocks(flow: FlowModel, lora: SharedLora | None = None) -> None:
    """Per-block activation checkpointing of a trainable transformer: each block recomputes its activations in
    backward instead of keeping them. Installed under the cached step's patches (``xslim_core.hooks``), so a
    block the cached step skips is neither run nor recomputed, and the recomputation runs the very function
    the forward ran, with the LoRA adapter that was active then (backward comes after other roles' forwards
    have switched it)."""
    from torch.utils.checkpoint import checkpoint

    def run(inner, *args, **kwargs):
        if not torch.is_grad_enabled():
            return inner(*args, **kwargs)
        active = lora.active if lora is not None else None

        def again(*a, **k):
            if lora is None:
                return inner(*a, **k)
            with lora.using(active):
                return inner(*a, **k)

        return checkpoint(again, *args, use_reentrant=False, **kwargs)

    for spec in flow.blocks():
        wrap_forward(spec.module, run)


def build_roles(teacher: FlowModel, lora_rank: int = 0, lora_alpha: float | None = None, checkpointing: bool = False):
    """(teacher, student, fake) roles on ``teacher``'s transformer (frozen in place); ``checkpointing``: the
    trainable transformers' blocks recompute their activations in backward (``checkpoint_blocks``)."""
    teacher.module.eval().requires_grad_(False)
    if lora_rank:
        lora = SharedLora(teacher.module, lora_rank, lora_alpha, teacher.lora_targets)
        roles = Role(teacher, lora, None), Role(teacher, lora, "student"), Role(teacher, lora, "fake")
        if checkpointing:  # one module: the student and the fake score share its blocks
            checkpoint_blocks(teacher, lora)
        return roles

    def copy_of():  # copied before any forward is wrapped: a copy must not call the original's blocks
        module = copy.deepcopy(teacher.module).train().requires_grad_(True)
        role = Role(teacher.with_module(module))
        if checkpointing:
            checkpoint_blocks(role.flow)
        return role

    return Role(teacher), copy_of(), copy_of()
