"""Order-independent samples of calibration data (the same multiset of inputs gives the same sample)."""

from __future__ import annotations

import torch

# Elements of one layer's input kept (as whole rows or images) for auto selection, bias correction, SQNR and
# the channel-equalization search; and the most units kept.
SAMPLE_BUDGET = 4_000_000
SAMPLE_UNITS_MAX = 512


class SampleSketch:
    """Keeps the k units (rows of a Linear input, images of a Conv input) with the smallest content hash.

    A bottom-k sketch: the kept set depends only on the multiset of units seen, not on batch order or size,
    and, the hash being pseudo-random, it is a uniform random sample of them.
    """

    def __init__(self, unit_dims: int, budget: int = SAMPLE_BUDGET) -> None:
        self.unit_dims = unit_dims
        self.budget = budget
        self.keys: torch.Tensor | None = None
        self.units: torch.Tensor | None = None
        self.k = 0
        self._probe: torch.Tensor | None = None

    def add(self, x: torch.Tensor) -> None:
        units = x.detach().to(torch.float32).reshape(-1, *x.shape[x.dim() - self.unit_dims :])
        flat = units.reshape(units.shape[0], -1)
        if self._probe is None:
            n = flat.shape[1]
            self.k = int(max(2, min(SAMPLE_UNITS_MAX, self.budget // max(n, 1))))
            step = max(1, n // 1024)
            count = len(range(0, n, step)[:1024])
            self._cols = slice(0, step * count, step)  # up to 1024 evenly spaced columns (a view: no gather)
            self._probe = torch.randn(count, generator=torch.Generator().manual_seed(1234), dtype=torch.float64)
        proj = flat[:, self._cols].to(torch.float64) @ self._probe + 1e-9 * flat.sum(dim=1, dtype=torch.float64)
        # The kept units must be an unbiased sample (bias correction averages over them): the projection
        # itself would select units lying in one direction. Its fractional part at a fine scale is a
        # deterministic, content-derived key that behaves like a uniform random draw.
        keys = torch.frac(proj * 7_919_000.0).abs()
        if self.keys is not None:
            keys, units = torch.cat([self.keys, keys]), torch.cat([self.units, units])
        order = torch.argsort(keys, stable=True)[: self.k]
        self.keys, self.units = keys[order], units[order].clone()
