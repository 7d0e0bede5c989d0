"""The one model protocol of both halves: a velocity call and the block stacks the X-Slim adapters describe.

``FlowModel`` wraps a transformer as ``v(x, sigma[B], Conditioning)`` (flow matching: x_sigma = (1 - sigma) x0
+ sigma noise, v = noise - x0) and hands out its blocks from the same adapter the cache engine uses
(``xslim_core.adapters``; a host may pass its own ``blocks`` for classes the adapters do not know, e.g.
ComfyUI's). Each family differs only in how its forward takes time, text and positions; the model's own
forward runs unchanged. The demo teacher is a HunyuanVideo-family model whose text is its class table.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from .conditioning import Conditioning

from xslim_core.adapters import adapter_for
from xslim_core.families import REGISTRY, trainable_families


class FlowModel(nn.Module):
    """A transformer as a velocity function. ``latent_shape`` is one sample's latent shape; ``extra`` holds
    per-family call settings (FLUX's token grid, embedded guidance)."""

    def __init__(
        self,
        module: nn.Module,
        latent_shape: tuple,
        extra: dict | None = None,
        blocks: Callable | None = None,
        call: Callable | None = None,
        family: str | None = None,
    ):
        super().__init__()
        self.module = module
        self.latent_shape = tuple(latent_shape)
        self.extra = dict(extra or {})
        if blocks is None or family is None:
            adapter = adapter_for(module)
            family = family or adapter.family
            blocks = blocks or adapter.blocks
        if call is None:
            spec = REGISTRY.get(family)
            if spec is None or spec.velocity is None:
                known = ", ".join(s.id for s in trainable_families())
                raise TypeError(f"1.x-Distill has no velocity call for the {family!r} family (it has: {known}).")
            call = spec.velocity
        self.family = family
        self._call = call
        self._blocks = blocks

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        return self._call(self.module, x, sigma, cond, self.extra)

    @property
    def lora_targets(self) -> str:
        """The linears LoRA adapts, under this model's own parameter names (its family's record)."""
        return REGISTRY[self.family].lora_targets

    def blocks(self) -> list:
        """The engine's block specs (``xslim_core.adapters.base.BlockSpec`` or a host's equivalent), in order."""
        return self._blocks(self.module)

    @property
    def width(self) -> int:
        c: Any = self.module.config  # a diffusers model's configuration
        return c.num_attention_heads * c.attention_head_dim

    @property
    def text_dims(self) -> tuple[int | None, int | None]:
        """(text sequence width, pooled width) the model takes, for checking a prompt set before training."""
        c: Any = self.module.config
        context = c.get("joint_attention_dim", c.get("text_embed_dim"))
        return context, c.get("pooled_projection_dim")

    def with_module(self, module: nn.Module) -> "FlowModel":
        """The same call and settings on another copy of the transformer."""
        return FlowModel(module, self.latent_shape, self.extra, self._blocks, self._call, self.family)


def guided_velocity(
    net: Callable,
    x: torch.Tensor,
    sigma: torch.Tensor,
    cond: Conditioning,
    uncond: Conditioning,
    scale: float,
    switch: float,
    pad: bool = False,
) -> torch.Tensor:
    """CFG with ``scale`` where sigma <= ``switch``, the plain conditional velocity above it (guidance control).

    ``switch`` >= 1 applies CFG at every noise level (plain DMD). Only rows that need guidance pay for the
    unconditional pass; ``uncond`` is one row, broadcast. ``pad`` (FSDP2, where every rank must make the same
    module calls): a batch with no guided row still runs the unconditional pass, on one row, and ignores it.
    """
    v_cond = net(x, sigma, cond)
    guided = sigma <= switch
    if scale == 1.0:
        return v_cond
    if not bool(guided.any()):
        if pad:
            net(x[:1], sigma[:1], uncond.expand(1))
        return v_cond
    rows = guided.nonzero().flatten()
    v_uncond = net(x[rows], sigma[rows], uncond.expand(len(rows)))
    out = v_cond.clone()
    out[rows] = v_uncond + scale * (v_cond[rows] - v_uncond)
    return out


# -- teachers: what a run distils --------------------------------------------------------------------------
class Teacher:
    """A loaded base model for a run: the flow model, the default prompt set (None: the run must bring one),
    the base description written into student files (family, hash, signature, architecture) and an optional
    ``preview(latents) -> PIL image`` for progress pictures."""

    def __init__(
        self,
        flow: FlowModel,
        prompts,
        base: dict,
        preview: Callable | None = None,
        class_table: dict | None = None,
        student_loader: Callable | None = None,
    ):
        self.flow, self.prompts, self.base, self.preview, self.class_table = flow, prompts, base, preview, class_table
        self.student_loader = student_loader  # (path, base_hash=...) -> student.Student; None: the diffusers loader


def weights_hash(path: str) -> str:
    """The content hash of a weights file, or of a diffusers model folder's safetensors files together."""
    import hashlib
    import os

    from .jobfiles import content_hash

    if os.path.isfile(path):
        return content_hash(path)
    files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    if not files:
        raise ValueError(
            f"{path} holds no .safetensors weights (only safetensors are read: a pickled file could run code)."
        )
    return hashlib.sha256("".join(content_hash(os.path.join(path, f)) for f in files).encode()).hexdigest()[:16]


def load_diffusers_teacher(
    path: str, latent_shape: tuple, extra: dict | None = None, dtype: torch.dtype = torch.float32
) -> Teacher:
    """A diffusers transformer saved with ``save_pretrained`` (config.json + safetensors; never a pickle)."""
    import json
    import os

    import diffusers

    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path):
        raise ValueError(
            f"{path} is not a diffusers model folder (no config.json); save the transformer with save_pretrained."
        )
    with open(config_path) as f:
        config = json.load(f)
    cls = getattr(diffusers, str(config.get("_class_name")), None)
    if cls is None:
        raise ValueError(
            f"{path}: config.json names the class {config.get('_class_name')!r}, which diffusers does not have."
        )
    module = cls.from_pretrained(path, use_safetensors=True, torch_dtype=dtype)
    flow = FlowModel(module, latent_shape, extra)
    base = {
        "family": flow.family,
        "hash": weights_hash(path),
        "architecture": json.dumps(dict(module.config)),
        "name": os.path.basename(os.path.normpath(path)),
    }
    return Teacher(flow, None, base)


def load_teacher_from(loader: str, path: str | None, options: dict) -> Teacher:
    """Call a teacher loader named "module:function" (e.g. the demo model's, or ``load_diffusers_teacher``)."""
    import importlib

    module_name, _, function = loader.partition(":")
    try:
        fn = getattr(importlib.import_module(module_name), function)
    except (ImportError, AttributeError) as err:
        raise ValueError(
            f"teacher loader {loader!r} cannot be imported ({err}); write it as 'package.module:function'."
        ) from None
    return fn(path, **options)
