"""quantize / dequantize / fake_quantize and error metrics: pure functions, the numeric spec.

Rounding is round-half-to-even (`torch.round`), then saturation to [qmin, qmax]:
    q = clamp(round(x / scale) + zero_point, qmin, qmax)
    x_hat = (q - zero_point) * scale
Division (not multiplication by 1/scale) is the spec: the C kernels divide too, so both agree bit for bit.
"""

from __future__ import annotations

import torch

from .config import Granularity, PerChannel, PerGroup, PerTensor, PerToken, QDtype
from .qparams import choose_qparams

__all__ = [
    "quantize",
    "dequantize",
    "fake_quantize",
    "reduce_minmax",
    "quantize_dynamic",
    "check_finite",
    "sqnr_db",
    "cosine_similarity",
    "max_abs_error",
]


def check_finite(x: torch.Tensor, what: str) -> None:
    """Raise ValueError naming `what` and the first bad index if `x` holds NaN or Inf.

    The fast path is one sum (NaN and Inf propagate into it), so a large tensor costs no temporaries; a
    non-finite sum (or an overflowing one) pays for the element-wise search, in blocks.
    """
    if not x.is_floating_point() or x.numel() == 0 or bool(torch.isfinite(x.sum())):
        return
    flat = x.reshape(-1)
    step = 1 << 22
    if not all(bool(torch.isfinite(flat[i : i + step]).all()) for i in range(0, flat.numel(), step)):
        bad = torch.nonzero(~torch.isfinite(x))[0].tolist()
        kind = "NaN" if torch.isnan(x[tuple(bad)]) else "Inf"
        raise ValueError(f"{what} contains {kind} at index {bad} (shape {tuple(x.shape)})")


