"""What a person reads off the pack's pictures and tables: the decision map keeps its title, legend and row labels
at any step count, and X-Slim Compare says when its times cannot be trusted. No model runs here: the map is drawn
from letters and the compare table from synthetic times."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch


def pictures():
    from comfyui_xslim.nodes import pictures

    return pictures


def map_for(steps: int, samples: int = 1):
    p = pictures()
    letters = ("F" + "." * (steps - 2) + "F")[:steps] if steps > 1 else "F"
    patterns = {(branch, "uuid-" + branch, i): letters for i in range(samples) for branch in ("cond", "uncond")}
    title = f"1.x student: {steps} steps, blocks 4..6 cached - effective NFE 1.75"
    img = (p.decision_map(patterns, title)[0].numpy() * 255).round().astype(np.uint8)
    return img, patterns, title


@pytest.mark.parametrize("steps", [2, 50])
def test_the_decision_map_is_wide_enough_for_its_title_and_legend_and_labels_every_row(pack, steps):
    p = pictures()
    img, patterns, title = map_for(steps)
    font = p._font(15)
    height, width, _ = img.shape
    # measured as the code draws them: the legend on one line, the title at x = 8
    assert width >= p.legend_width(font), (width, p.legend_width(font))
    assert width >= 8 + font.getlength(title)
    assert (img[:, -6:] == 255).all(), "something is drawn into the right edge: clipped"
    legend_top = height - 40
    assert (img[legend_top:, : p.legend_width(font) - 20] < 128).any(axis=2).sum() > 200  # the legend's text is there
    labels = p.row_labels(list(patterns))
    assert sorted(labels.values()) == ["cond, sample 1", "uncond, sample 1"]
    cell = max(6, min(26, (900 - 12 - max(int(font.getlength(v)) for v in labels.values()) - 16) // steps))
    for r in range(len(patterns)):  # dark label pixels in the label column of every row
        row = img[50 + r * cell: 50 + (r + 1) * cell, 8: 8 + int(font.getlength(labels[list(patterns)[r]]))]
        assert (row < 100).any(axis=2).sum() > 20, f"row {r + 1} has no label"


def test_a_short_map_is_not_wider_than_it_needs(pack):
    short, _, _ = map_for(2)
    long_, _, _ = map_for(50)
    assert short.shape[1] < long_.shape[1]  # the grid sets a 50-step map's width; the legend a 2-step one's


# -- X-Slim Compare's timing notes --------------------------------------------------------------------------
def compare(times: list[list[float]], nfe: float = 10.0, steps: int = 50):
    from comfyui_xslim.nodes.xslim_nodes import compare_outputs

    images = torch.rand(2, 8, 8, 3, generator=torch.Generator().manual_seed(0))
    report = SimpleNamespace(stats=SimpleNamespace(effective_nfe=nfe))
    results = [("uncached", None, None)] + [(f"setting {k}", None, report) for k in range(1, len(times))]
    grid, text = compare_outputs(results, times, [images] * len(times), steps)
    assert grid.ndim == 4 and grid.shape[-1] == 3
    return text


def table_rows(text: str) -> list[list[str]]:
    import re

    lines = text.split("\n\n")[0].splitlines()
    assert set(lines[1]) <= {"-", " "}  # the rule under the header
    return [re.split(r"\s{2,}", line.strip()) for line in lines[2:]]


def test_quiet_repeats_give_median_and_spread_and_no_warning(pack):
    text = compare([[2.0, 2.02, 1.98], [0.5, 0.51, 0.5]])
    rows = table_rows(text)
    assert rows[0] == ["uncached", "50.0", "reference", "2.00", "2%", "1.00x", "reference", "1.000"]
    assert rows[1][:6] == ["setting 1", "10.0", "5.00x", "0.50", "2%", "4.00x"]
    assert "median of 3 runs per setting" in text and "|" not in text
    assert not any(w in text for w in ("noisy", "busy", "Slower despite"))


def test_a_spread_over_the_busy_line_says_the_machine_was_busy(pack):
    text = compare([[2.0, 2.0, 2.0], [0.5, 0.65, 0.5]])  # 30 % spread
    assert table_rows(text)[1][4] == "30%"
    assert "The machine was busy (spread over 15% for setting 1)" in text and "exact counts" in text


def test_one_run_and_a_slowdown_despite_fewer_blocks_both_get_a_note(pack):
    text = compare([[1.0], [1.25]])  # one timed round; the cached setting came out slower
    rows = table_rows(text)
    assert rows[1][4] == "one run" and rows[1][5] == "0.80x"
    assert "Times are noisy: one run each, so a busy machine cannot be told apart" in text
    assert "Slower despite fewer blocks (setting 1): the machine was busy or overhead dominates" in text
