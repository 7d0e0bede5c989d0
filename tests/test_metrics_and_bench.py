"""Metrics on real data and the benchmark end to end (small sizes)."""

from __future__ import annotations

import os

import pytest
import torch

from xslim_lab.demo_model import data
from xslim_lab.demo_model.classifier import default_classifier_path, load_classifier
from xslim_lab.demo_model.teacher import default_weights_path
from xslim_lab.metrics import DistributionMetrics, paired_fidelity, within_class_diversity

HAVE_DATA = os.path.exists(os.path.join(data.DATA_DIR, "t10k-images-idx3-ubyte.gz"))
needs_data = pytest.mark.skipif(not HAVE_DATA, reason=f"Fashion-MNIST not installed ({data.INSTALL_HINT})")


def test_paired_fidelity_orders_degradations():
    torch.manual_seed(0)
    ref = torch.rand(8, 1, 28, 28)
    same = paired_fidelity(ref, ref)
    slight = paired_fidelity((ref + 0.01 * torch.randn_like(ref)).clamp(0, 1), ref)
    heavy = paired_fidelity((ref + 0.2 * torch.randn_like(ref)).clamp(0, 1), ref)
    assert same["psnr"] == 100.0 and same["ssim"] == pytest.approx(1.0)
    assert same["psnr"] > slight["psnr"] > heavy["psnr"]
    assert slight["ssim"] > heavy["ssim"]
    assert heavy["psnr_p5"] <= heavy["psnr"]


def test_diversity_is_zero_for_copies_and_positive_for_distinct_features():
    labels = torch.tensor([0, 0, 1, 1])
    copies = torch.tensor([[1.0, 0.0]] * 4)
    assert within_class_diversity(copies, labels) == 0.0
    distinct = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]])
    assert within_class_diversity(distinct, labels) == pytest.approx(2**0.5)


@needs_data
def test_distribution_metrics_separate_real_images_from_noise():
    clf, reference = load_classifier()
    images, labels = data.load_split("train")
    pick = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))[:500]
    metrics = DistributionMetrics(clf, reference)
    real = metrics(images[pick], labels[pick])
    noise = metrics(torch.rand(500, 1, 28, 28), labels[pick])
    assert real["accuracy"] > 0.85 and noise["accuracy"] < 0.3
    assert real["fd"] < 10 < 100 < noise["fd"]
    assert real["precision"] > 0.7 and real["recall"] > 0.7
    assert noise["recall"] < 0.05  # noise collapses to one corner of feature space


@pytest.mark.skipif(not os.path.exists(default_weights_path()), reason="the demo teacher weights are not built yet")
def test_benchmark_runs_end_to_end_and_writes_its_table_plot_and_grid(tmp_path, capsys):
    from xslim_core import bench

    bench.main(["--images", "20", "--steps", "10", "--timing-images", "10", "--repeats", "1", "--out", str(tmp_path),
                "--skip-compute-bound"])
    table = (tmp_path / "teacher.md").read_text()
    for name in ("full 10 steps", "5 steps", "uniform reuse N=2", "X-Slim(C2F)-fast", "X-Slim online",
                 "diffusers FBC", "diffusers TaylorSeer", "diffusers MagCache"):
        assert name in table
    assert (tmp_path / "pareto.png").stat().st_size > 10_000
    assert (tmp_path / "grid.png").stat().st_size > 1_000
    full_row = next(line for line in table.splitlines() if line.startswith("| full 10 steps"))
    assert "| 120 | 10.0 | 1.00 |" in full_row  # 12 blocks x 10 steps, counted by hooks


def test_classifier_file_is_shipped_and_checked(tmp_path):
    clf, reference = load_classifier()
    assert reference["features"].shape == (2000, 128)
    assert os.path.getsize(default_classifier_path()) < 5e6
    bad = tmp_path / "clf.safetensors"
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(bad), metadata={"format": "other"})
    with pytest.raises(ValueError, match="is not an X-Slim Fashion-MNIST classifier"):
        load_classifier(str(bad))
