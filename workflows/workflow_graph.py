"""The pieces every workflow generator here shares: a UI-format graph with deterministic ids, a left-to-right
layout that follows the data flow, titled groups, notes, model metadata for the missing-models dialog and the
Templates-browser thumbnail. ``build_workflows.py`` (and any other generator) imports this module.

Node sizes come from real frontends: ``layout/node_sizes.json`` holds each node type's size as each tested
ComfyUI frontend creates it (``LiteGraph.createNode(type).size``), measured in headless Chromium by
``tests/host/test_browser_workflows.py``, which fails when the file and the frontend differ by more than a few
pixels and rewrites that frontend's entry with ``XSLIM_WRITE_NODE_SIZES=1``; the layout takes the larger size. A type missing from the file is an error here,
not a guess: a guessed size is how nodes came to overlap after a run.
"""

from __future__ import annotations

import json
import os
import textwrap
import uuid

HERE = os.path.dirname(os.path.abspath(__file__))
with open(os.path.join(HERE, "layout", "node_sizes.json")) as _f:
    SIZES_PER_FRONTEND = json.load(_f)  # {frontend version: {node type: [w, h]}}
# the layout must hold on every tested frontend: each type at the largest size any of them gives it, and only
# types measured on all of them (one measured on a single frontend could overlap on another)
MEASURED_SIZES = {t: [max(s[t][0] for s in SIZES_PER_FRONTEND.values()), max(s[t][1] for s in SIZES_PER_FRONTEND.values())]
                  for t in set.intersection(*(set(s) for s in SIZES_PER_FRONTEND.values()))}

# One namespace for the pack: the same title gives the same id on every machine, so a re-generated workflow
# stays "the same workflow" for the frontend (which keys open tabs and its zod schema check on a UUID).
ID_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "https://github.com/comfyui-xslim/workflows")

TITLE_H = 30  # LiteGraph.NODE_TITLE_HEIGHT: a node's title bar is drawn above its pos
GROUP_TITLE_H = 46  # a group's title bar (font 24) plus a little air before the first node title
PAD, GAP_X, GAP_Y, GROUP_GAP = 16, 40, 24, 40

# What the frontend shows at least: the frontend's own size is a minimum, these make room for what a node
# displays (images, text) so it does not grow over its neighbour after a run.
DISPLAY_SIZES = {
    "PreviewImage": (360, 300), "SaveImage": (360, 330), "PreviewAny": (420, 220), "XSlimCompare": (400, 380),
    "XSlimStudentCompare": (300, 330), "CLIPTextEncode": (400, 160), "SaveVideo": (360, 300),
}

# Where ComfyUI's own templates (comfyui_workflow_templates) get each file: the missing-models dialog offers
# these downloads into these folders. Keyed by the file name a loader widget holds.
MODEL_SOURCES = {
    "flux1-dev.safetensors": ("diffusion_models", "https://huggingface.co/Comfy-Org/flux1-dev/resolve/main/flux1-dev.safetensors"),
    "clip_l.safetensors": ("text_encoders", "https://huggingface.co/comfyanonymous/flux_text_encoders/resolve/main/clip_l.safetensors"),
    "t5xxl_fp16.safetensors": ("text_encoders", "https://huggingface.co/comfyanonymous/flux_text_encoders/resolve/main/t5xxl_fp16.safetensors"),
    "ae.safetensors": ("vae", "https://huggingface.co/Comfy-Org/Lumina_Image_2.0_Repackaged/resolve/main/split_files/vae/ae.safetensors"),
    "sd3.5_large_fp8_scaled.safetensors": (
        "checkpoints", "https://huggingface.co/Comfy-Org/stable-diffusion-3.5-fp8/resolve/main/sd3.5_large_fp8_scaled.safetensors"),
    "hunyuan_video_t2v_720p_bf16.safetensors": (
        "diffusion_models",
        "https://huggingface.co/Comfy-Org/HunyuanVideo_repackaged/resolve/main/split_files/diffusion_models/hunyuan_video_t2v_720p_bf16.safetensors"),
    "llava_llama3_fp8_scaled.safetensors": (
        "text_encoders",
        "https://huggingface.co/Comfy-Org/HunyuanVideo_repackaged/resolve/main/split_files/text_encoders/llava_llama3_fp8_scaled.safetensors"),
    "hunyuan_video_vae_bf16.safetensors": (
        "vae", "https://huggingface.co/Comfy-Org/HunyuanVideo_repackaged/resolve/main/split_files/vae/hunyuan_video_vae_bf16.safetensors"),
    # the full-precision SD3.5 Large diffusion model the training workflow distils (Stability AI's repository,
    # gated: the dialog's download needs a Hugging Face login that accepted the licence)
    "sd3.5_large.safetensors": (
        "diffusion_models", "https://huggingface.co/stabilityai/stable-diffusion-3.5-large/resolve/main/sd3.5_large.safetensors"),
}

