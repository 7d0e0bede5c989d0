"""The demo distillation's evaluation: target checks, seed sets, standard errors, precision/recall, bad options.

Real components throughout (the shipped students, the shipped teacher, the shipped classifier); image counts are
small so the file runs in well under a minute on 2 CPU cores.
"""

import math
import os

import pytest
import torch

from xslim_lab.distill_evaluate import (
    check_options, check_targets, check_targets_over_sets, evaluate, format_sets_table, format_table, main,
    seed_sets, summarise, verdict,
)
from xslim_lab.metrics import DistributionMetrics, mean_and_standard_error, precision_recall, standard_error

WEIGHTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "distill_core", "weights")
SHIPPED_ROWS = [
    ("1.x 1.75", "cotrain_c175", "student_1x_175.safetensors", None),
    ("1.x 1.67", "cotrain_c167", "student_1x_167.safetensors", None),
]


def _row(key, name, nfe, fd, acc, div):
    return {"key": key, "name": name, "nfe": nfe, "fd": fd, "accuracy": acc, "diversity": div, "precision": 0.8, "recall": 0.7}


def test_targets_are_judged_from_the_measured_numbers():
    rows = [
        _row("teacher50cfg", "teacher 50 steps, CFG 2", 100, 30.0, 0.85, 0.40),
        _row("teacher2cfg", "teacher 2 steps, CFG 2", 4, 60.0, 0.77, 0.37),
        _row("dmd_plain", "plain DMD", 2, 50.0, 0.84, 0.35),
        _row("stage1_n2", "Stage I", 2, 48.0, 0.84, 0.38),
        _row("cotrain_c175", "1.x 1.75", 1.75, 44.0, 0.83, 0.37),  # passes all
        _row("cotrain_c167", "1.x 1.67", 1.67, 42.0, 0.81, 0.35),  # accuracy and diversity fail
    ]
    lines = check_targets(rows)
    fast = [line for line in lines if "1.x 1.67" in line]
    assert all(line.endswith("**PASS**") for line in lines if "1.x 1.75" in line)
    assert sum(line.endswith("**FAIL**") for line in fast) == 2 and any("accuracy" in ln and "FAIL" in ln for ln in fast)
    assert any("guidance control" in line and line.endswith("**PASS**") for line in lines)
    table = format_table(rows)
    assert table.count("\n") == len(rows) + 1 and "| 1.x 1.75 | 1.75 | 44.00 | 0.830 | 0.3700 |" in table
    rows[4]["recall"] = 0.34  # under half the teacher's 0.7: the mode-coverage target fails, and only it
    failed = [line for line in check_targets(rows) if "1.x 1.75" in line and line.endswith("**FAIL**")]
    assert len(failed) == 1 and "recall >= half" in failed[0]


def test_three_seed_sets_are_disjoint_balanced_and_set_zero_is_the_single_set_of_before():
    from xslim_demo.grid import class_noise

    sets = seed_sets(50, 2026, 3)
    assert [s for s, _, _ in sets] == [2026, 2027, 2028]
    flat = [noise.flatten(1) for _, noise, _ in sets]
    for i in range(3):
        assert torch.bincount(sets[i][2], minlength=10).tolist() == [5] * 10
        for j in range(i + 1, 3):  # no noise vector appears in two sets
            assert torch.cdist(flat[i], flat[j]).min() > 1.0
    noise0, labels0 = class_noise(5, seed=2026)
    assert torch.equal(sets[0][1], noise0) and torch.equal(sets[0][2], labels0)
    assert torch.equal(seed_sets(50, 2026, 3)[2][1], sets[2][1])  # reproducible from the base seed


