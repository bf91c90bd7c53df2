"""A small CNN for Fashion-MNIST (28x28 grey, 10 classes), trained by scripts/train_fashion_cnn.py.

The checkpoint (safetensors, ~0.6 MB) ships in the package, committed with the script that made it.
Data: Debian's dataset-fashion-mnist package (IDX files under /usr/share/datasets/fashion-mnist).
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import torch
from torch import nn

DATA_DIR = Path("/usr/share/datasets/fashion-mnist")
CHECKPOINT = Path(__file__).with_name("checkpoints") / "fashion_cnn.safetensors"
MEAN, STD = 0.2860, 0.3530  # training-set pixel statistics


class FashionCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1, bias=False),
            nn.BatchNorm2d(32),
            nn.ReLU(inplace=True),
            nn.Conv2d(32, 32, 3, padding=1, bias=False),
            nn.BatchNorm2d(32),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1, bias=False),
            nn.BatchNorm2d(64),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(64, 64, 3, padding=1, groups=64, bias=False),
            nn.BatchNorm2d(64),
            nn.ReLU6(inplace=True),
            nn.Conv2d(64, 96, 1, bias=False),
            nn.BatchNorm2d(96),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(96 * 3 * 3, 128), nn.ReLU(inplace=True), nn.Linear(128, 10)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def _read_idx(path: Path, offset: int) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        return np.frombuffer(f.read(), dtype=np.uint8, offset=offset)


def load_split(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(images (N, 1, 28, 28) normalised float, labels (N,) int64) for split 'train' or 't10k'."""
    images = DATA_DIR / f"{split}-images-idx3-ubyte.gz"
    labels = DATA_DIR / f"{split}-labels-idx1-ubyte.gz"
    if not images.exists():
        raise FileNotFoundError(f"{images} not found: apt-get install dataset-fashion-mnist")
    x = torch.from_numpy(_read_idx(images, 16).copy()).float().reshape(-1, 1, 28, 28) / 255.0
    y = torch.from_numpy(_read_idx(labels, 8).copy()).long()
    return (x - MEAN) / STD, y


def fashion_cnn_trained() -> FashionCNN:
    """The trained model in eval mode, from the packaged safetensors checkpoint (no pickle)."""
    from safetensors.torch import load_file

    model = FashionCNN()
    model.load_state_dict(load_file(CHECKPOINT))
    return model.eval()
