"""The reference backend: pure torch, exact, the spec every fast backend is tested against.

Integer products are summed in float64, exact for |sum| < 2**53 (far beyond the int32 bound we accept).
Rescale rule, the same in every backend: y = float32(acc) * (row_scale * col_scale) + bias; a convolution that
requantizes its output for the next one (codes out) uses the integer requantization of `requantize_codes` instead.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..config import PerGroup, PerTensor, PerToken, QDtype
from ..functional import dequantize, quantize, quantize_dynamic

# int32 accumulation is exact while K * 128 * 128 < 2**31.
MAX_K = (2**31 - 1) // (128 * 128)


def check_k(k: int) -> None:
    if k > MAX_K:
        raise ValueError(
            f"K = {k} exceeds {MAX_K}: int8 x int8 sums could overflow int32 (K * 128 * 128 >= 2**31); "
            "split the reduction dimension"
        )


def check_int8_operands(a: torch.Tensor, b: torch.Tensor) -> None:
    for name, t in (("a", a), ("b", b)):
        if t.dtype != torch.int8:
            raise ValueError(f"int8_mm: {name} must be int8, got {t.dtype}")
        if t.dim() != 2:
            raise ValueError(f"int8_mm: {name} must be 2-D, got shape {tuple(t.shape)}")
        if t.device.type != "cpu":
            raise ValueError(f"int8_mm: {name} is on {t.device}; this backend runs on cpu")
    if a.shape[1] != b.shape[0]:
        raise ValueError(f"int8_mm: shapes {tuple(a.shape)} and {tuple(b.shape)} do not chain (K mismatch)")
    check_k(a.shape[1])


def int8_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(M, K) int8 @ (K, N) int8 -> (M, N) int32, exact."""
    check_int8_operands(a, b)
    return torch.mm(a.to(torch.float64), b.to(torch.float64)).to(torch.int32)


def int_mm_offset(a: torch.Tensor, zero_point: int, w: torch.Tensor) -> torch.Tensor:
    """(a - zero_point) @ w.T for integer a (M, K), int8 w (N, K) -> int32, exact."""
    check_k(a.shape[1])
    return torch.mm(a.to(torch.float64) - zero_point, w.to(torch.float64).T).to(torch.int32)


