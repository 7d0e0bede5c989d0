"""The evaluation's target checks and table (pure functions; the full evaluation runs as a command)."""

from xslim_lab.distill_evaluate import check_targets, format_table


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


def test_shipped_students_load_against_the_shipped_teacher_and_draw_their_classes():
    import os

    import pytest
    import torch

    from distill_core.student import file_hash, load_student
    from xslim_lab.demo_model.classifier import load_classifier
    from xslim_lab.demo_model.grid import class_noise
    from xslim_lab.demo_model.latents import latent_to_image
    from xslim_lab.demo_model.teacher import default_weights_path

    weights = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "distill_core", "weights")
    classifier, _ = load_classifier()
    noise, labels = class_noise(3, seed=5)
    for name, nfe in (("student_1x_175.safetensors", 1.75), ("student_1x_167.safetensors", 1 + 8 / 12)):
        student = load_student(os.path.join(weights, name), base_hash=file_hash(default_weights_path()))
        assert student.effective_nfe == pytest.approx(nfe) and student.sigmas == pytest.approx([1.0, 0.75, 0.0], abs=1e-3)
        with torch.no_grad():
            predicted = classifier.logits(latent_to_image(student.sample(noise, labels))).argmax(1)
        assert (predicted == labels).float().mean() >= 0.6  # random weights give ~0.1
