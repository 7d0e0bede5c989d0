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