def test_standard_error_comes_from_the_per_set_values_and_verdicts_say_every_set_or_average_only():
    per_set = [{"accuracy": 0.90, "fd": 30.0}, {"accuracy": 0.94, "fd": 34.0}, {"accuracy": 0.95, "fd": 26.0}]
    s = summarise(per_set)
    values = torch.tensor([0.90, 0.94, 0.95], dtype=torch.float64)
    assert s["accuracy"]["sets"] == [0.90, 0.94, 0.95]
    assert s["accuracy"]["mean"] == pytest.approx(values.mean().item())
    assert s["accuracy"]["se"] == pytest.approx(math.sqrt(((values - values.mean()) ** 2).sum().item() / 2) / math.sqrt(3))
    assert s["fd"]["se"] == pytest.approx(4.0 / math.sqrt(3))  # std 4 over 3 sets
    assert mean_and_standard_error([1.0, 1.0, 1.0]) == (1.0, 0.0)
    with pytest.raises(ValueError, match="at least 2"):
        standard_error([1.0])

    def rows(teacher_acc, student_acc):
        def metrics(values):
            return {"mean": sum(values) / len(values), "se": standard_error(values), "sets": values}
        t = {"name": "teacher", "key": "teacher50cfg", "nfe": 100, "metrics": {
            "accuracy": metrics(teacher_acc), "fd": metrics([25.0] * 3), "diversity": metrics([0.56] * 3),
            "recall": metrics([0.66] * 3)}}
        s = {"name": "1.x 1.75", "key": "cotrain_c175", "nfe": 1.75, "metrics": {
            "accuracy": metrics(student_acc), "fd": metrics([33.0] * 3), "diversity": metrics([0.55] * 3),
            "recall": metrics([0.30, 0.34, 0.36])}}
        return [t, s]

    # gaps -3.8, -2.6, -2.8 points: the mean (-3.07) misses, two sets pass
    checks = check_targets_over_sets(rows([0.956] * 3, [0.918, 0.930, 0.928]))
    acc = next(c for c in checks if c["target"].startswith("accuracy"))
    assert acc["sets"] == pytest.approx([-3.8, -2.6, -2.8]) and acc["sets_ok"] == [False, True, True]
    assert not acc["mean_ok"] and acc["verdict"] == "fails on average (holds on 2 of 3 sets)"
    assert acc["se"] == pytest.approx(standard_error([-3.8, -2.6, -2.8]))
    checks = check_targets_over_sets(rows([0.956] * 3, [0.925, 0.936, 0.938]))  # -3.1, -2.0, -1.8: mean passes
    acc = next(c for c in checks if c["target"].startswith("accuracy"))
    assert acc["verdict"] == "holds on average only (2 of 3 sets)"
    fd = next(c for c in checks if c["target"].startswith("FD <="))
    assert fd["verdict"] == "holds on every set" and fd["mean"] == pytest.approx(33 / 25)
    assert verdict([False, False], False) == "fails on every set"
    recall = next(c for c in checks if c["target"].startswith("recall"))  # 0.45, 0.52, 0.55 of the teacher's
    assert recall["sets_ok"] == [False, True, True] and recall["verdict"] == "holds on average only (2 of 3 sets)"


def test_precision_and_recall_are_fractions_and_a_set_against_itself_scores_one():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(200, 16, generator=g)
    assert precision_recall(a, a.clone()) == {"precision": 1.0, "recall": 1.0}
    half = precision_recall(a, a[:100] * 0.2)  # a collapsed copy of half the data: precise, low coverage
    assert 0.0 <= half["recall"] < 0.6 and half["precision"] > 0.9
    far = precision_recall(a, torch.randn(200, 16, generator=g) + 100.0)
    assert far == {"precision": 0.0, "recall": 0.0}
    with pytest.raises(ValueError, match="N > k"):
        precision_recall(a, a[:3])


