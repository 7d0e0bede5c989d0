"""Fashion-MNIST from Debian's `dataset-fashion-mnist` package (idx files, read with numpy)."""

from __future__ import annotations

import gzip
import os

import numpy as np
import torch

DATA_DIR = os.environ.get("FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist")
INSTALL_HINT = (
    "sudo apt-get install dataset-fashion-mnist   (or set FASHION_MNIST_DIR to a folder with the idx .gz files)"
)


def _read_idx(path: str) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    dims = data[3]
    shape = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(dims)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)


def load_split(split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """Images as float [N, 1, 28, 28] in [0, 1] and labels as long [N]; ``split`` is "train" or "test"."""
    prefix = {"train": "train", "test": "t10k"}[split]
    images = os.path.join(DATA_DIR, f"{prefix}-images-idx3-ubyte.gz")
    labels = os.path.join(DATA_DIR, f"{prefix}-labels-idx1-ubyte.gz")
    for path in (images, labels):
        if not os.path.exists(path):
            raise FileNotFoundError(f"Fashion-MNIST file {path} not found. Install the dataset: {INSTALL_HINT}")
    x = torch.from_numpy(_read_idx(images).copy()).float().div_(255.0).unsqueeze(1)
    y = torch.from_numpy(_read_idx(labels).copy()).long()
    return x, y