def rescale(
    acc: torch.Tensor, row_scale: torch.Tensor, col_scale: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """float32(acc) * (row_scale[:, None] * col_scale[None, :]) + bias."""
    rs = row_scale.reshape(-1, 1) if row_scale.dim() else row_scale
    y = acc.to(torch.float32) * (rs * col_scale.reshape(1, -1))
    return y + bias if bias is not None else y


INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1


def requantization(
    in_scale: float, w_scale: torch.Tensor, bias: torch.Tensor | None, out_scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The constants of a static convolution's integer requantization (`requantize_codes`), per output channel:
    mult = (in_scale * w_scale) / out_scale and bias_q = round_half_even(bias / (in_scale * w_scale)) as int32
    (saturated), in float32 and in this order: ONNX Runtime's QLinearConv (and its QDQ bias quantization)."""
    s = torch.tensor(in_scale, dtype=torch.float32) * w_scale.to(torch.float32)
    mult = s / torch.tensor(out_scale, dtype=torch.float32)
    if bias is None:
        return mult, torch.zeros(s.shape, dtype=torch.int32, device=s.device)
    bq = torch.round(bias.to(torch.float32) / s).to(torch.float64).clamp(INT32_MIN, INT32_MAX)
    return mult, bq.to(torch.int32)


def requantize_codes(
    acc: torch.Tensor,
    mult: torch.Tensor,
    bias_q: torch.Tensor,
    out_q: ActivationQParams,
    clamp_hi: torch.Tensor | None = None,
    dim: int = 1,
) -> torch.Tensor:
    """int32 acc (channels along `dim`) -> the uint8 codes of out_q: clamp(round_half_even(float32(acc + bias_q)
    * mult), lo, hi) + zero_point (+ 128 for int8), the int32 sum wrapping. [lo, hi] = [qmin - zp, qmax - zp],
    narrowed by a fused clamp y = min(max(y, 0), clamp_hi) to [min(0, c), c] with c = round(clamp_hi / scale).

    The requantization of a convolution whose output its reader quantizes (QConv2d.requantize_for): one multiply
    in output units, as integer runtimes compute it (ONNX Runtime's QLinearConv, bit for bit), where quantizing
    the float output would divide float32(acc) * scale + bias by the output scale."""
    shape = [1] * acc.dim()
    shape[dim] = -1
    wide = acc.to(torch.int64) + bias_q.to(torch.int64).reshape(shape)
    wrapped = ((wide - INT32_MIN) % 2**32 + INT32_MIN).to(torch.int32)  # int32 addition wraps
    r = torch.round(wrapped.to(torch.float32) * mult.to(torch.float32).reshape(shape))
    qmin, qmax = out_q.dtype.qrange()
    lo = torch.full(mult.shape, float(qmin - out_q.zero_point), device=acc.device)
    hi = torch.full(mult.shape, float(qmax - out_q.zero_point), device=acc.device)
    if clamp_hi is not None:
        c = torch.round(clamp_hi.to(torch.float32) / torch.tensor(out_q.scale, dtype=torch.float32))
        lo, hi = torch.minimum(torch.maximum(torch.clamp(c, max=0.0), lo), hi), torch.minimum(torch.maximum(c, lo), hi)
    r = torch.minimum(torch.maximum(r, lo.reshape(shape)), hi.reshape(shape))
    return (r.to(torch.int32) + out_q.zero_point + out_q.shift).to(torch.uint8)


@dataclass(frozen=True)
class ActivationQParams:
    """Per-tensor activation quantization: q = clamp(round_half_even(x / scale) + zero_point, qmin, qmax).

    Convolution kernels take and give activations as "codes": uint8 tensors holding q (uint8 data) or q + 128
    (int8 data), NHWC. A convolution given `out_q` requantizes its result for the next layer in its epilogue
    (`requantize_codes`: integer arithmetic, within one code of storing float and quantizing it).
    """

    scale: float
    zero_point: int
    dtype: QDtype

    def __post_init__(self) -> None:
        # the float32 value every kernel computes with; validated once here, not on every call
        object.__setattr__(self, "scale", float(torch.tensor(self.scale, dtype=torch.float32)))
        object.__setattr__(self, "zero_point", int(self.zero_point))
        if not (self.scale > 0 and self.scale < float("inf")):
            raise ValueError(f"activation scale must be positive and finite, got {self.scale}")

    @property
    def shift(self) -> int:
        return 128 if self.dtype is QDtype.INT8 else 0


def dequantize_codes(codes: torch.Tensor, q: ActivationQParams) -> torch.Tensor:
    """uint8 codes of `q` -> float32 (q - zero_point) * scale. Quantizing the result with `q` gives the codes back
    exactly: round(float32(n * s) / s) = n for |n| <= 255."""
    n = codes.to(torch.int32) - (q.zero_point + q.shift)
    return n.to(torch.float32) * torch.tensor(q.scale, dtype=torch.float32)


def to_codes(q: torch.Tensor, dtype: QDtype) -> torch.Tensor:
    """int8 / uint8 quantized values -> uint8 codes (int8 stored as q + 128)."""
    return (q.to(torch.int16) + 128).to(torch.uint8) if dtype is QDtype.INT8 else q


@dataclass(frozen=True)
class PackedW8A8:
    """Weights for an int8 x int8 linear, in the reference layout: (N, K) int8 as given."""

    weight: torch.Tensor  # (N, K) int8
    scale: torch.Tensor  # (N,) float32
    bias: torch.Tensor | None


@dataclass(frozen=True)
class PackedW8A16:
    weight: torch.Tensor  # (N, K) int8
    scale: torch.Tensor  # (N, G) float32, G = K // group_size
    group_size: int
    bias: torch.Tensor | None


@dataclass(frozen=True)
class PackedConv:
    weight: torch.Tensor  # (O, C/groups, kh, kw) int8
    scale: torch.Tensor  # (O,) float32
    bias: torch.Tensor | None
    groups: int
    clamp_hi: torch.Tensor | None = None  # (O,) fused activation: y = min(max(y, 0), clamp_hi)


class ReferenceBackend:
    name = "reference"
    isa = "torch"

    def int8_mm(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return int8_mm(a, b)

    def quantize_per_token(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(M, K) float -> (M, K) int8, (M,) float32 scales: symmetric absmax per row."""
        q, scale, _ = quantize_dynamic(x, PerToken(), QDtype.INT8, symmetric=True)
        return q, scale

    def pack_w8a8(self, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> PackedW8A8:
        check_k(weight.shape[1])
        return PackedW8A8(weight, scale.to(torch.float32), None if bias is None else bias.to(torch.float32))

    def pack_w8a16(self, weight, scale, group_size, bias) -> PackedW8A16:
        return PackedW8A16(
            weight,
            scale.to(torch.float32).reshape(weight.shape[0], -1),
            group_size,
            None if bias is None else bias.to(torch.float32),
        )

    def linear_dynamic(self, x: torch.Tensor, packed: PackedW8A8) -> torch.Tensor:
        """Per-token int8 activations x per-channel int8 weights -> float32 (M, N)."""
        q, row_scale = self.quantize_per_token(x)
        acc = int_mm_offset(q, 0, packed.weight)  # (M, N) int32
        return rescale(acc, row_scale, packed.scale, packed.bias)

    def linear_static(
        self, x: torch.Tensor, packed: PackedW8A8, in_scale: float, in_zero_point: int, in_dtype: QDtype
    ) -> torch.Tensor:
        """Per-tensor calibrated activations (scale, zero-point, int8 or uint8) x int8 weights."""
        s = torch.tensor(in_scale, dtype=torch.float32)
        q = quantize(x, s, in_zero_point, PerTensor(), in_dtype)
        acc = int_mm_offset(q, in_zero_point, packed.weight)
        return rescale(acc, s, packed.scale, packed.bias)

    def linear_weight_only(self, x: torch.Tensor, packed: PackedW8A16) -> torch.Tensor:
        w = dequantize(packed.weight, packed.scale, 0, PerGroup(packed.group_size))
        return F.linear(x.to(torch.float32), w, packed.bias)

    def pack_conv(self, weight, scale, bias, groups, clamp_hi=None) -> PackedConv:
        check_k(weight[0].numel())
        b = None if bias is None else bias.to(torch.float32)
        return PackedConv(weight, scale.to(torch.float32), b, groups, clamp_hi)

    def quantize_nhwc(self, x: torch.Tensor, q: ActivationQParams) -> torch.Tensor:
        """(N, C, H, W) float -> (N, H, W, C) uint8 codes."""
        codes = to_codes(
            quantize(x, torch.tensor(q.scale, dtype=torch.float32), q.zero_point, PerTensor(), q.dtype), q.dtype
        )
        return codes.permute(0, 2, 3, 1).contiguous()

    def conv2d_codes(self, a, p: PackedConv, stride, padding, dilation, in_q: ActivationQParams, out_q=None):
        """Exact integer conv of (q - zp) and w on (N, H, W, C) codes; float64 holds the integers exactly.

        Returns (N, Ho, Wo, O): float32 y = float32(acc) * (in_scale * w_scale) + bias (then the fused clamp),
        or, given `out_q`, the codes of the integer requantization (`requantize_codes`).
        """
        q = a.permute(0, 3, 1, 2).to(torch.float64) - (in_q.zero_point + in_q.shift)
        acc = F.conv2d(q, p.weight.to(torch.float64), None, stride, padding, dilation, p.groups).to(torch.int32)
        if out_q is not None:
            mult, bias_q = requantization(in_q.scale, p.scale, p.bias, out_q.scale)
            return requantize_codes(acc, mult, bias_q, out_q, p.clamp_hi).permute(0, 2, 3, 1).contiguous()
        s = torch.tensor(in_q.scale, dtype=torch.float32)
        y = acc.to(torch.float32) * (s * p.scale).reshape(1, -1, 1, 1)
        y = y + p.bias.reshape(1, -1, 1, 1) if p.bias is not None else y
        if p.clamp_hi is not None:
            y = torch.minimum(y.clamp_min(0.0), p.clamp_hi.reshape(1, -1, 1, 1))
        return y.permute(0, 2, 3, 1).contiguous()

    def conv2d_static(self, x, p: PackedConv, stride, padding, dilation, in_q: ActivationQParams):
        """Float (N, C, H, W) in, float (N, O, Ho, Wo) out (channels_last memory)."""
        y = self.conv2d_codes(self.quantize_nhwc(x, in_q), p, stride, padding, dilation, in_q)
        return y.permute(0, 3, 1, 2)
