"""The evaluation's target checks and table (pure functions; the full evaluation runs as a command)."""

from distill_core.evaluate import check_targets, format_table


def _row(key, name, nfe, fd, acc, div):
    return {"key": key, "name": name, "nfe": nfe, "fd": fd, "accuracy": acc, "diversity": div, "precision": 0.8, "recall": 0.7}


def test_targets_are_judged_from_the_measured_numbers():
    rows = [
        _row("teacher50cfg", "teacher 50 steps, CFG 2", 100, 30.0, 0.85, 0.40),
        _row("teacher2cfg", "teacher 2 steps, CFG 2", 4, 60.0, 0.77, 0.37),
        _row("dmd_plain", "plain DMD", 2, 50.0, 0.84, 0.35),
        _row("stage1_n2", "Stage I", 2, 48.0, 0.84, 0.38),
        _row("stage2_c175", "1.x 1.75", 1.75, 44.0, 0.83, 0.37),  # passes all
        _row("stage2_c167", "1.x 1.67", 1.67, 42.0, 0.81, 0.35),  # accuracy and diversity fail
    ]
    lines = check_targets(rows)
    fast = [l for l in lines if "1.x 1.67" in l]
    assert all(l.endswith("**PASS**") for l in lines if "1.x 1.75" in l)
    assert sum(l.endswith("**FAIL**") for l in fast) == 2 and any("accuracy" in l and "FAIL" in l for l in fast)
    assert any("guidance control" in l and l.endswith("**PASS**") for l in lines)
    table = format_table(rows)
    assert table.count("\n") == len(rows) + 1 and "| 1.x 1.75 | 1.75 | 44.00 | 0.830 | 0.3700 |" in table
