"""Image grids of demo-model samples (one row per class), written as PNG."""

from __future__ import annotations

import torch
from PIL import Image, ImageDraw

from .sampling import flow_sigmas, sample_euler
from .latents import LATENT_SHAPE, latent_to_image
from .teacher import CLASSES, ClassConditioner, velocity


def class_noise(per_class: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Fixed noise and labels: ``per_class`` samples of every class, class-major."""
    labels = torch.arange(len(CLASSES)).repeat_interleave(per_class)
    noise = torch.randn(len(labels), *LATENT_SHAPE, generator=torch.Generator().manual_seed(seed))
    return noise, labels


def images_to_grid(images: torch.Tensor, rows: int, labels: list[str] | None = None, scale: int = 2) -> Image.Image:
    """[N, 1, H, W] in [0, 1] -> a grid image with ``rows`` rows and an optional label column."""
    n, _, h, w = images.shape
    cols = n // rows
    label_w = 90 if labels else 0
    grid = Image.new("L", (label_w + cols * w * scale, rows * h * scale), 255)
    pix = (images.clamp(0, 1) * 255).round().byte().squeeze(1).cpu().numpy()
    for i in range(n):
        r, c = divmod(i, cols)
        tile = Image.fromarray(pix[i]).resize((w * scale, h * scale), Image.NEAREST)
        grid.paste(tile, (label_w + c * w * scale, r * h * scale))
    if labels:
        draw = ImageDraw.Draw(grid)
        for r, text in enumerate(labels):
            draw.text((4, r * h * scale + h * scale // 2 - 5), text, fill=0)
    return grid


@torch.no_grad()
def sample_grid(model, conditioner: ClassConditioner, path: str, steps: int = 50, cfg: float = 2.0, per_class: int = 8):
    noise, labels = class_noise(per_class)
    null = torch.full_like(labels, conditioner.null_class)

    def fn(x, sigma):
        rows = torch.cat([null, labels]) if x.shape[0] == 2 * len(labels) else labels
        return velocity(model, conditioner, x, sigma, rows)

    latents = sample_euler(fn, noise, flow_sigmas(steps), cfg_scale=cfg)
    images_to_grid(latent_to_image(latents), len(CLASSES), CLASSES).save(path)
