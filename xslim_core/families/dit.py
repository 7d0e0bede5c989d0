"""DiT (class-conditional, adaLN-zero): X-Slim caches it; 1.x-Distill does not train it."""

from __future__ import annotations

from ..adapters.base import Adapter, BoundBlock
from ..tokens import IMG_ONLY
from . import FamilySpec


class DiTAdapter(Adapter[BoundBlock]):
    """DiT (class-conditional, adaLN-zero): one stack of image-only blocks; positions are added at embedding."""

    family = "dit"
    display_name = "DiT"
    model_classes = ("DiTTransformer2DModel",)
    stacks = (("main", "transformer_blocks"),)
    txt_arg = None
    block_txt_arg = None
    block_outputs = {"main": ("img",)}
    attention = {"main": (("attn1", IMG_ONLY),)}


SPEC = FamilySpec(DiTAdapter)