# Light colours, so that a group's title is readable: the frontend (LGraphGroup.draw, frontend 1.27) writes the title
# in the group's own colour over its title bar, which is that colour laid twice at alpha 0.25 over the canvas
# (#222 in the default dark palette). Each of these gives at least 3:1 there (WCAG's ratio for large text; the
# title is 24 px); ComfyUI's own group colours (#3f789e, #a1309b, #444 ...) give 1.3-2.7.
GROUP_COLOURS = ["#8fc3ea", "#a9dba0", "#f0b184", "#e2a8e6", "#b3b8f2", "#f2d07a", "#9fd8d8"]
CANVAS, TITLE_ALPHA, MIN_TITLE_CONTRAST = "#222", 0.25, 3.0
WINDOW = (1440, 860)  # a 1600x1000 window beside the sidebar and below the menu: what fit-to-view must show


def fit_scale(width: float, height: float) -> float:
    """The zoom at which a graph of this size fits ``WINDOW`` (at most 1, at least 0.4)."""
    return round(max(0.4, min(1.0, WINDOW[0] / width, WINDOW[1] / height)), 3)


MIN_READABLE_ZOOM = 0.6  # about where the frontend starts drawing nodes without their text (its level of detail)


def _runs(n: int):
    """Every way to cut ``n`` things in order into consecutive runs, as lists of run lengths."""
    for cuts in range(1 << max(0, n - 1)):
        sizes, start = [], 0
        for k in range(1, n + 1):
            if k == n or cuts >> (k - 1) & 1:
                sizes.append(k - start)
                start = k
        yield sizes


def _bands_fit(columns: list[tuple[int, int]]) -> tuple[tuple[float, int], list[int]]:
    best: tuple[tuple[float, int], list[int]] | None = None
    for sizes in _runs(len(columns)):
        width, height, start = 0, -GROUP_GAP, 0
        for size in sizes:
            band = columns[start:start + size]
            width = max(width, sum(w for w, _ in band) + GROUP_GAP * (size - 1))
            height += max(h for _, h in band) + GROUP_GAP
            start += size
        key = (fit_scale(width, height), -len(sizes))
        if best is None or key > best[0]:
            best = (key, sizes)
    return best if best else ((1.0, 0), [])


def _bands(columns: list[tuple[int, int]]) -> list[int]:
    """How many consecutive columns go in each band (bands stacked top to bottom): the split whose bounding box fits
    ``WINDOW`` at the largest zoom; among equals the fewest bands. A wide graph so becomes taller."""
    return _bands_fit(columns)[1]


def _columns(boxes: list[tuple[int, int]], designed: list[int]) -> list[int]:
    """How many consecutive groups (in reading order) stack in each column. The designed columns (``designed``: their
    group counts) are kept where they fit ``WINDOW`` at a readable zoom; otherwise a column may break anywhere (a
    tall column goes on beside itself, two short ones share one), whichever split then fits at the largest zoom."""
    def fit(sizes):
        cols, start = [], 0
        for size in sizes:
            run = boxes[start:start + size]
            cols.append((max(w for w, _ in run), sum(h for _, h in run) + GROUP_GAP * (size - 1)))
            start += size
        return _bands_fit(cols)[0]

    kept = fit(designed)
    if kept[0] >= MIN_READABLE_ZOOM:
        return designed
    return max(_runs(len(boxes)), key=lambda sizes: (fit(sizes), sizes == designed, -len(sizes)))


def workflow_id(title: str) -> str:
    return str(uuid.uuid5(ID_NAMESPACE, title))


class UnmeasuredNodeType(KeyError):
    """A node type whose frontend size is not in layout/node_sizes.json."""


def node_size(type_: str, text: str | None = None) -> list[int]:
    if type_ not in MEASURED_SIZES:
        raise UnmeasuredNodeType(
            f"{type_} has no measured size on every frontend in workflows/layout/node_sizes.json. Measure it in each: "
            f"XSLIM_WRITE_NODE_SIZES=1 XSLIM_MEASURE_TYPES={type_} .venv-host/bin/python -m pytest -q "
            "tests/host/test_browser_workflows.py -k node_sizes")
    w, h = MEASURED_SIZES[type_]
    dw, dh = DISPLAY_SIZES.get(type_, (0, 0))
    w, h = max(w, dw), max(h, dh)
    if type_ in ("Note", "MarkdownNote") and text is not None:
        w = 400
        lines = sum(len(textwrap.wrap(p, 52)) or 1 for p in text.split("\n"))  # about 7 px a character
        h = 30 + 19 * lines
    return [int(w), int(h)]


