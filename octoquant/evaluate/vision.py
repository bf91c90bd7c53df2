"""Real photos shipped in packages (scikit-image, scikit-learn) as ImageNet-style inputs.

No labeled ImageNet images exist offline; augmented crops of natural photos give hundreds of realistic
inputs for FP32-vs-INT8 agreement. Crops are deterministic in the seed: calibration and evaluation use
different seeds, so they never share a crop.
"""

from __future__ import annotations

import math
import os

import numpy as np
import torch
import torch.nn.functional as F

SKIMAGE_PHOTOS = (
    "astronaut.png",
    "chelsea.png",
    "coffee.png",
    "rocket.jpg",
    "motorcycle_left.png",
    "motorcycle_right.png",
    "camera.png",
    "brick.png",
    "grass.png",
    "gravel.png",
    "coins.png",
    "moon.png",
    "hubble_deep_field.jpg",
    "retina.jpg",
)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def load_photos() -> list[torch.Tensor]:
    """The bundled photos as float (3, H, W) tensors in [0, 1]."""
    try:
        import skimage
        from PIL import Image
        from sklearn.datasets import load_sample_images
    except ImportError as e:
        raise ImportError(
            "photo inputs need scikit-image and scikit-learn: pip install scikit-image scikit-learn"
        ) from e
    folder = os.path.join(os.path.dirname(skimage.__file__), "data")
    arrays = []
    for name in SKIMAGE_PHOTOS:
        with Image.open(os.path.join(folder, name)) as im:
            arrays.append(np.asarray(im.convert("RGB")))
    arrays += list(load_sample_images().images)
    return [torch.from_numpy(a.copy()).permute(2, 0, 1).float() / 255.0 for a in arrays]


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff")


def load_images(path: str | os.PathLike) -> list[torch.Tensor]:
    """A user's images (a file, or every image file in a folder, sorted by name) as float (3, H, W) in [0, 1].

    Raises:
        ValueError: no image file there, or a file PIL cannot read (named).
    """
    from pathlib import Path

    from PIL import Image, UnidentifiedImageError

    p = Path(path)
    files = [p] if p.is_file() else sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"{path}: no image files ({', '.join(IMAGE_SUFFIXES)})")
    out = []
    for f in files:
        try:
            with Image.open(f) as im:
                a = np.asarray(im.convert("RGB"))
        except (OSError, UnidentifiedImageError) as e:
            raise ValueError(f"{f}: not a readable image ({e})") from e
        out.append(torch.from_numpy(a.copy()).permute(2, 0, 1).float() / 255.0)
    return out


def photo_crops(
    n: int,
    seed: int,
    size: int = 224,
    photos: list[torch.Tensor] | None = None,
    mean: tuple[float, float, float] = IMAGENET_MEAN,
    std: tuple[float, float, float] = IMAGENET_STD,
) -> torch.Tensor:
    """(n, 3, size, size) random-resized crops (area 10-100%, aspect 3/4-4/3, flips), normalised with `mean` / `std`
    (ImageNet's by default)."""
    photos = photos if photos is not None else load_photos()
    g = torch.Generator().manual_seed(seed)
    mean = torch.tensor(mean, dtype=torch.float32).reshape(3, 1, 1)
    std = torch.tensor(std, dtype=torch.float32).reshape(3, 1, 1)
    out = torch.empty(n, 3, size, size)
    for i in range(n):
        img = photos[int(torch.randint(len(photos), (1,), generator=g))]
        _, h, w = img.shape
        area = float(torch.empty(1).uniform_(0.10, 1.0, generator=g)) * h * w
        ratio = math.exp(float(torch.empty(1).uniform_(math.log(3 / 4), math.log(4 / 3), generator=g)))
        ch = min(h, max(8, round(math.sqrt(area / ratio))))
        cw = min(w, max(8, round(math.sqrt(area * ratio))))
        top = int(torch.randint(h - ch + 1, (1,), generator=g))
        left = int(torch.randint(w - cw + 1, (1,), generator=g))
        crop = img[:, top : top + ch, left : left + cw].unsqueeze(0)
        crop = F.interpolate(crop, size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0]
        if bool(torch.rand(1, generator=g) < 0.5):
            crop = crop.flip(-1)
        out[i] = (crop.clamp(0, 1) - mean) / std
    return out
