"""The loss plot of a training job (one small panel per loss, raw values and a smoothed line), drawn with PIL so
the pack needs no plotting library. Shared by the jobs route (loss.png) and the Job Status node. No ComfyUI here."""

from __future__ import annotations

import math

from PIL import Image, ImageDraw, ImageFont

COLOURS = [(31, 78, 140), (200, 90, 30), (60, 140, 70), (140, 60, 150)]
# drawn at about the size the jobs panel shows it (the sidebar is 300-450 px wide), so its text stays readable there
WIDTH, PANEL, MARGIN_L, MARGIN_R, MARGIN_T = 420, 128, 58, 10, 26
FONT_PX = 14


def _font(size: int = FONT_PX):
    try:  # Pillow 10.1+ with FreeType: its bundled font at a readable size
        return ImageFont.load_default(size=size)
    except (TypeError, ImportError, OSError):  # an older Pillow: the small bitmap font
        return ImageFont.load_default()


def _fmt(v: float) -> str:
    return f"{v:.3g}"


def _smoothed(values: list[float], weight: float = 0.9) -> list[float]:
    out, avg = [], None
    for v in values:
        avg = v if avg is None else weight * avg + (1 - weight) * v
        out.append(avg)
    return out


def loss_plot(history: list[dict], title: str) -> Image.Image:
    """``history``: metric records with an ``iteration`` and ``loss_*`` values. One panel per loss name."""
    names = sorted({k for r in history for k in r if k.startswith("loss")})
    panels = max(1, len(names))
    img = Image.new("RGB", (WIDTH, MARGIN_T + panels * PANEL + 6), "white")
    draw = ImageDraw.Draw(img)
    font, small = _font(), _font(FONT_PX - 2)
    draw.text((6, 5), title, fill="black", font=font)
    if not names:
        draw.text((MARGIN_L, MARGIN_T + PANEL // 2 - 6), "no iterations yet", fill="gray", font=font)
        return img
    for p, name in enumerate(names):
        points = [(r["iteration"], r[name]) for r in history if isinstance(r.get(name), (int, float)) and math.isfinite(r[name])]
        top = MARGIN_T + p * PANEL
        box = (MARGIN_L, top + 18, WIDTH - MARGIN_R, top + PANEL - 18)
        draw.rectangle(box, outline=(200, 200, 200))
        colour = COLOURS[p % len(COLOURS)]
        draw.text((6, top + 1), name, fill=colour, font=font)
        if not points:
            continue
        xs, ys = [x for x, _ in points], [y for _, y in points]
        x0, x1 = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
        lo, hi = min(ys), max(ys)
        if hi - lo < 1e-12:
            lo, hi = lo - 0.5 * abs(lo or 1), hi + 0.5 * abs(hi or 1)

        def at(x, y, box=box, x0=x0, x1=x1, lo=lo, hi=hi):  # this panel's scale
            return (box[0] + (x - x0) / (x1 - x0) * (box[2] - box[0]), box[3] - (y - lo) / (hi - lo) * (box[3] - box[1]))

        light = tuple(int(c + (255 - c) * 0.65) for c in colour)
        if len(points) > 1:
            draw.line([at(x, y) for x, y in points], fill=light, width=1)
            draw.line([at(x, y) for x, y in zip(xs, _smoothed(ys))], fill=colour, width=2)
        else:
            cx, cy = at(*points[0])
            draw.ellipse((cx - 2, cy - 2, cx + 2, cy + 2), fill=colour)
        draw.text((4, box[1] - 2), _fmt(hi), fill="gray", font=small)
        draw.text((4, box[3] - FONT_PX + 2), _fmt(lo), fill="gray", font=small)
        draw.text((box[0], box[3] + 2), str(x0), fill="gray", font=small)
        label = f"iteration {xs[-1]}: {_fmt(ys[-1])}"
        draw.text((box[2] - draw.textlength(label, font=small), box[3] + 2), label, fill="black", font=small)
    return img
