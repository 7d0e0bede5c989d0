"""A tiny random-weight demo-teacher file (3 blocks, width 32) for fast tests of the distillation code."""

from __future__ import annotations

import torch

from xslim_demo.teacher import ARCHITECTURE, ClassConditioner, build_model, save_teacher

TINY_ARCHITECTURE = {**ARCHITECTURE, "attention_head_dim": 32, "num_layers": 1, "num_single_layers": 2,
                     "num_refiner_layers": 1, "text_embed_dim": 16, "pooled_projection_dim": 32, "rope_axes_dim": (8, 12, 12)}


def write_tiny_teacher(path: str, seed: int = 0, poison: bool = False) -> str:
    """Write a tiny teacher to ``path``; ``poison`` puts a NaN in its output layer (for the non-finite guard)."""
    torch.manual_seed(seed)
    model = build_model(TINY_ARCHITECTURE)
    conditioner = ClassConditioner(10, 4, TINY_ARCHITECTURE["text_embed_dim"], TINY_ARCHITECTURE["pooled_projection_dim"])
    if poison:
        with torch.no_grad():
            model.proj_out.bias[0] = float("nan")
    save_teacher(path, model, conditioner, {"note": "tiny random test model"})
    return path
