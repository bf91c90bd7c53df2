"""choose_qparams: a clip range [min, max] -> (scale, zero_point), the one rule for every tensor.

The rule (also the spec the C kernels reproduce bit for bit for dynamic activations):
- the range is widened to contain 0.0, so 0.0 is exactly representable (q == zero_point);
- symmetric: scale = absmax / qmax_side, zero_point = 0 (int8) or 128 (uint8),
  where qmax_side = 127 (int8, narrow or not; the value -128 is only reached by saturation);
- asymmetric: scale = (max - min) / (qmax - qmin), zero_point = qmin - round(min / scale), clamped;
- a zero-width range (all-zero tensor or channel) gets scale 1.0, so everything maps to zero_point
  and dequantizes to exact zeros: no division by zero anywhere downstream.
All arithmetic is float32, like the kernels.
"""

from __future__ import annotations

import torch

from .config import QDtype

__all__ = ["choose_qparams", "symmetric_scale", "SCALE_MIN"]

# Smallest scale we ever emit: the smallest normal float32, so 1/scale and x/scale stay finite.
SCALE_MIN = torch.finfo(torch.float32).tiny


def symmetric_scale(absmax: torch.Tensor, qmax_side: int = 127) -> torch.Tensor:
    """scale = absmax / qmax_side in float32; zero absmax -> 1.0 (see module docstring)."""
    absmax = absmax.to(torch.float32)
    scale = (absmax / qmax_side).clamp_min(SCALE_MIN)
    return torch.where(absmax == 0, torch.ones_like(scale), scale)


def choose_qparams(
    min_val: torch.Tensor | float,
    max_val: torch.Tensor | float,
    dtype: QDtype | str | torch.dtype = QDtype.INT8,
    symmetric: bool = True,
    narrow_range: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero-point for a clip range.

    Args:
        min_val: lower end of the clip range (any shape; one entry per scale).
        max_val: upper end, same shape as `min_val`.
        dtype: `QDtype.INT8` (-128..127) or `QDtype.UINT8` (0..255).
        symmetric: zero-point at the middle of the integer range.
        narrow_range: drop the lowest level (int8 -127..127, uint8 1..255).

    Returns:
        (scale float32, zero_point int32), both of the shape of `min_val`.

    Raises:
        ValueError: NaN/Inf in the range, min > max, or an unsupported dtype.
    """
    qdtype = QDtype.parse(dtype)
    lo = torch.as_tensor(min_val, dtype=torch.float32)
    hi = torch.as_tensor(max_val, dtype=torch.float32)
    if lo.shape != hi.shape:
        raise ValueError(f"min_val shape {tuple(lo.shape)} != max_val shape {tuple(hi.shape)}")
    if not (torch.isfinite(lo).all() and torch.isfinite(hi).all()):
        raise ValueError("choose_qparams: clip range contains NaN or Inf")
    if (lo > hi).any():
        bad = torch.nonzero(lo > hi)[0].tolist()
        raise ValueError(f"choose_qparams: min > max at index {bad}: {lo[tuple(bad)].item()} > {hi[tuple(bad)].item()}")
    qmin, qmax = qdtype.qrange(narrow_range)
    lo = lo.clamp_max(0.0)
    hi = hi.clamp_min(0.0)
    if symmetric:
        absmax = torch.maximum(-lo, hi)
        scale = symmetric_scale(absmax, 127)
        zp_value = 0 if qdtype is QDtype.INT8 else 128
        zero_point = torch.full_like(scale, zp_value, dtype=torch.int32)
        return scale, zero_point
    width = hi - lo
    scale = (width / float(qmax - qmin)).clamp_min(SCALE_MIN)
    scale = torch.where(width == 0, torch.ones_like(scale), scale)
    zero_point = (qmin - torch.round(lo / scale)).clamp(qmin, qmax).to(torch.int32)
    return scale, zero_point
