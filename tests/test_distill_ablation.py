"""The ablation script's pairing and verdict rule on synthetic per-set numbers, and its --help (no training)."""

import os
import re

import pytest

from xslim_lab.distill_ablation import PAIRS, ROWS, ablation_runs, compare, main, pair_results
from xslim_lab.distill_evaluate import summarise

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _metrics(fd, accuracy, diversity, recall):
    """evaluate()'s summarised metrics from per-set values (three seed sets)."""
    return summarise([{"fd": f, "accuracy": a, "diversity": d, "recall": r}
                      for f, a, d, r in zip(fd, accuracy, diversity, recall)])


def test_a_paired_difference_beyond_two_standard_errors_is_an_effect():
    # FD lower by 3, 4, 5 on the three sets: mean -4, s.e. of the differences 0.577 -> 6.9 s.e., an improvement.
    # Diversity differs +0.01, -0.01, +0.003: mean 0.001, s.e. 0.0058 -> no effect shown.
    # Accuracy identical on every set: difference 0 with s.e. 0 -> no effect shown (not a division by zero).
    # Recall +0.02, +0.03, +0.01 (mean 0.02, s.e. 0.00577, 3.46 s.e.) -> an effect, better.
    with_it = _metrics([40, 41, 45], [0.8, 0.81, 0.82], [0.40, 0.39, 0.403], [0.52, 0.53, 0.51])
    without_it = _metrics([43, 45, 50], [0.8, 0.81, 0.82], [0.39, 0.40, 0.400], [0.50, 0.50, 0.50])
    out = compare(with_it, without_it)
    assert out["fd"]["diff"] == pytest.approx(-4.0)
    assert out["fd"]["se"] == pytest.approx(1 / 3 ** 0.5)
    assert (out["fd"]["verdict"], out["fd"]["direction"]) == ("effect", "better")
    assert out["diversity"]["verdict"] == "no effect shown" and out["diversity"]["direction"] is None
    assert out["accuracy"] == {"diff": 0.0, "se": 0.0, "ratio": 0.0, "effect": False, "verdict": "no effect shown",
                               "direction": None}
    assert (out["recall"]["verdict"], out["recall"]["direction"]) == ("effect", "better")
    # the same means with noisier sets (unpaired spread the same, per-set differences scattered): no effect
    noisy = _metrics([40, 48, 38], [0.8, 0.81, 0.82], [0.40, 0.39, 0.403], [0.52, 0.53, 0.51])
    assert compare(noisy, without_it)["fd"]["verdict"] == "no effect shown"
    # a worse FD beyond 2 s.e. is an effect in the worse direction
    assert compare(without_it, with_it)["fd"]["direction"] == "worse"


def test_pairs_name_rows_of_the_table_and_a_missing_row_is_reported_not_compared():
    keys = {key for specs in ROWS.values() for key, *_ in specs}
    assert all(on in keys and off in keys for _, on, off in PAIRS)
    m = _metrics([40, 41, 45], [0.8, 0.81, 0.82], [0.40, 0.39, 0.403], [0.52, 0.53, 0.51])
    rows = {"w7_guided": {"metrics": m}, "w7_plain": {"metrics": m}}
    out = pair_results(rows)
    assert out[0]["metrics"]["fd"]["verdict"] == "no effect shown"  # a row against itself
    assert out[1]["missing"] == ["cotrain_c175", "reuse_c175"] and "metrics" not in out[1]


def test_strong_cfg_runs_differ_from_the_demo_stage1_only_in_guidance(tmp_path):
    runs = {os.path.basename(c.run_dir): c for c in ablation_runs(str(tmp_path))}
    guided, plain, demo = runs["stage1_n2_w7_a094"], runs["stage1_n2_w7_plain"], runs["stage1_n2"]
    assert (guided.stage1.guidance_scale, guided.stage1.guidance_switch) == (7.0, 0.94)
    assert (plain.stage1.guidance_scale, plain.stage1.guidance_switch) == (7.0, 1.0)
    for cfg in (guided, plain):
        assert cfg.iterations == demo.iterations and cfg.seed == demo.seed and cfg.batch_size == demo.batch_size
        assert cfg.stage1.lr_student == demo.stage1.lr_student and cfg.stage1.steps == demo.stage1.steps == 2
    assert all(c.threads == 1 for c in runs.values())
    assert list(runs)[-1] == "stage2_c175" and runs["stage2_c175"].reference.endswith("stage1_n4/student.safetensors")


def test_help_names_only_paths_that_exist(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    paths = set(re.findall(r"\b(?:docs|xslim_lab|distill_core)/[\w./]*\w", text))
    assert {"docs/distill/ablation.md", "xslim_lab/distill_evaluate.py"} <= paths
    for path in paths:
        if path.endswith((".md", ".json")):  # the outputs: their folder must exist
            path = os.path.dirname(path)
        assert os.path.exists(os.path.join(REPO, path)), path


def test_a_rerun_keeps_the_hand_written_notes(tmp_path):
    from xslim_lab.distill_ablation import NOTES_HEADING, write_outputs

    m = _metrics([40, 41, 45], [0.8, 0.81, 0.82], [0.40, 0.39, 0.403], [0.52, 0.53, 0.51])
    rows = [{"key": "w7_guided", "name": "guided", "nfe": 2.0, "metrics": m}]
    (tmp_path / "ablation.md").write_text(f"old table\n\n{NOTES_HEADING}\n\nwhy: measured.\n")
    md = write_outputs(rows, [2026, 2027, 2028], pair_results({"w7_guided": rows[0]}), {"a": 60.0}, str(tmp_path), 50)
    assert "old table" not in md and md.endswith(f"{NOTES_HEADING}\n\nwhy: measured.\n")
    assert "| guided | 2.00 | 42.00 ± 1.53 |" in md and "- a: 1.0 min" in md
