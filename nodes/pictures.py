"""Pictures for people who would rather look than read: the per-step decision map and the compare grid.
Images are ComfyUI IMAGE tensors ([N, H, W, 3], float in [0, 1]); nothing here imports ComfyUI."""

from __future__ import annotations

import textwrap

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from xslim_demo.latents import COMFY_LATENT_SCALE, LATENT_SHAPE, latent_to_image
from xslim_demo.text_teacher import COMFY_SD3_SCALE, COMFY_SD3_SHIFT
from xslim_demo.text_teacher import LATENT_SHAPE as TEXT_LATENT_SHAPE

COLOURS = {"F": (31, 78, 140), "B": (240, 150, 40), "T": (60, 160, 80), ".": (225, 225, 225), "?": (255, 255, 255)}
MEANING = {"F": "full step", "B": "block refresh", "T": "token refresh", ".": "skipped (cached)", "?": "not run"}
LEGEND = "F full   B block refresh   T token refresh   . skipped"


def to_image_tensor(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0)[None]


def row_labels(keys) -> dict:
    """Readable names for the engine's row keys (CFG branch, cond entry uuid, sample): "cond, sample 1"; a
    second cond entry of the same branch (area/mask conds) adds "entry 2"."""
    entries: dict = {}
    for key in keys:
        if isinstance(key, tuple) and len(key) == 3 and isinstance(key[0], str):
            entries.setdefault(key[0], [])
            if key[1] not in entries[key[0]]:
                entries[key[0]].append(key[1])
    labels = {}
    for r, key in enumerate(keys):
        if isinstance(key, tuple) and len(key) == 3 and isinstance(key[0], str):
            branch, entry, sample = key
            extra = f", entry {entries[branch].index(entry) + 1}" if len(entries[branch]) > 1 else ""
            labels[key] = f"{branch}{extra}, sample {int(sample) + 1}"
        else:
            labels[key] = f"row {r + 1}"
    return labels


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: one bitmap size
        return ImageFont.load_default()


LEGEND_ORDER = "FBT."


def legend_width(font) -> int:
    """Pixels the colour legend takes on one line: per entry a 16 px swatch, its meaning, and the gaps."""
    return 8 + sum(30 + int(font.getlength(MEANING[letter])) + 18 for letter in LEGEND_ORDER)


def decision_map(patterns: dict, title: str, width: int = 900) -> torch.Tensor:
    """One labelled row of cells per batch row (sample x CFG branch), one column per step, a colour legend;
    cells big enough carry their letter too (for readers who do not tell the colours apart). The picture is as
    wide as the widest of grid, legend and title, so a short run (a 2-step student) keeps its legend and title."""
    rows = list(patterns.items())
    steps = max((len(p) for _, p in rows), default=0)
    labels = row_labels([k for k, _ in rows])
    font, small = _font(15), _font(12)
    label_w = 12 + max((int(font.getlength(labels[k])) for k, _ in rows), default=40)
    cell = max(6, min(26, (width - label_w - 16) // max(steps, 1)))
    top, legend_h = 50, 40
    grid_w = label_w + max(steps, 1) * cell + 16
    img_w = max(grid_w, legend_width(font), 8 + int(font.getlength(title)) + 8)
    img = Image.new("RGB", (img_w, top + max(len(rows), 1) * cell + legend_h + 10), "white")
    draw = ImageDraw.Draw(img)
    draw.text((8, 6), title, fill="black", font=font)
    tick = 5 if steps <= 60 else 10
    for step in range(0, steps, tick):
        draw.text((label_w + step * cell, top - 16), str(step + 1), fill="gray", font=small)
    for r, (key, pattern) in enumerate(rows):
        y = top + r * cell
        draw.text((8, y + max(0, (cell - 15) // 2)), labels[key], fill="black", font=font)
        for s, letter in enumerate(pattern):
            x = label_w + s * cell
            colour = COLOURS.get(letter, (255, 255, 255))
            draw.rectangle([x, y, x + cell - 2, y + cell - 2], fill=colour)
            if cell >= 14 and letter != "?":
                ink = "white" if sum(colour) < 400 else "black"
                draw.text((x + cell / 2 - 1, y + cell / 2 - 1), letter, fill=ink, font=small, anchor="mm")
    x, y = 8, top + len(rows) * cell + 14
    for letter in LEGEND_ORDER:
        draw.rectangle([x, y, x + 16, y + 16], fill=COLOURS[letter], outline=(150, 150, 150))
        draw.text((x + 8, y + 8), letter, fill="white" if sum(COLOURS[letter]) < 400 else "black", font=small, anchor="mm")
        draw.text((x + 22, y), MEANING[letter], fill="black", font=font)
        x += 30 + int(font.getlength(MEANING[letter])) + 18
    return to_image_tensor(img)


def table_image(header: list[str], rows: list[list[str]], note: str = "") -> Image.Image:
    """An aligned table as a picture (a text box would wrap it), with an optional note under it."""
    font = _font(15)
    cells = [header] + rows
    widths = [max(int(font.getlength(r[c])) for r in cells) + 18 for c in range(len(header))]
    line = 24
    h = line * len(cells) + 12 + (line * len(note.splitlines()) + 6 if note else 0)
    img = Image.new("RGB", (sum(widths) + 16, h), "white")
    draw = ImageDraw.Draw(img)
    for r, row in enumerate(cells):
        x, y = 8, 6 + r * line
        if r == 0:
            draw.rectangle([0, y - 3, img.width, y + line - 4], fill=(235, 238, 244))
        for c, text in enumerate(row):
            right = c > 0  # numbers align right
            draw.text((x + widths[c] - 10 if right else x, y), text, fill="black", font=font, anchor="ra" if right else "la")
            x += widths[c]
    for k, text in enumerate(note.splitlines()):
        draw.text((8, 6 + len(cells) * line + 6 + k * line), text, fill=(170, 60, 20), font=font)
    return img


def is_demo_latent(samples: torch.Tensor) -> bool:
    """The class teacher's latent (HunyuanVideo layout, one frame)."""
    return tuple(samples.shape[1:]) == LATENT_SHAPE


def is_demo_text_latent(samples: torch.Tensor) -> bool:
    """The text teacher's latent (SD3 layout: EmptySD3LatentImage 64x64)."""
    return tuple(samples.shape[1:]) == TEXT_LATENT_SHAPE


def demo_decode(samples: torch.Tensor) -> torch.Tensor:
    """The demo models' weight-free decoder: a ComfyUI latent of either demo teacher -> grey 28x28 image as RGB
    IMAGE. ComfyUI keeps latents in its own scale (HunyuanVideo: model / 0.476986; SD3: model / 1.5305 + 0.0609)."""
    x = samples.float()
    if is_demo_text_latent(x):
        model_space = ((x - COMFY_SD3_SHIFT) * COMFY_SD3_SCALE).unsqueeze(2)
    else:
        model_space = x * COMFY_LATENT_SCALE
    grey = latent_to_image(model_space)  # [B, 1, 28, 28]
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


def labelled_grid(columns: list[torch.Tensor], labels: list[list[str]], min_width: int = 150,
                  table: Image.Image | None = None) -> torch.Tensor:
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
    if table is not None:  # the numbers under the pictures, in one image the node shows whole
        both = Image.new("RGB", (max(img.width, table.width), img.height + table.height + 8), "white")
        both.paste(img, (0, 0))
        both.paste(table, (0, img.height + 8))
        img = both
    return to_image_tensor(img)
