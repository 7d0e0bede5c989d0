"""The three networks of distribution matching as velocity functions v(x, sigma[B], labels).

Student and fake score are full trainable copies of the teacher transformer (the demo teacher has 5.1M
parameters, so three copies cost ~60 MB). The class-embedding table is the base model's conditioning (a
text encoder's output for a real model) and is shared and frozen.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from xslim_lab.demo_model.teacher import ClassConditioner, DemoTeacher, velocity


class FlowNet(nn.Module):
    def __init__(self, model: nn.Module, conditioner: ClassConditioner):
        super().__init__()
        self.model = model
        self.conditioner = conditioner

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return velocity(self.model, self.conditioner, x, sigma, labels)

    @property
    def width(self) -> int:
        return self.model.config.num_attention_heads * self.model.config.attention_head_dim

    @property
    def null_class(self) -> int:
        return self.conditioner.null_class


def frozen_teacher(teacher: DemoTeacher) -> FlowNet:
    return FlowNet(teacher.model, teacher.conditioner).eval().requires_grad_(False)


def trainable_copy(teacher: DemoTeacher) -> FlowNet:
    """A full trainable copy of the transformer on the shared, frozen conditioning table."""
    model = copy.deepcopy(teacher.model).train().requires_grad_(True)
    return FlowNet(model, teacher.conditioner)


@torch.no_grad()
def guided_real_velocity(teacher: FlowNet, x: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor,
                         scale: float, switch: float) -> torch.Tensor:
    """Guidance control: CFG with ``scale`` where sigma <= ``switch``, the plain conditional velocity above it.

    ``switch`` >= 1 applies CFG at every noise level (plain DMD). Only rows that need guidance pay for the
    unconditional pass.
    """
    v_cond = teacher(x, sigma, labels)
    guided = sigma <= switch
    if scale == 1.0 or not bool(guided.any()):
        return v_cond
    rows = guided.nonzero().flatten()
    null = torch.full_like(labels[rows], teacher.null_class)
    v_uncond = teacher(x[rows], sigma[rows], null)
    out = v_cond.clone()
    out[rows] = v_uncond + scale * (v_cond[rows] - v_uncond)
    return out