def test_evaluation_on_the_shipped_students_reports_each_set_and_the_standard_error(tmp_path):
    """Two sets of 20 images: the shipped students and the 2-step CFG teacher as the recall reference."""
    result = evaluate(images=20, seed=2026, n_sets=2, runs=None, cache_dir=str(tmp_path), teacher_settings=((2, "cfg"),),
                      student_rows=SHIPPED_ROWS, reference_key="teacher2cfg")
    assert result["seeds"] == [2026, 2027]
    by = {r["key"]: r for r in result["rows"]}
    assert list(by) == ["teacher2cfg", "cotrain_c175", "cotrain_c167"]
    assert by["cotrain_c175"]["nfe"] == pytest.approx(1.75) and by["cotrain_c167"]["nfe"] == pytest.approx(1 + 8 / 12)
    for row in result["rows"]:
        for m in row["metrics"].values():
            assert len(m["sets"]) == 2
            assert m["mean"] == pytest.approx(sum(m["sets"]) / 2)
            assert m["se"] == pytest.approx(abs(m["sets"][0] - m["sets"][1]) / 2)  # n = 2: |a - b| / 2
        for key in ("recall", "precision", "recall_t", "precision_t"):
            assert all(0.0 <= v <= 1.0 for v in row["metrics"][key]["sets"])
    teacher = by["teacher2cfg"]["metrics"]
    assert teacher["recall_t"]["sets"] == [1.0, 1.0] and teacher["precision_t"]["sets"] == [1.0, 1.0]
    assert all(by[k]["metrics"]["accuracy"]["mean"] >= 0.6 for k in ("cotrain_c175", "cotrain_c167"))  # random ~0.1
    # the second set's numbers are that set's own: recompute the 1.75 student's accuracy on seed 2027 directly
    from distill_core.student import file_hash, load_student
    from xslim_demo.classifier import load_classifier
    from xslim_demo.latents import latent_to_image
    from xslim_demo.teacher import default_weights_path

    _, noise, labels = seed_sets(20, 2026, 2)[1]
    student = load_student(os.path.join(WEIGHTS, "student_1x_175.safetensors"), base_hash=file_hash(default_weights_path()))
    classifier, reference = load_classifier()
    direct = DistributionMetrics(classifier, reference)(latent_to_image(student.sample(noise, labels)), labels)
    assert by["cotrain_c175"]["metrics"]["accuracy"]["sets"][1] == pytest.approx(direct["accuracy"])
    assert by["cotrain_c175"]["metrics"]["recall"]["sets"][1] == pytest.approx(direct["recall"])
    assert len(list(tmp_path.glob("teacher_rows_20_*.safetensors"))) == 2  # teacher rows cached per set
    table = format_sets_table(result["rows"])
    assert "recall ↑" in table and " ± " in table and table.count("\n") == 1 + len(result["rows"])


@pytest.mark.parametrize("argv, message", [
    (["--seed-sets", "1"], "--seed-sets must be an integer from 2 to 20"),
    (["--seed-sets", "0"], "a standard error needs at least two"),
    (["--seed-sets", "-3"], "got -3"),
    (["--seed-sets", "21"], "from 2 to 20"),
    (["--seed-sets", "three"], "invalid int value"),
    (["--images", "55"], "multiple of 10"),
    (["--images", "10"], "at least 20"),
    (["--seed", "5"], "would use seed 7, the selection set"),
])
def test_bad_options_are_refused_with_a_clear_message(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv + ["--out", "/nonexistent/never-written"])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    with pytest.raises(ValueError, match="seed-sets"):
        check_options(500, 1, 2026)


def test_shipped_students_load_against_the_shipped_teacher_and_draw_their_classes():
    from distill_core.student import file_hash, load_student
    from xslim_demo.classifier import load_classifier
    from xslim_demo.grid import class_noise
    from xslim_demo.latents import latent_to_image
    from xslim_demo.teacher import default_weights_path

    classifier, _ = load_classifier()
    noise, labels = class_noise(3, seed=5)
    for name, nfe in (("student_1x_175.safetensors", 1.75), ("student_1x_167.safetensors", 1 + 8 / 12)):
        student = load_student(os.path.join(WEIGHTS, name), base_hash=file_hash(default_weights_path()))
        assert student.effective_nfe == pytest.approx(nfe) and student.sigmas == pytest.approx([1.0, 0.75, 0.0], abs=1e-3)
        with torch.no_grad():
            predicted = classifier.logits(latent_to_image(student.sample(noise, labels))).argmax(1)
        assert (predicted == labels).float().mean() >= 0.6  # random weights give ~0.1
