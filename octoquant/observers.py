"""Calibration observers: see batches, then produce a clip range [min, max] for choose_qparams.

Every observer is deterministic and independent of batch order and batch size:
- min-max keeps exact running extremes;
- moving-average min-max averages per-sample extremes, sorted before summing;
- percentile / entropy / mse read a histogram whose range is a power of two, [-2**e, 2**e), with bins
  indexed by floor(x * 2**k). When new data needs a larger range, bins merge exactly
  (new = floor(old / 2**shift)), so the final counts equal those of binning all data at once at the
  final range: the same integers whatever the order or the batching.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

import torch

from .config import PerChannel, PerTensor, QScheme
from .functional import check_finite
from .qparams import choose_qparams

__all__ = [
    "CalibrationError",
    "Observer",
    "MinMaxObserver",
    "MovingAverageMinMaxObserver",
    "PercentileObserver",
    "EntropyObserver",
    "MSEObserver",
    "OBSERVERS",
    "make_observer",
]

_EMPTY_EXP = -1000  # exponent of a channel that has seen only zeros


class CalibrationError(ValueError):
    """Calibration could not produce a range (no data, bad data)."""


class Observer(ABC):
    """Collects statistics of one tensor; `compute_range()` -> (min, max) in the scheme's scale shape.

    Only PerTensor and PerChannel granularities are calibrated (per-token and per-group scales are
    computed at run time or from the weight itself).
    """

    def __init__(self, scheme: QScheme = QScheme(), name: str = "tensor") -> None:
        if not isinstance(scheme.granularity, PerTensor | PerChannel):
            raise ValueError(
                f"{type(self).__name__} calibrates PerTensor or PerChannel ranges, got {scheme.granularity!r}"
            )
        self.scheme = scheme
        self.name = name
        self.num_batches = 0
        self.num_channels: int | None = None

    def _channels_first(self, x: torch.Tensor) -> torch.Tensor:
        """(C, n) float32 view of x: C = 1 per tensor, else the size of the channel axis."""
        x = x.detach().to(torch.float32)
        if isinstance(self.scheme.granularity, PerTensor):
            x2d = x.reshape(1, -1)
        else:
            axis = self.scheme.granularity.axis
            if not -x.dim() <= axis < x.dim():
                raise ValueError(f"observer {self.name!r}: channel axis {axis} out of range for {tuple(x.shape)}")
            x2d = x.movedim(axis, 0).reshape(x.shape[axis], -1)
        if self.num_channels is None:
            self.num_channels = x2d.shape[0]
        elif x2d.shape[0] != self.num_channels:
            raise ValueError(
                f"observer {self.name!r}: batch has {x2d.shape[0]} channels, earlier batches had {self.num_channels}"
            )
        return x2d

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        """Add one batch. Raises ValueError naming the observer if it holds NaN/Inf."""
        check_finite(x, f"calibration batch {self.num_batches} for {self.name!r}")
        if x.numel() == 0:
            return
        self._update(self._channels_first(x), x)
        self.num_batches += 1

    @abstractmethod
    def _update(self, x2d: torch.Tensor, x: torch.Tensor) -> None: ...

    @abstractmethod
    def _range(self) -> tuple[torch.Tensor, torch.Tensor]: ...

    def compute_range(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(min, max): shape () per tensor, (C,) per channel."""
        if self.num_batches == 0:
            raise CalibrationError(f"observer {self.name!r} saw no data: calibrate with at least one non-empty batch")
        lo, hi = self._range()
        if isinstance(self.scheme.granularity, PerTensor):
            lo, hi = lo.reshape(()), hi.reshape(())
        return lo.to(torch.float32), hi.to(torch.float32)

    def qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, zero_point) of the computed range under this observer's scheme."""
        lo, hi = self.compute_range()
        s = self.scheme
        return choose_qparams(lo, hi, s.dtype, s.symmetric, s.narrow_range)


