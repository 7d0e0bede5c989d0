"""Discriminator: trainable spectral-norm heads on the features of a frozen, pluggable backbone.

A backbone maps clean latents (and their conditioning) to a list of token features [B, T, C]; every level gets a
token-wise head whose logits are averaged over tokens, plus one head on the pooled last level. The loss is
the multi-level BCE of vision-aided GANs (real target 0.8, summed over levels).

For the demo teacher the backbone is the frozen teacher itself: the image-stream outputs of a few of its
blocks, evaluated on the sample lightly re-noised ("diffusion GAN"). It is class-aware through the teacher's
conditioning. The metrics' Fashion-MNIST classifier is deliberately not used, so the discriminator cannot
optimise the very feature space the evaluation measures. For SD3-class models, plug in a frozen image
backbone on the VAE-decoded image (the reference recipe uses OpenCLIP ConvNeXt-XXL stage outputs + pooled
embedding); only ``features`` and ``widths`` are needed.
"""

from __future__ import annotations

from typing import cast

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

from .flow import renoise
from .nets import Role
from .student import blocks_of


class TeacherFeatures(nn.Module):
    """Image-stream outputs of chosen blocks of a frozen flow model at a small random noise level."""

    def __init__(self, teacher: Role, blocks: tuple[int, ...] = (3, 7, 11), sigma_max: float = 0.3):
        super().__init__()
        self.teacher, self.blocks, self.sigma_max = teacher, tuple(blocks), sigma_max
        total = len(blocks_of(teacher))
        if not self.blocks or any(not 0 <= i < total for i in self.blocks):
            raise ValueError(
                f"discriminator blocks {list(self.blocks)} must lie in the model's {total} blocks (0..{total - 1})."
            )
        self.widths = [teacher.width] * len(self.blocks)

    def features(self, latents: torch.Tensor, cond, gen: torch.Generator) -> list[torch.Tensor]:
        sigma = (torch.rand(len(latents), generator=gen) * self.sigma_max).to(latents.device)
        noisy = renoise(
            latents, torch.zeros_like(sigma), sigma, torch.randn(latents.shape, generator=gen).to(latents.device)
        )
        found: list[torch.Tensor] = []
        specs = blocks_of(self.teacher)

        def keep(spec):  # the block's image-stream output, wherever the family puts it
            at = spec.outputs.index("img")
            return lambda _m, _a, out: found.append(out[at] if isinstance(out, tuple) else out)

        hooks = [specs[i].module.register_forward_hook(keep(specs[i])) for i in self.blocks]
        try:
            self.teacher(noisy, sigma, cond)
        finally:
            for h in hooks:
                h.remove()
        return found


class TokenHead(nn.Module):
    def __init__(self, width: int, hidden: int = 128):
        super().__init__()
        self.fc1 = spectral_norm(nn.Linear(width, hidden))
        self.fc2 = spectral_norm(nn.Linear(hidden, 1))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.leaky_relu(self.fc1(tokens), 0.2)).squeeze(-1)


class Discriminator(nn.Module):
    def __init__(self, backbone: TeacherFeatures):
        super().__init__()
        self.backbone = backbone  # frozen, not part of the trainable state
        self.heads = nn.ModuleList(TokenHead(w) for w in backbone.widths)
        self.pooled = TokenHead(backbone.widths[-1])

    def trainable(self) -> nn.Module:
        return nn.ModuleList([self.heads, self.pooled])

    def forward(self, latents: torch.Tensor, cond, gen: torch.Generator) -> list[torch.Tensor]:
        feats = self.backbone.features(latents, cond, gen)
        logits = [head(f).mean(dim=1) for head, f in zip(self.heads, feats)]
        return logits + [self.pooled(feats[-1].mean(dim=1, keepdim=True)).squeeze(1)]


def multilevel_bce(logits: list[torch.Tensor], target: float) -> torch.Tensor:
    return cast(
        torch.Tensor, sum(F.binary_cross_entropy_with_logits(level, torch.full_like(level, target)) for level in logits)
    )
