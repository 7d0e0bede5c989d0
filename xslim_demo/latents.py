"""The weight-free, invertible "VAE" of the demo model.

A 28x28 grey image in [0, 1] is padded to 32x32 with background, mapped to [-1, 1] and pixel-unshuffled by 4
into a 16-channel 8x8 latent with one frame: [B, 16, 1, 8, 8] (HunyuanVideo's video layout). Every latent
channel is one pixel of a 4x4 cell, so the map is exact both ways. This is the model-space latent that the
diffusers sampler uses; ComfyUI multiplies its latents by HunyuanVideo's scale factor (0.476986) before the
model, so a ComfyUI LATENT holds model-space / 0.476986 (see COMFY_LATENT_SCALE).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

PAD = 2
FACTOR = 4
COMFY_LATENT_SCALE = 0.476986
LATENT_SHAPE = (16, 1, 8, 8)


def image_to_latent(images: torch.Tensor) -> torch.Tensor:
    x = F.pad(images, (PAD, PAD, PAD, PAD)) * 2.0 - 1.0
    return F.pixel_unshuffle(x, FACTOR).unsqueeze(2)


def latent_to_image(latents: torch.Tensor) -> torch.Tensor:
    x = F.pixel_shuffle(latents.squeeze(2), FACTOR)
    return ((x[..., PAD:-PAD, PAD:-PAD] + 1.0) / 2.0).clamp(0.0, 1.0)
