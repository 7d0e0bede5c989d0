"""The shipped workflow files are what their generators write, and each has its Templates-browser card.

A hand edit of a JSON file, or a generator change without regenerating, fails here (the files are regenerated
with ``python workflows/build_workflows.py`` and ``python workflows/build_train_workflows.py``). The frontend asks
for ``<name>.jpg`` next to every template; a missing one is a broken card in the Templates browser."""

from __future__ import annotations

import json
import os

import pytest

WORKFLOWS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "workflows")
SHIPPED = sorted(n for n in os.listdir(WORKFLOWS) if n.endswith(".json"))


def generators() -> dict:
    import build_train_workflows
    import build_workflows

    return {**build_workflows.WORKFLOWS, **build_train_workflows.WORKFLOWS}


def test_every_shipped_workflow_has_a_generator_and_a_card():
    built = generators()
    assert sorted(built) == SHIPPED, "a workflow file without a generator, or a generator whose file is missing"
    missing = [n for n in SHIPPED if not os.path.isfile(os.path.join(WORKFLOWS, n[:-5] + ".jpg"))]
    assert not missing, f"no thumbnail for {missing}"


@pytest.mark.parametrize("name", SHIPPED)
def test_the_file_is_what_its_generator_writes(name):
    build = generators()[name]
    with open(os.path.join(WORKFLOWS, name)) as f:
        shipped = json.load(f)
    assert json.loads(json.dumps(build().to_json())) == shipped, f"{name} differs from its generator: regenerate it"


def test_an_unmeasured_node_type_is_refused_not_guessed():
    from workflow_graph import MEASURED_SIZES, UnmeasuredNodeType, node_size
    assert node_size("KSampler") == list(MEASURED_SIZES["KSampler"])
    with pytest.raises(UnmeasuredNodeType, match="NoSuchNode has no measured size .* XSLIM_WRITE_NODE_SIZES=1"):
        node_size("NoSuchNode")


def _rgb(colour: str) -> list[float]:
    hex_ = colour.lstrip("#")
    hex_ = "".join(c * 2 for c in hex_) if len(hex_) == 3 else hex_
    return [int(hex_[i:i + 2], 16) / 255 for i in (0, 2, 4)]


def _luminance(rgb: list[float]) -> float:
    lin = [v / 12.92 if v <= 0.03928 else ((v + 0.055) / 1.055) ** 2.4 for v in rgb]
    return 0.2126 * lin[0] + 0.7152 * lin[1] + 0.0722 * lin[2]


def title_contrast(colour: str, canvas: str, alpha: float) -> float:
    """WCAG contrast of a group's title as the frontend draws it: text in the group's colour over its title bar,
    the colour laid twice at ``alpha`` over the canvas (LGraphGroup.draw)."""
    text, under = _rgb(colour), _rgb(canvas)
    covered = 1 - (1 - alpha) ** 2
    bar = [u * (1 - covered) + t * covered for t, u in zip(text, under)]
    high, low = sorted((_luminance(text), _luminance(bar)), reverse=True)
    return (high + 0.05) / (low + 0.05)


@pytest.mark.parametrize("name", SHIPPED)
def test_group_titles_are_readable_on_the_default_canvas(name):
    from workflow_graph import CANVAS, MIN_TITLE_CONTRAST, TITLE_ALPHA

    assert title_contrast("#444", CANVAS, TITLE_ALPHA) < 1.5  # the check tells an unreadable title (ComfyUI's black)
    with open(os.path.join(WORKFLOWS, name)) as f:
        groups = json.load(f)["groups"]
    low = {g["title"]: round(title_contrast(g["color"], CANVAS, TITLE_ALPHA), 2) for g in groups
           if title_contrast(g["color"], CANVAS, TITLE_ALPHA) < MIN_TITLE_CONTRAST}
    assert not low, f"group titles below {MIN_TITLE_CONTRAST}:1 contrast: {low}"


def test_a_wide_graph_is_laid_out_in_bands_to_fit_the_window():
    from workflow_graph import GROUP_GAP, _bands, fit_scale

    columns = [(612, 917), (742, 292), (999, 438), (1012, 392), (662, 666)]  # HunyuanVideo's student workflow
    sizes = _bands(columns)
    assert sum(sizes) == len(columns) and len(sizes) > 1
    one_row = fit_scale(sum(w for w, _ in columns) + GROUP_GAP * 4, max(h for _, h in columns))
    start, width, height = 0, 0, -GROUP_GAP
    for size in sizes:
        band = columns[start:start + size]
        width, height = max(width, sum(w for w, _ in band) + GROUP_GAP * (size - 1)), height + max(h for _, h in band) + GROUP_GAP
        start += size
    assert fit_scale(width, height) > one_row
    assert _bands([(400, 300), (400, 300)]) == [2]  # what fits at full size stays one row


def test_every_shipped_workflow_fits_the_window_at_a_zoom_that_still_draws_text():
    """Fit-to-view of a 1600x1000 window: below about 0.57 (frontend 1.58 at device pixel ratio 1: an 8 px minimum
    font size for 14 px text) the frontend draws nodes without their text; the layout keeps every workflow above."""
    import glob
    import json

    from workflow_graph import fit_scale

    zooms = {}
    for path in sorted(glob.glob(os.path.join(WORKFLOWS, "*.json"))):
        groups = json.load(open(path))["groups"]
        width = max(x + w for x, _, w, _ in (g["bounding"] for g in groups)) - min(g["bounding"][0] for g in groups)
        height = max(y + h for _, y, _, h in (g["bounding"] for g in groups)) - min(g["bounding"][1] for g in groups)
        zooms[os.path.basename(path)] = fit_scale(width, height)
    assert len(zooms) >= 13 and min(zooms.values()) >= 0.58, zooms
