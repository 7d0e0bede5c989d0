"""Pictures for people who would rather look than read: the per-step decision map and the compare grid.
Images are ComfyUI IMAGE tensors ([N, H, W, 3], float in [0, 1]); nothing here imports ComfyUI."""

from __future__ import annotations

import textwrap

import numpy as np
import torch
from PIL import Image, ImageDraw

from ..xslim_core.demo_model.latents import COMFY_LATENT_SCALE, LATENT_SHAPE, latent_to_image

COLOURS = {"F": (31, 78, 140), "B": (240, 150, 40), "T": (60, 160, 80), ".": (225, 225, 225), "?": (255, 255, 255)}
LEGEND = "F full   B block refresh   T token refresh   . skipped"


def to_image_tensor(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0)[None]


def decision_map(patterns: dict, title: str, cell: int = 14) -> torch.Tensor:
    """One row of coloured cells per batch row (sample x CFG branch), one column per step."""
    rows = list(patterns.items())
    steps = max((len(p) for _, p in rows), default=0)
    label_w, top = 70, 34
    img = Image.new("RGB", (label_w + max(steps, 1) * cell + 8, top + max(len(rows), 1) * cell + 22), "white")
    draw = ImageDraw.Draw(img)
    draw.text((4, 4), title, fill="black")
    for step in range(0, steps, 5):
        draw.text((label_w + step * cell, top - 12), str(step), fill="gray")
    for r, (key, pattern) in enumerate(rows):
        y = top + r * cell
        label = f"{key[0]} {key[-1]}" if isinstance(key, tuple) and isinstance(key[0], str) else f"row {r}"
        draw.text((4, y + 1), label, fill="black")
        for s, letter in enumerate(pattern):
            x = label_w + s * cell
            draw.rectangle([x, y, x + cell - 2, y + cell - 2], fill=COLOURS.get(letter, (255, 255, 255)))
    draw.text((4, top + len(rows) * cell + 6), LEGEND, fill="black")
    return to_image_tensor(img)


def is_demo_latent(samples: torch.Tensor) -> bool:
    return tuple(samples.shape[1:]) == LATENT_SHAPE


def demo_decode(samples: torch.Tensor) -> torch.Tensor:
    """The demo model's weight-free decoder: ComfyUI latent -> grey 28x28 image as RGB IMAGE."""
    grey = latent_to_image(samples.float() * COMFY_LATENT_SCALE)  # [B, 1, 28, 28]
    return grey.permute(0, 2, 3, 1).expand(-1, -1, -1, 3).contiguous()


def latent_preview(samples: torch.Tensor, scale: int = 8) -> torch.Tensor:
    """A rough look at any latent without a VAE: three channels, min-max scaled, enlarged."""
    x = samples.float()
    if x.ndim == 5:  # video: frames side by side
        x = torch.cat(list(x.unbind(2)), dim=-1)
    x = x[:, :3]
    lo, hi = x.amin(dim=(1, 2, 3), keepdim=True), x.amax(dim=(1, 2, 3), keepdim=True)
    x = ((x - lo) / (hi - lo).clamp_min(1e-6)).repeat_interleave(scale, -1).repeat_interleave(scale, -2)
    return x.permute(0, 2, 3, 1).contiguous()


def labelled_grid(columns: list[torch.Tensor], labels: list[list[str]], min_width: int = 150) -> torch.Tensor:
    """Columns of IMAGE batches side by side, each under its own lines of text."""
    pix = [(c.clamp(0, 1) * 255).round().byte().cpu().numpy() for c in columns]
    n, h, w = pix[0].shape[0], pix[0].shape[1], pix[0].shape[2]
    zoom = max(1, min_width // w)
    col_w = w * zoom
    # long lines wrap to the column (the default font is about 6 px a character) instead of running over the next
    labels = [[part for line in lines for part in (textwrap.wrap(line, max(8, col_w // 6)) or [""])] for lines in labels]
    text_h = 14 * max(len(lines) for lines in labels) + 6
    img = Image.new("RGB", (len(columns) * (col_w + 6), text_h + n * h * zoom), "white")
    draw = ImageDraw.Draw(img)
    for c, (batch, lines) in enumerate(zip(pix, labels)):
        x = c * (col_w + 6)
        for k, line in enumerate(lines):
            draw.text((x + 2, 3 + 14 * k), line, fill="black")
        for i in range(n):
            tile = Image.fromarray(batch[i]).resize((col_w, h * zoom), Image.NEAREST)
            img.paste(tile, (x, text_h + i * h * zoom))
    return to_image_tensor(img)