def model_metadata(widgets: list) -> list[dict]:
    """The ``properties.models`` entries of a loader: one per widget value that names a known file."""
    return [{"name": v, "url": MODEL_SOURCES[v][1], "directory": MODEL_SOURCES[v][0]}
            for v in widgets if isinstance(v, str) and v in MODEL_SOURCES]


class Workflow:
    """A UI-format workflow. ``group(title, column)`` opens a titled group; nodes made after it belong to it.
    ``socket_table`` maps a node type to (input sockets [(name, type)], output types)."""

    def __init__(self, title: str, socket_table: dict, description: str = ""):
        self.title, self.description, self.sockets = title, description, socket_table
        self.nodes, self.links, self.groups, self._group = [], [], [], None

    def group(self, title: str, column: int) -> "Workflow":
        self.groups.append({"title": title, "column": column, "nodes": []})
        self._group = self.groups[-1]
        return self

    def node(self, type_: str, widgets: list, title: str | None = None, at_least: tuple | None = None) -> int:
        """A node; ``at_least`` (w, h) enlarges this one node beyond its type's size (e.g. a text preview that
        shows a wide table)."""
        inputs, outputs = self.sockets[type_]
        n = len(self.nodes) + 1
        properties = {"Node name for S&R": type_}
        models = model_metadata(widgets)
        if models:
            properties["models"] = models
        text = widgets[0] if type_ in ("Note", "MarkdownNote") and widgets else None
        size = node_size(type_, text)
        if title:  # the frontend widens a node to its title on load (LGraphNode.computeSize); 8 px a character
            size[0] = max(size[0], TITLE_H + 8 * len(title) + 10)  # of its 14 px title font is a little over
        if at_least:
            size = [max(size[0], int(at_least[0])), max(size[1], int(at_least[1]))]
        self.nodes.append({
            "id": n, "type": type_, "pos": [0, 0], "size": size, "flags": {}, "order": n - 1, "mode": 0,
            "inputs": [{"name": name, "type": t, "link": None} for name, t in inputs],
            "outputs": [{"name": t, "type": t, "links": [], "slot_index": i} for i, t in enumerate(outputs)],
            "properties": properties, "widgets_values": widgets, **({"title": title} if title else {}),
        })
        if self._group is None:  # a generator that names no groups gets one, laid out by data flow all the same
            self.group(self.title, 0)
        self._group["nodes"].append(n)
        return n

    def note(self, markdown: str) -> int:
        return self.node("MarkdownNote", [markdown], "About this workflow")

    def link(self, src: int, slot: int, dst: int, input_name: str) -> None:
        link_id = len(self.links) + 1
        source, target = self.nodes[src - 1], self.nodes[dst - 1]
        inp = next(i for i in target["inputs"] if i["name"] == input_name)
        inp["link"] = link_id
        source["outputs"][slot]["links"].append(link_id)
        self.links.append([link_id, src, slot, dst, target["inputs"].index(inp), source["outputs"][slot]["type"]])

    # -- layout ---------------------------------------------------------------------------------------------
    def _depths(self) -> dict[int, int]:
        """Longest path from a source node: a node sits right of everything that feeds it."""
        depth = {n["id"]: 0 for n in self.nodes}
        for _ in range(len(self.nodes)):
            changed = False
            for _, src, _, dst, _, _ in self.links:
                if depth[dst] < depth[src] + 1:
                    depth[dst], changed = depth[src] + 1, True
            if not changed:
                break
        return depth

    def layout(self) -> list[dict]:
        """Place nodes inside their groups (sub-columns by data-flow depth) and groups in their columns.
        Returns the groups' serialised form; nothing overlaps by construction."""
        depth, by_id = self._depths(), {n["id"]: n for n in self.nodes}
        boxes = []  # per group: (column, width, height, placements [(node, dx, dy)])
        for g in self.groups:
            ranks = sorted({depth[i] for i in g["nodes"]})
            cols = [[i for i in g["nodes"] if depth[i] == r] for r in ranks]
            x, placed, height = PAD, [], 0
            for col in cols:
                y, width = GROUP_TITLE_H, 0
                for i in col:
                    w, h = by_id[i]["size"]
                    placed.append((i, x, y + TITLE_H))
                    y += TITLE_H + h + GAP_Y
                    width = max(width, w)
                x += width + GAP_X
                height = max(height, y)
            boxes.append((g, x - GAP_X + PAD, height - GAP_Y + PAD, placed))
        designed = [[b for b in boxes if b[0]["column"] == c] for c in sorted({g["column"] for g in self.groups})]
        order = [b for col in designed for b in col]  # reading order: the designed columns, left to right
        columns, start = [], 0
        for count in _columns([(b[1], b[2]) for b in order], [len(col) for col in designed]):
            columns.append(order[start:start + count])
            start += count
        sizes = [(max(b[1] for b in col), sum(b[2] for b in col) + GROUP_GAP * (len(col) - 1)) for col in columns]
        serialised, band_y, start = [], 0, 0
        for count in _bands(sizes):  # columns left to right along the data flow, in bands top to bottom
            col_x = 0
            for col, (width, _) in zip(columns[start:start + count], sizes[start:start + count]):
                y = band_y
                for g, w, h, placed in col:
                    for i, dx, dy in placed:
                        by_id[i]["pos"] = [col_x + dx, y + dy]
                    colour = GROUP_COLOURS[self.groups.index(g) % len(GROUP_COLOURS)]
                    serialised.append({"id": len(serialised) + 1, "title": g["title"], "bounding": [col_x, y, w, h],
                                       "color": colour, "font_size": 24, "flags": {}})
                    y += h + GROUP_GAP
                col_x += width + GROUP_GAP
            band_y += max(h for _, h in sizes[start:start + count]) + GROUP_GAP
            start += count
        return serialised

    def to_json(self) -> dict:
        groups = self.layout()
        right = max(g["bounding"][0] + g["bounding"][2] for g in groups)
        bottom = max(g["bounding"][1] + g["bounding"][3] for g in groups)
        scale = fit_scale(right, bottom)  # the whole graph in a 1600x1000 window, beside the sidebar
        return {
            "id": workflow_id(self.title), "revision": 0, "last_node_id": len(self.nodes), "last_link_id": len(self.links),
            "nodes": self.nodes, "links": self.links, "groups": groups, "config": {},
            "extra": {"ds": {"scale": scale, "offset": [30 / scale, 30 / scale]},
                      "info": {"title": self.title, "description": self.description}},
            "version": 0.4,
        }


