"""Fidelity and distribution metrics, computed offline.

Paired metrics (PSNR, SSIM against a reference output of the same seed) and, in the feature space of the
shipped Fashion-MNIST classifier: class accuracy, Fréchet distance ("FD-FMNIST", not Inception FID),
precision/recall (Kynkäänniemi et al., k = 3) and within-class diversity (mean pairwise distance of
L2-normalised features). torchmetrics does PSNR, SSIM and the Fréchet distance.
"""

from __future__ import annotations

import torch
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure
from torchmetrics.image.fid import FrechetInceptionDistance


def paired_fidelity(outputs: torch.Tensor, references: torch.Tensor) -> dict[str, float]:
    """PSNR (dB) and SSIM of images in [0, 1] against references: mean and 5th-percentile (worst) value."""
    outputs, references = outputs.float().clamp(0, 1), references.float().clamp(0, 1)
    psnr = peak_signal_noise_ratio(outputs, references, data_range=1.0, reduction="none", dim=(1, 2, 3))
    psnr = psnr.clamp(max=100.0)  # identical images give inf
    ssim = structural_similarity_index_measure(outputs, references, data_range=1.0, reduction="none")
    return {
        "psnr": psnr.mean().item(), "psnr_p5": psnr.quantile(0.05).item(),
        "ssim": ssim.mean().item(), "ssim_p5": ssim.quantile(0.05).item(),
    }


class DistributionMetrics:
    """Accuracy, FD, precision, recall and diversity of class-conditional samples."""

    def __init__(self, classifier: torch.nn.Module, reference: dict[str, torch.Tensor], k: int = 3):
        self.classifier, self.reference, self.k = classifier, reference, k

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
        feats = torch.cat([self.classifier.features(images[i : i + 500]) for i in range(0, len(images), 500)])
        logits = self.classifier.head(feats)
        real = self.reference["features"]
        precision = _coverage(feats, real, self.k)
        recall = _coverage(real, feats, self.k)
        return {
            "accuracy": (logits.argmax(1) == labels).float().mean().item(),
            "fd": self.frechet(images),
            "precision": precision,
            "recall": recall,
            "diversity": within_class_diversity(feats, labels),
        }

    def frechet(self, images: torch.Tensor) -> float:
        fid = FrechetInceptionDistance(feature=self.classifier, normalize=True, reset_real_features=False)
        fid.real_features_sum = self.reference["fd_sum"].clone()
        fid.real_features_cov_sum = self.reference["fd_cov_sum"].clone()
        fid.real_features_num_samples = self.reference["fd_count"].reshape(()).clone().long()
        for i in range(0, len(images), 500):
            fid.update(images[i : i + 500].float().clamp(0, 1), real=False)
        return fid.compute().item()


def _coverage(queries: torch.Tensor, support: torch.Tensor, k: int) -> float:
    """Fraction of ``queries`` inside the union of k-NN balls around ``support`` points."""
    d_support = torch.cdist(support, support)
    radii = d_support.kthvalue(k + 1, dim=1).values  # +1: the point itself is at distance 0
    return (torch.cdist(queries, support) <= radii[None]).any(dim=1).float().mean().item()


def within_class_diversity(features: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean pairwise distance of L2-normalised features within each class, averaged over classes."""
    f = torch.nn.functional.normalize(features, dim=1)
    values = []
    for c in labels.unique():
        fc = f[labels == c]
        if len(fc) < 2:
            continue
        d = torch.cdist(fc, fc)
        values.append(d.sum() / (len(fc) * (len(fc) - 1)))
    return torch.stack(values).mean().item() if values else float("nan")  # needs two samples of a class


# --- Added for the distillation evaluation over several seed sets (xslim_lab/distill_evaluate.py). Additions
# only: the functions above keep their signatures, which the X-Slim benchmarks use.


def precision_recall(real_features: torch.Tensor, fake_features: torch.Tensor, k: int = 3) -> dict[str, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019) of ``fake_features`` against ``real_features``.

    Precision: the fraction of fake points inside the union of the real points' k-NN balls (fidelity);
    recall: the fraction of real points inside the union of the fake points' k-NN balls (coverage). Both lie in
    [0, 1]; a set measured against itself scores 1 on both. Each set needs more than ``k`` points.
    """
    for name, f in (("real_features", real_features), ("fake_features", fake_features)):
        if f.ndim != 2 or f.shape[0] <= k:
            raise ValueError(f"precision_recall: {name} must be [N, D] with N > k = {k}, got shape {tuple(f.shape)}")
    real, fake = real_features.float(), fake_features.float()
    return {"precision": _coverage(fake, real, k), "recall": _coverage(real, fake, k)}


def standard_error(values) -> float:
    """Standard error of the mean of independent measurements: sample std (ddof 1) / sqrt(n); needs n >= 2."""
    v = torch.as_tensor(list(values), dtype=torch.float64)
    if v.numel() < 2:
        raise ValueError(f"standard_error needs at least 2 values, got {v.numel()}")
    return (v.std(unbiased=True) / v.numel() ** 0.5).item()


def mean_and_standard_error(values) -> tuple[float, float]:
    """(mean, standard error of the mean) of per-set measurements (n >= 2)."""
    v = [float(x) for x in values]
    return sum(v) / len(v) if v else float("nan"), standard_error(v)


@torch.no_grad()
def classifier_features(classifier: torch.nn.Module, images: torch.Tensor, batch: int = 500) -> torch.Tensor:
    """The classifier's feature vectors of images in [0, 1] (the space of FD, precision/recall and diversity)."""
    return torch.cat([classifier.features(images[i : i + batch]) for i in range(0, len(images), batch)])
