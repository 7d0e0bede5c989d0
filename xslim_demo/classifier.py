"""A small Fashion-MNIST classifier: the feature space for FD, precision/recall, accuracy and diversity.

    python -m xslim_demo.classifier   # trains (12 epochs), writes weights/fmnist_classifier.safetensors

The file also carries what the metrics need from the real test set, so evaluation needs no dataset: the
FD reference sums over all 10k test images and 2000 test features for precision/recall.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from tqdm import tqdm

from xslim_core.files import atomic_path

from .teacher import WEIGHTS_DIR

FORMAT = "xslim-fmnist-classifier/1"
NUM_FEATURES = 128


def default_classifier_path() -> str:
    return os.path.join(WEIGHTS_DIR, "fmnist_classifier.safetensors")


class FashionClassifier(nn.Module):
    """3 conv layers -> 128 features -> 10 logits. Takes [N, 1, 28, 28] in [0, 1] (or uint8 0..255)."""

    num_features = NUM_FEATURES

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.conv3 = nn.Conv2d(64, 128, 3, padding=1)
        self.fc = nn.Linear(128 * 3 * 3, NUM_FEATURES)
        self.head = nn.Linear(NUM_FEATURES, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.uint8:
            x = x.float() / 255.0
        x = (x - 0.5) / 0.5
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = F.max_pool2d(F.relu(self.conv3(x)), 2)
        return F.relu(self.fc(x.flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Features, the interface torchmetrics' FID expects from a custom extractor."""
        return self.features(x)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def load_classifier(path: str | None = None) -> tuple[FashionClassifier, dict[str, torch.Tensor]]:
    """The classifier and its reference tensors (FD sums over the test set, test features, test labels)."""
    path = path or default_classifier_path()
    if not os.path.exists(path):
        raise FileNotFoundError(f"Classifier weights {path} not found; train them with python -m xslim_demo.classifier")
    with safe_open(path, framework="pt") as f:
        if (f.metadata() or {}).get("format") != FORMAT:
            raise ValueError(f"{path} is not an X-Slim Fashion-MNIST classifier (expected format {FORMAT!r}).")
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    model = FashionClassifier()
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    reference = {k[4:]: v for k, v in tensors.items() if k.startswith("ref.")}
    return model.eval().requires_grad_(False), reference


def augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random shifts of up to 2 pixels and horizontal flips: the classifier must not hinge on exact placement,
    since generated garments are placed by a model, not by the dataset's centring."""
    n = x.shape[0]
    padded = F.pad(x, (2, 2, 2, 2))
    dx, dy = torch.randint(0, 5, (2, n), generator=g)
    rows = (dy[:, None] + torch.arange(28))[:, None, :, None].expand(n, 1, 28, 32)
    cols = (dx[:, None] + torch.arange(28))[:, None, None, :].expand(n, 1, 28, 28)
    out = padded.gather(2, rows).gather(3, cols)
    flip = torch.rand(n, generator=g) < 0.5
    out[flip] = out[flip].flip(-1)
    return out


def train(epochs: int = 12, seed: int = 0, out: str | None = None) -> float:
    from torchmetrics.image.fid import FrechetInceptionDistance

    from .data import load_split

    torch.manual_seed(seed)
    x, y = load_split("train")
    xt, yt = load_split("test")
    x = x.float() / 255.0 if x.dtype == torch.uint8 else x
    model = FashionClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    steps = epochs * ((len(x) + 127) // 128)
    schedule = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps)
    g = torch.Generator().manual_seed(seed)
    for epoch in range(epochs):
        order = torch.randperm(len(x), generator=g)
        for i in tqdm(range(0, len(x), 128), desc=f"classifier epoch {epoch + 1}/{epochs}"):
            idx = order[i : i + 128]
            loss = F.cross_entropy(model.logits(augment(x[idx], g)), y[idx], label_smoothing=0.05)
            opt.zero_grad()
            loss.backward()
            opt.step()
            schedule.step()
    model.eval()
    with torch.no_grad():
        accuracy = (
            (torch.cat([model.logits(xt[i : i + 1000]).argmax(1) for i in range(0, len(xt), 1000)]) == yt)
            .float()
            .mean()
            .item()
        )
        fid = FrechetInceptionDistance(feature=model, normalize=True)
        for i in range(0, len(xt), 1000):
            fid.update(xt[i : i + 1000], real=True)
        picked = torch.randperm(len(xt), generator=g)[:2000]
        tensors = {f"model.{k}": v.contiguous() for k, v in model.state_dict().items()}
        tensors.update(
            {
                "ref.fd_sum": fid.real_features_sum,
                "ref.fd_cov_sum": fid.real_features_cov_sum,
                "ref.fd_count": fid.real_features_num_samples.reshape(1),
                "ref.features": model.features(xt[picked]).contiguous(),
                "ref.labels": yt[picked].contiguous(),
            }
        )
    out = out or default_classifier_path()
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with atomic_path(out, overwrite=True, mode=0o644) as tmp:
        save_file(tensors, tmp, metadata={"format": FORMAT, "test_accuracy": f"{accuracy:.4f}", "epochs": str(epochs)})
    print(f"Classifier test accuracy {accuracy:.4f}; written to {out}")
    return accuracy


if __name__ == "__main__":
    torch.set_num_threads(min(2, torch.get_num_threads()))
    sys.exit(0 if train() > 0 else 1)