def _group_view(x: torch.Tensor, group_size: int) -> torch.Tensor:
    k = x.shape[-1]
    if k % group_size:
        raise ValueError(f"group size {group_size} does not divide the last dim {k} of shape {tuple(x.shape)}")
    return x.reshape(*x.shape[:-1], k // group_size, group_size)


def _param_view(p: torch.Tensor, x: torch.Tensor, granularity: Granularity) -> torch.Tensor:
    """Reshape a scale/zero-point (canonical shape, see config) to broadcast against x (or its group view)."""
    p = torch.as_tensor(p)
    if isinstance(granularity, PerTensor):
        expected: tuple[int, ...] = ()
        view = p.reshape(())
    elif isinstance(granularity, PerChannel):
        axis = granularity.axis % x.dim() if x.dim() else 0
        if not -x.dim() <= granularity.axis < max(x.dim(), 1):
            raise ValueError(f"channel axis {granularity.axis} out of range for shape {tuple(x.shape)}")
        expected = (x.shape[axis],)
        shape = [1] * x.dim()
        shape[axis] = x.shape[axis]
        view = p.reshape(shape) if p.shape == expected else p
    elif isinstance(granularity, PerToken):
        expected = tuple(x.shape[:-1])
        view = p.unsqueeze(-1) if tuple(p.shape) == expected else p
    elif isinstance(granularity, PerGroup):
        expected = tuple(x.shape[:-1]) + (x.shape[-1] // granularity.group_size,)
        view = p.unsqueeze(-1) if tuple(p.shape) == expected else p
    else:
        raise ValueError(f"unknown granularity {granularity!r}")
    if tuple(p.shape) != expected and p.numel() != 1:
        raise ValueError(
            f"{type(granularity).__name__}: parameter shape {tuple(p.shape)} does not match "
            f"expected {expected} for input shape {tuple(x.shape)}"
        )
    return view


def reduce_minmax(x: torch.Tensor, granularity: Granularity = PerTensor()) -> tuple[torch.Tensor, torch.Tensor]:
    """(min, max) of x reduced to the canonical scale shape of `granularity`."""
    check_finite(x, "tensor")
    x = x.detach().to(torch.float32)
    if isinstance(granularity, PerTensor):
        if x.numel() == 0:
            raise ValueError("cannot take the range of an empty tensor")
        return x.min(), x.max()
    if isinstance(granularity, PerChannel):
        axis = granularity.axis % x.dim()
        flat = x.movedim(axis, 0).reshape(x.shape[axis], -1)
        return flat.amin(dim=1), flat.amax(dim=1)
    if isinstance(granularity, PerToken):
        return x.amin(dim=-1), x.amax(dim=-1)
    if isinstance(granularity, PerGroup):
        g = _group_view(x, granularity.group_size)
        return g.amin(dim=-1), g.amax(dim=-1)
    raise ValueError(f"unknown granularity {granularity!r}")


def quantize(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | int = 0,
    granularity: Granularity = PerTensor(),
    dtype: QDtype | str | torch.dtype = QDtype.INT8,
    narrow_range: bool = False,
) -> torch.Tensor:
    """q = clamp(round_half_even(x / scale) + zero_point, qmin, qmax) as int8/uint8."""
    qdtype = QDtype.parse(dtype)
    qmin, qmax = qdtype.qrange(narrow_range)
    xf = x.to(torch.float32)
    grouped = isinstance(granularity, PerGroup)
    xv = _group_view(xf, granularity.group_size) if grouped else xf
    s = _param_view(torch.as_tensor(scale, dtype=torch.float32), xf, granularity)
    z = _param_view(torch.as_tensor(zero_point, dtype=torch.int32), xf, granularity)
    q = (torch.round(xv / s) + z).clamp_(qmin, qmax).to(qdtype.torch_dtype)
    return q.reshape(x.shape) if grouped else q


def dequantize(
    q: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | int = 0,
    granularity: Granularity = PerTensor(),
) -> torch.Tensor:
    """x_hat = (q - zero_point) * scale in float32."""
    if q.dtype not in (torch.int8, torch.uint8, torch.int32):
        raise ValueError(f"dequantize expects an int8/uint8/int32 tensor, got {q.dtype}")
    grouped = isinstance(granularity, PerGroup)
    qv = _group_view(q, granularity.group_size) if grouped else q
    s = _param_view(torch.as_tensor(scale, dtype=torch.float32), q, granularity)
    z = _param_view(torch.as_tensor(zero_point, dtype=torch.int32), q, granularity)
    x = (qv.to(torch.int32) - z).to(torch.float32) * s
    return x.reshape(q.shape) if grouped else x


def fake_quantize(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | int = 0,
    granularity: Granularity = PerTensor(),
    dtype: QDtype | str | torch.dtype = QDtype.INT8,
    narrow_range: bool = False,
) -> torch.Tensor:
    """dequantize(quantize(x)): the float values the integer model actually sees."""
    q = quantize(x, scale, zero_point, granularity, dtype, narrow_range)
    return dequantize(q, scale, zero_point, granularity).to(x.dtype)


def fake_quantize_weight(w: torch.Tensor, granularity: Granularity = PerChannel(0)) -> torch.Tensor:
    """w (out, ...) through symmetric int8 over its min-max: the default weight quantizer, per output channel or
    per group of inputs (a group size that does not divide w's last dim: per channel, as the layers do)."""
    if isinstance(granularity, PerGroup) and w.shape[-1] % granularity.group_size:
        granularity = PerChannel(0)
    lo, hi = reduce_minmax(w, granularity)
    scale, _ = choose_qparams(lo, hi, QDtype.INT8, symmetric=True)
    return fake_quantize(w, scale, 0, granularity, QDtype.INT8)


def fake_quantize_static(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """x through the default static activation quantizer (per-tensor asymmetric uint8) over [lo, hi]."""
    scale, zp = choose_qparams(lo, hi, QDtype.UINT8, symmetric=False)
    return fake_quantize(x, scale, zp, PerTensor(), QDtype.UINT8)


def quantize_dynamic(
    x: torch.Tensor,
    granularity: Granularity = PerToken(),
    dtype: QDtype | str | torch.dtype = QDtype.INT8,
    symmetric: bool = True,
    narrow_range: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Choose qparams from x itself (min-max) and quantize: (q, scale, zero_point)."""
    lo, hi = reduce_minmax(x, granularity)
    scale, zp = choose_qparams(lo, hi, dtype, symmetric, narrow_range)
    return quantize(x, scale, zp, granularity, dtype, narrow_range), scale, zp


def sqnr_db(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio 10*log10(|ref|^2 / |ref - approx|^2) in dB (inf if exact)."""
    ref = reference.detach().to(torch.float64)
    err = (ref - approx.detach().to(torch.float64)).pow(2).sum()
    sig = ref.pow(2).sum()
    if err == 0:
        return float("inf")
    return float(10.0 * torch.log10(sig / err))


def cosine_similarity(a: torch.Tensor, b: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Cosine similarity of the flattened tensors (dim=None) or along `dim`, in float64."""
    a64, b64 = a.detach().to(torch.float64), b.detach().to(torch.float64)
    if dim is None:
        a64, b64, dim = a64.reshape(-1), b64.reshape(-1), 0
    return torch.nn.functional.cosine_similarity(a64, b64, dim=dim, eps=1e-30)


def max_abs_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| in float64."""
    return float((a.detach().to(torch.float64) - b.detach().to(torch.float64)).abs().max())
