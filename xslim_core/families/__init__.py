"""What a model family is, in one place: one record per family, one module per family.

A record (``FamilySpec``) holds every fact the engine and the trainer need of a diffusers family: the adapter (the
block tables X-Slim caches through, which also name the family, its classes and its time scale), the velocity call
1.x-Distill trains through, the latent geometry, the memory planner's coefficients, the trainer's defaults and the
LoRA targets. ComfyUI's own classes of the same families are described by ``nodes/families.py``, keyed by the same
id. Adding a family: a module here (adapter + record, listed in ``FAMILY_MODULES``), one in the node layer if
ComfyUI has it, and its builder in ``tests/families.py`` (the parametrized registry test then checks it).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..adapters.base import Adapter

# the family modules, in the order lookups try them
FAMILY_MODULES = ("sd3", "flux", "hunyuan_video", "dit")

# LoRA on the blocks' attention and MLP projections (diffusers' names, shared by every family); other layers frozen.
DIFFUSERS_LORA_TARGETS = (
    r".*(transformer_blocks|single_transformer_blocks)\.\d+\.(attn2?\.(to_q|to_k|to_v|to_out\.0|"
    r"add_q_proj|add_k_proj|add_v_proj|to_add_out)|ff\.net\.(0\.proj|2)|ff_context\.net\.(0\.proj|2)|"
    r"proj_mlp|proj_out)"
)


def model_times(sigma, x: torch.Tensor, scale: float) -> torch.Tensor:
    """A model call's time input for a batch ``x``: sigma (a number or one per row) times the family's scale."""
    return torch.as_tensor(sigma, dtype=x.dtype, device=x.device).reshape(-1).expand(x.shape[0]) * scale


@dataclass(frozen=True)
class LatentGeometry:
    """The VAE latent and the transformer's patching of it."""

    channels: int
    downscale: int  # VAE spatial downscale
    patch: int  # spatial patch size on the latent
    temporal_downscale: int = 1  # video VAEs: latent frames = (frames - 1) // t + 1
    packed: bool = False  # the transformer takes patch tokens [N, C] (its pipeline packs the latent), not [C, H, W]

    @property
    def video(self) -> bool:
        """A latent with a frame axis: [C, F, H, W]."""
        return self.temporal_downscale > 1


@dataclass(frozen=True)
class TrainerDefaults:
    """Safe starting points where a Train-node widget is left at auto (reasons: docs/decisions/0004)."""

    batch_size: int
    guidance_scale: float  # the teacher's CFG in the real score; 1 = no CFG (guidance-distilled models)


@dataclass(frozen=True)
class ActivationModel:
    """What autograd saves per token per width per block, (full, LoRA), as the memory planner counts it
    (``distill_core/memory.py``, measured on diffusers 0.42's blocks)."""

    double: tuple = (25.8, 18.6)
    single: tuple = (22.0, 18.2)
    outside: tuple = (3.6, 1.0)  # embeddings + final layer
    dual_extra: tuple = (0.0, 0.0)  # a second, image-only attention in a block (SD3.5-M's), per image token


@dataclass(frozen=True)
class FamilySpec:
    """One diffusers model family. ``velocity`` is ``None`` for a family X-Slim caches but 1.x-Distill does not
    train (then the training fields are unset too)."""

    adapter: type[Adapter]
    velocity: Callable | None = None  # (module, x, sigma, cond, extra) -> velocity, the pipeline's call
    latent: LatentGeometry | None = None
    text_tokens: int = 0  # the pipeline's default text length (all encoders concatenated)
    embedded_guidance: float | None = None  # guidance-distilled models: the guidance input's default
    activations: ActivationModel = field(default_factory=ActivationModel)
    reference_model: str | None = None  # the published architecture the memory planner scales from
    aliases: tuple[str, ...] = ()  # other names the memory planner accepts (e.g. sd3.5)
    trainer: TrainerDefaults | None = None
    lora_targets: str = DIFFUSERS_LORA_TARGETS
    # (diffusers pipeline, prompts, device, max_tokens or None) -> (context, pooled, mask or None): the family's
    # text encoders through its pipeline's own encode_prompt (``python -m distill_core.prompts encode``)
    text_encode: Callable | None = None

    @property
    def id(self) -> str:
        return self.adapter.family

    @property
    def display_name(self) -> str:
        return self.adapter.display_name

    @property
    def model_classes(self) -> tuple[str, ...]:
        return self.adapter.model_classes

    @property
    def time_scale(self) -> float:
        return self.adapter.time_scale

    @property
    def trainable(self) -> bool:
        return self.velocity is not None


def _load() -> dict[str, FamilySpec]:
    specs = [importlib.import_module(f"{__name__}.{name}").SPEC for name in FAMILY_MODULES]
    return {spec.id: spec for spec in specs}


REGISTRY: dict[str, FamilySpec] = _load()


def family_spec(family: str) -> FamilySpec:
    """The record of ``family``; a clear error naming the known ones otherwise."""
    if family not in REGISTRY:
        raise KeyError(f"unknown model family {family!r}; known: {', '.join(REGISTRY)}")
    return REGISTRY[family]


def trainable_families() -> list[FamilySpec]:
    return [spec for spec in REGISTRY.values() if spec.trainable]


def family_of_class(class_name: str) -> FamilySpec | None:
    """The family whose diffusers class is ``class_name``, or None."""
    return next((spec for spec in REGISTRY.values() if class_name in spec.model_classes), None)


__all__ = [
    "ActivationModel",
    "DIFFUSERS_LORA_TARGETS",
    "FamilySpec",
    "LatentGeometry",
    "REGISTRY",
    "TrainerDefaults",
    "family_of_class",
    "family_spec",
    "model_times",
    "trainable_families",
]