def write_thumbnail(path: str, title: str, lines: list[str], picture: str | None = None,
                    rows: list[tuple[str, tuple]] | None = None) -> None:
    """The Templates browser's card image (<workflow>.jpg next to it): a real output when there is one, else a
    placeholder that says what the workflow needs, so nobody mistakes it for a result. ``rows``: (label, box)
    strips of ``picture`` to show one under the other (e.g. the teacher's row and the student's row of a grid)."""
    from PIL import Image, ImageDraw, ImageFont

    size = (512, 384)
    card = Image.new("RGB", size, (32, 36, 44))
    draw = ImageDraw.Draw(card)
    try:
        big, small = ImageFont.load_default(size=30), ImageFont.load_default(size=18)
    except TypeError:  # Pillow < 10.1 has one bitmap size only
        big = small = ImageFont.load_default()
    if picture:
        shot = Image.open(picture).convert("RGB")
        if rows:
            label_w = 8 + max(int(draw.textlength(label, font=small)) for label, _ in rows)
            strips = [shot.crop(box) for _, box in rows]
            stacked = Image.new("RGB", (label_w + max(s.width for s in strips), sum(s.height + 6 for s in strips)), (32, 36, 44))
            y = 0
            for (label, _), strip in zip(rows, strips):
                stacked.paste(strip, (label_w, y))
                ImageDraw.Draw(stacked).text((0, y + strip.height // 2), label, fill="white", font=small, anchor="lm")
                y += strip.height + 6
            shot = stacked
        head = textwrap.wrap(title, 50) + [lines[0] if lines else ""]  # about 9 px a character at this size
        for k, line in enumerate(head):
            draw.text((12, 10 + 22 * k), line, fill="white" if k < len(head) - 1 else (190, 200, 215), font=small)
        top = 14 + 22 * len(head)
        area = (size[0] - 16, size[1] - top - 8)
        if shot.height / shot.width > 1.5 * area[1] / area[0]:  # a tall grid: its top rows, legible, not all of it shrunk
            shot = shot.crop((0, 0, shot.width, int(shot.width * area[1] / area[0])))
        shot.thumbnail(area)
        card.paste(shot, ((size[0] - shot.width) // 2, top + (area[1] - shot.height) // 2))
    else:
        draw.rectangle([8, 8, size[0] - 9, size[1] - 9], outline=(90, 100, 120), width=2)
        y = 30
        for line in textwrap.wrap(title, 28):
            draw.text((26, y), line, fill="white", font=big)
            y += 38
        y += 14
        for line in lines:
            for part in textwrap.wrap(line, 44):
                draw.text((26, y), part, fill=(190, 200, 215), font=small)
                y += 24
        draw.text((26, size[1] - 44), "placeholder - no sample output shipped", fill=(140, 150, 165), font=small)
    card.save(path, quality=88)