class MinMaxObserver(Observer):
    """Exact running min and max."""

    def __init__(self, scheme: QScheme = QScheme(), name: str = "tensor") -> None:
        super().__init__(scheme, name)
        self.min: torch.Tensor | None = None
        self.max: torch.Tensor | None = None

    def _update(self, x2d: torch.Tensor, x: torch.Tensor) -> None:
        lo, hi = x2d.amin(dim=1), x2d.amax(dim=1)
        self.min = lo if self.min is None else torch.minimum(self.min, lo)
        self.max = hi if self.max is None else torch.maximum(self.max, hi)

    def _range(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.min, self.max


class MovingAverageMinMaxObserver(Observer):
    """Mean over samples (index along dim 0) of each sample's min and max.

    Softer than min-max against a rare outlier sample. Kept order- and batching-independent by storing
    the per-sample extremes and summing them sorted; for per-channel use, the channel axis must not be 0.
    """

    def __init__(self, scheme: QScheme = QScheme(), name: str = "tensor") -> None:
        super().__init__(scheme, name)
        if isinstance(scheme.granularity, PerChannel) and scheme.granularity.axis == 0:
            raise ValueError("MovingAverageMinMaxObserver: dim 0 is the sample dim; use a channel axis != 0")
        self._mins: list[torch.Tensor] = []
        self._maxs: list[torch.Tensor] = []

    def _update(self, x2d: torch.Tensor, x: torch.Tensor) -> None:
        x = x.detach().to(torch.float32)
        samples = x.reshape(1, -1) if x.dim() <= 1 else x
        if isinstance(self.scheme.granularity, PerTensor):
            flat = samples.reshape(samples.shape[0], 1, -1)  # (S, 1, n)
        else:
            axis = self.scheme.granularity.axis % x.dim()
            flat = samples.movedim(axis, 1).reshape(samples.shape[0], samples.shape[axis], -1)  # (S, C, n)
        self._mins.append(flat.amin(dim=2))
        self._maxs.append(flat.amax(dim=2))

    def _range(self) -> tuple[torch.Tensor, torch.Tensor]:
        mins = torch.cat(self._mins).to(torch.float64).sort(dim=0).values
        maxs = torch.cat(self._maxs).to(torch.float64).sort(dim=0).values
        return mins.mean(dim=0), maxs.mean(dim=0)


class _Pow2Histogram:
    """Per-channel histogram of `bins` bins over [-2**e_c, 2**e_c), mergeable exactly (see module doc)."""

    def __init__(self, bins: int) -> None:
        if bins < 4 or bins & (bins - 1):
            raise ValueError(f"histogram bins must be a power of two >= 4, got {bins}")
        self.bins = bins
        self.half_log2 = int(math.log2(bins // 2))
        self.counts: torch.Tensor | None = None  # (C, bins) int64
        self.exp: torch.Tensor | None = None  # (C,) int64: range is [-2**exp, 2**exp)
        self.min: torch.Tensor | None = None
        self.max: torch.Tensor | None = None

    def _rebin(self, shift: torch.Tensor) -> None:
        half = self.bins // 2
        j = torch.arange(self.bins, dtype=torch.int64) - half  # signed bin index
        div = torch.pow(2, shift.clamp(max=62)).unsqueeze(1)  # (C, 1)
        new_idx = torch.div(j.unsqueeze(0), div, rounding_mode="floor") + half  # (C, bins)
        merged = torch.zeros_like(self.counts)
        merged.scatter_add_(1, new_idx, self.counts)
        self.counts = merged

    def update(self, x2d: torch.Tensor) -> None:
        c = x2d.shape[0]
        lo, hi = torch.aminmax(x2d, dim=1)
        absmax = torch.maximum(-lo, hi)
        _, e = torch.frexp(absmax)  # absmax < 2**e strictly
        e = torch.where(absmax > 0, e.to(torch.int64), torch.full_like(e, _EMPTY_EXP, dtype=torch.int64))
        if self.counts is None:
            self.counts = torch.zeros(c, self.bins, dtype=torch.int64)
            self.exp, self.min, self.max = e, lo, hi
        else:
            new_exp = torch.maximum(self.exp, e)
            shift = new_exp - self.exp
            if (shift > 0).any():
                self._rebin(shift)
            self.exp = new_exp
            self.min, self.max = torch.minimum(self.min, lo), torch.maximum(self.max, hi)
        # index = floor(x * 2**k) + bins/2 with k = half_log2 - exp. A power-of-two multiply is exact
        # in float32 while 2**k is a normal float; a product that underflows has |x * 2**k| < 1, whose
        # floor is fixed by the sign of x alone (the `x < 0` correction below).
        k = self.half_log2 - self.exp
        empty = self.exp == _EMPTY_EXP
        fdtype = torch.float32 if bool(((k >= -126) & (k <= 127) | empty).all()) else torch.float64
        mult = torch.ldexp(torch.ones(c, dtype=fdtype), k.clamp(-1000, 1000).to(fdtype))
        mult = torch.where(empty, torch.zeros_like(mult), mult)
        xs = x2d.to(fdtype)
        idx = torch.floor(xs * mult.unsqueeze(1)).to(torch.int64)
        idx = torch.where(xs < 0, idx.clamp(max=-1), idx) + self.bins // 2
        idx.clamp_(0, self.bins - 1)
        idx += (torch.arange(c, dtype=torch.int64) * self.bins).unsqueeze(1)
        self.counts += torch.bincount(idx.reshape(-1), minlength=c * self.bins).reshape(c, self.bins)

    def bin_width(self) -> torch.Tensor:
        """(C,) float64 width of one bin; 0 for channels that saw only zeros."""
        w = torch.ldexp(torch.ones_like(self.exp, dtype=torch.float64), (self.exp - self.half_log2).clamp(min=-1070))
        return torch.where(self.exp == _EMPTY_EXP, torch.zeros_like(w), w)

    def left_edges(self) -> torch.Tensor:
        """(C, bins) float64 left edge of each bin."""
        j = torch.arange(self.bins, dtype=torch.float64) - self.bins // 2
        return j.unsqueeze(0) * self.bin_width().unsqueeze(1)

    def abs_counts(self) -> torch.Tensor:
        """(C, bins/2) counts of |x| over [0, 2**e): bins mirror exactly around the edge at 0."""
        half = self.bins // 2
        pos = self.counts[:, half:]
        neg = self.counts[:, :half].flip(1)  # bin [-w, 0) pairs with [0, w)
        return pos + neg


class _HistogramObserver(Observer):
    def __init__(self, scheme: QScheme = QScheme(), name: str = "tensor", bins: int | None = None) -> None:
        super().__init__(scheme, name)
        per_tensor = isinstance(scheme.granularity, PerTensor)
        self.hist = _Pow2Histogram(bins or (8192 if per_tensor else 512))

    def _update(self, x2d: torch.Tensor, x: torch.Tensor) -> None:
        self.hist.update(x2d)


class PercentileObserver(_HistogramObserver):
    """Clip at the `percentile`-th (and 100 - `percentile`-th) percentile, linear within a bin."""

    def __init__(
        self, scheme: QScheme = QScheme(), name: str = "tensor", percentile: float = 99.99, bins: int | None = None
    ) -> None:
        super().__init__(scheme, name, bins)
        if not 50.0 < percentile <= 100.0:
            raise ValueError(f"percentile must be in (50, 100], got {percentile}")
        self.percentile = percentile

    def _value_at(self, fraction: float) -> torch.Tensor:
        h = self.hist
        counts = h.counts.to(torch.float64)
        cdf = counts.cumsum(dim=1)
        target = cdf[:, -1:] * fraction  # (C, 1)
        i = torch.searchsorted(cdf, target).clamp(max=h.bins - 1)  # first bin with cdf >= target
        before = torch.where(i > 0, cdf.gather(1, (i - 1).clamp(min=0)), torch.zeros_like(target))
        in_bin = counts.gather(1, i).clamp(min=1.0)
        frac = ((target - before) / in_bin).clamp(0.0, 1.0)
        value = h.left_edges().gather(1, i) + frac * h.bin_width().unsqueeze(1)
        return value.squeeze(1)

    def _range(self) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.hist
        p = self.percentile / 100.0
        lo = torch.maximum(self._value_at(1.0 - p), h.min.to(torch.float64))
        hi = torch.minimum(self._value_at(p), h.max.to(torch.float64))
        return torch.minimum(lo, hi), torch.maximum(lo, hi)


def _kl_best_bins(h: torch.Tensor, levels: int, candidates: int = 384) -> int:
    """TensorRT-style entropy calibration on a histogram of |x| (1-D, float64).

    For each candidate cut i (bins kept), P = h[:i] with the clipped mass added to its last bin,
    Q = h[:i] merged into `levels` chunks and spread back over each chunk's non-empty bins;
    returns the i minimising KL(P || Q). All candidates at once: (T, L) tensors, no loop over bins.
    """
    nz = torch.nonzero(h)
    last = int(nz[-1]) + 1 if len(nz) else 0
    if last <= levels:
        return max(last, 1)
    h = h[:last].clone()
    # The first bin holds every exact zero (a spike after ReLU, half the data or more). Merged into a chunk,
    # the spike makes Q disagree with P for any cut wider than `levels` bins, so KL would always pick the
    # narrowest cut. Like NVIDIA's histogram calibrator, give bin 0 its neighbour's count for the search.
    h[0] = h[1]
    cands = torch.unique(torch.linspace(levels, last, candidates).round().to(torch.int64))  # (T,)
    i = cands.unsqueeze(1)  # (T, 1)
    j = torch.arange(last, dtype=torch.int64).unsqueeze(0)  # (1, L)
    inside = j < i  # (T, L)
    hh = h.unsqueeze(0)
    p = torch.where(inside, hh, torch.zeros((), dtype=h.dtype))
    outlier = h.sum() - h.cumsum(0)[cands - 1]  # mass clipped at each cut
    p.scatter_add_(1, i - 1, outlier.unsqueeze(1))
    chunk = torch.where(inside, (j * levels) // i, torch.full_like(j, levels))  # (T, L); `levels` = dummy
    nonzero = inside & (hh > 0)
    chunk_sum = torch.zeros(len(cands), levels + 1, dtype=h.dtype).scatter_add_(1, chunk, torch.where(inside, hh, 0.0))
    chunk_cnt = torch.zeros(len(cands), levels + 1, dtype=h.dtype).scatter_add_(1, chunk, nonzero.to(h.dtype))
    q = torch.where(nonzero, chunk_sum.gather(1, chunk) / chunk_cnt.gather(1, chunk).clamp(min=1.0), 0.0)
    p = p / p.sum(dim=1, keepdim=True)
    q = q / q.sum(dim=1, keepdim=True)
    eps = 1e-12  # smoothing for P > 0 where Q == 0 (cannot happen for bins with data, kept for safety)
    kl = torch.where(p > 0, p * torch.log(p / torch.where(q > 0, q, eps)), 0.0).sum(dim=1)
    return int(cands[int(torch.argmin(kl))])


class EntropyObserver(_HistogramObserver):
    """KL-divergence (TensorRT) calibration: the symmetric threshold whose 8-bit version loses least information.

    128 levels per side for signed or symmetric data, 256 for non-negative data under an asymmetric scheme.
    Per-tensor only.
    """

    def __init__(self, scheme: QScheme = QScheme(), name: str = "tensor", bins: int | None = None) -> None:
        if not isinstance(scheme.granularity, PerTensor):
            raise ValueError(
                "EntropyObserver supports PerTensor only; per-channel calibrators: minmax, percentile, mse"
            )
        super().__init__(scheme, name, bins)

    def _range(self) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.hist
        nonneg = bool(h.min[0] >= 0)
        levels = 256 if (nonneg and not self.scheme.symmetric) else 128
        cut = _kl_best_bins(h.abs_counts()[0].to(torch.float64), levels)
        t = cut * h.bin_width()[0]
        lo = torch.maximum(h.min.to(torch.float64), -t)
        hi = torch.minimum(h.max.to(torch.float64), t)
        return lo, hi


class MSEObserver(_HistogramObserver):
    """The clip range minimising the quantize-dequantize MSE of the observed data (histogram bin centres).

    Candidates shrink the observed range by a factor alpha: a coarse grid over (0, 1], then a fine grid
    around the best coarse point.
    """

    COARSE = 64
    FINE = 48
    CHANNEL_CHUNK = 64

    def _mse_of(self, lo: torch.Tensor, hi: torch.Tensor, centers: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """lo, hi: (C, T) candidate ranges; centers, counts: (C, B). Returns (C, T) summed squared error."""
        s = self.scheme
        scale, zp = choose_qparams(lo.to(torch.float32), hi.to(torch.float32), s.dtype, s.symmetric, s.narrow_range)
        qmin, qmax = s.qrange
        scale, zp = scale.to(torch.float64).unsqueeze(2), zp.to(torch.float64).unsqueeze(2)  # (C, T, 1)
        x = centers.unsqueeze(1)  # (C, 1, B)
        xq = (torch.round(x / scale) + zp).clamp(qmin, qmax)
        err = (x - (xq - zp) * scale).pow(2)
        return (err * counts.unsqueeze(1)).sum(dim=2)

    def _search(self, alphas: torch.Tensor, centers, counts, lo0, hi0) -> torch.Tensor:
        lo = lo0.unsqueeze(1) * alphas  # (C, T)
        hi = hi0.unsqueeze(1) * alphas
        return self._mse_of(lo, hi, centers, counts)

    def _range(self) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.hist
        centers_all = h.left_edges() + 0.5 * h.bin_width().unsqueeze(1)
        counts_all = h.counts.to(torch.float64)
        lo_all, hi_all = h.min.to(torch.float64).clamp(max=0), h.max.to(torch.float64).clamp(min=0)
        if self.scheme.symmetric:  # candidates are (-t, t): shrink the absmax, report within the data
            hi_all = torch.maximum(-lo_all, hi_all)
            lo_all = -hi_all
        best = torch.empty(h.counts.shape[0], dtype=torch.float64)
        coarse = torch.linspace(1.0 / self.COARSE, 1.0, self.COARSE, dtype=torch.float64)
        step = 1.0 / self.COARSE
        for c0 in range(0, h.counts.shape[0], self.CHANNEL_CHUNK):
            sl = slice(c0, c0 + self.CHANNEL_CHUNK)
            args = (centers_all[sl], counts_all[sl], lo_all[sl], hi_all[sl])
            a0 = coarse[self._search(coarse.unsqueeze(0), *args).argmin(dim=1)]  # (c,)
            fine = (a0.unsqueeze(1) + torch.linspace(-step, step, self.FINE, dtype=torch.float64)).clamp(1e-4, 1.0)
            err = self._search(fine, *args)
            best[sl] = fine.gather(1, err.argmin(dim=1, keepdim=True)).squeeze(1)
        lo = torch.maximum(lo_all * best, h.min.to(torch.float64).clamp(max=0))
        hi = torch.minimum(hi_all * best, h.max.to(torch.float64).clamp(min=0))
        return lo, hi


OBSERVERS: dict[str, type[Observer]] = {
    "minmax": MinMaxObserver,
    "moving_average": MovingAverageMinMaxObserver,
    "percentile": PercentileObserver,
    "entropy": EntropyObserver,
    "mse": MSEObserver,
}


def make_observer(kind: str, scheme: QScheme = QScheme(), name: str = "tensor", **kwargs) -> Observer:
    """Observer by name; unknown names raise ValueError listing the valid ones."""
    try:
        cls = OBSERVERS[kind]
    except KeyError:
        raise ValueError(f"unknown calibrator {kind!r}; valid: {', '.join(OBSERVERS)}") from None
    return cls(scheme, name, **kwargs)
