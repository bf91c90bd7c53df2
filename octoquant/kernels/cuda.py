"""The `cuda` backend: INT8 tensor cores through Triton (fused W8A8 GEMM + epilogue, W8A16 GEMV/GEMM) and
cuBLASLt's IMMA through `torch._int_mm` for the bare int8_mm op.

On a machine without a GPU the same Triton kernels run in Triton's interpreter on CPU tensors: slow, but the
numerics are the GPU's, which is how CI tests this row of the table against the reference.
Convolutions are not given GPU kernels: `conv2d_static` runs the reference's exact integer convolution on the
tensors' device (correct, not fast); the vision path's fast kernels are the CPU ones.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from ..config import QDtype
from . import reference
from .reference import check_k

log = logging.getLogger("octoquant.kernels")


def _triton():
    try:
        from . import triton_kernels
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise RuntimeError(f"the cuda backend needs Triton (pip install triton): {e}") from None
    return triton_kernels


@dataclass(frozen=True)
class CudaPackedW8A8:
    weight: torch.Tensor  # (N, K) int8, contiguous
    scale: torch.Tensor  # (N,) float32
    bias: torch.Tensor | None  # (N,) float32
    colsum: torch.Tensor  # (N,) int32: sum_k w[n, k], for activation zero-points


@dataclass(frozen=True)
class CudaPackedW8A16:
    weight: torch.Tensor  # (N, K) int8
    scale: torch.Tensor  # (N, G) float32, G = K // group_size
    group_size: int
    bias: torch.Tensor | None


# cuBLASLt int8 GEMM shape rules (torch._int_mm on CUDA): M > 16, K and N multiples of 8.
INT_MM_MIN_M = 17
INT_MM_ALIGN = 8


def _pad_dim(t: torch.Tensor, dim: int, size: int) -> torch.Tensor:
    if t.shape[dim] == size:
        return t
    pad = list(t.shape)
    pad[dim] = size - t.shape[dim]
    return torch.cat([t, t.new_zeros(pad)], dim=dim)


def int_mm_padded(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """torch._int_mm with its shape rules met by zero padding (zeros add nothing to an integer sum): exact."""
    m, k = a.shape
    n = b.shape[1]
    up = lambda v: -(-v // INT_MM_ALIGN) * INT_MM_ALIGN
    mp, kp, np_ = max(m, INT_MM_MIN_M), up(k), up(n)
    a_p = _pad_dim(_pad_dim(a, 0, mp), 1, kp).contiguous()  # row-major
    b_p = _pad_dim(_pad_dim(b, 0, kp), 1, np_)
    if b_p.stride(0) != 1:  # cuBLASLt IMMA wants the second operand column-major
        b_p = b_p.T.contiguous().T
    return torch._int_mm(a_p, b_p)[:m, :n]


class CudaBackend:
    name = "cuda"

    def __init__(self, interpret: bool | None = None) -> None:
        self.kernels = _triton()
        if not torch.cuda.is_available() and not self.kernels.INTERPRET:
            raise RuntimeError("the cuda backend needs a CUDA GPU (or TRITON_INTERPRET=1 to check numerics on CPU)")
        self.isa = "triton-interpreter" if self.kernels.INTERPRET else f"cuda:{torch.cuda.get_device_name()}"

    # -- the bare ops -------------------------------------------------------------------------------------------
    def int8_mm(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """(M, K) int8 @ (K, N) int8 -> (M, N) int32, exact: cuBLASLt IMMA on a GPU, Triton otherwise."""
        for name, t in (("a", a), ("b", b)):
            if t.dtype != torch.int8 or t.dim() != 2:
                raise ValueError(f"int8_mm: {name} must be a 2-D int8 tensor, got {t.dtype} {tuple(t.shape)}")
        if a.shape[1] != b.shape[0]:
            raise ValueError(f"int8_mm: shapes {tuple(a.shape)} and {tuple(b.shape)} do not chain (K mismatch)")
        check_k(a.shape[1])
        if a.is_cuda:
            return int_mm_padded(a, b)
        return self.kernels.int8_linear(a, b.T)

    def quantize_per_token(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.kernels.quantize_per_token(x)

    # -- W8A8 ---------------------------------------------------------------------------------------------------
    def pack_w8a8(self, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> CudaPackedW8A8:
        check_k(weight.shape[1])
        w = weight.contiguous()
        b = None if bias is None else bias.to(torch.float32).contiguous()
        colsum = w.to(torch.int32).sum(dim=1, dtype=torch.int32)
        return CudaPackedW8A8(w, scale.to(torch.float32).contiguous(), b, colsum)

    def linear_dynamic(self, x: torch.Tensor, p: CudaPackedW8A8) -> torch.Tensor:
        """Per-token int8 activations x per-channel int8 weights, output in x's dtype (float32 epilogue)."""
        q, row_scale = self.kernels.quantize_per_token(x)
        return self.kernels.int8_linear(q, p.weight, row_scale, p.scale, p.bias, out_dtype=x.dtype)

    def linear_static(
        self, x: torch.Tensor, p: CudaPackedW8A8, in_scale: float, in_zero_point: int, in_dtype: QDtype
    ) -> torch.Tensor:
        """Per-tensor activations; uint8 codes run as int8 (q - 128) with the zero-point folded into colsum."""
        qmin, qmax = in_dtype.qrange(False)
        q = self.kernels.quantize_per_tensor_s8(x, in_scale, in_zero_point, qmin, qmax)
        shift = 128 if qmin == 0 else 0
        corr = None if shift == in_zero_point else p.colsum * (shift - in_zero_point)
        s = torch.tensor(in_scale, dtype=torch.float32, device=x.device)
        return self.kernels.int8_linear(q, p.weight, s, p.scale, p.bias, corr, out_dtype=x.dtype)

    # -- W8A16 --------------------------------------------------------------------------------------------------
    def pack_w8a16(self, weight, scale, group_size, bias) -> CudaPackedW8A16:
        s = scale.to(torch.float32).reshape(weight.shape[0], -1).contiguous()
        b = None if bias is None else bias.to(torch.float32).contiguous()
        return CudaPackedW8A16(weight.contiguous(), s, group_size, b)

    def linear_weight_only(self, x: torch.Tensor, p: CudaPackedW8A16) -> torch.Tensor:
        k = p.weight.shape[1]
        if not self.kernels.w8a16_block_ok(p.group_size, k):
            ref = reference.ReferenceBackend().linear_weight_only
            return ref(x, reference.PackedW8A16(p.weight, p.scale, p.group_size, p.bias)).to(x.dtype)
        return self.kernels.w8a16_linear(x, p.weight, p.scale, p.group_size, p.bias)

    # -- convolutions: the reference's exact integer conv on the tensors' device ---------------------------------
    def pack_conv(self, weight, scale, bias, groups, clamp_hi=None):
        return reference.ReferenceBackend().pack_conv(weight, scale, bias, groups, clamp_hi)

    def quantize_nhwc(self, x, q):
        return reference.ReferenceBackend().quantize_nhwc(x, q)

    def conv2d_codes(self, a, p, stride, padding, dilation, in_q, out_q=None):
        return reference.ReferenceBackend().conv2d_codes(a, p, stride, padding, dilation, in_q, out_q)

    def conv2d_static(self, x, p, stride, padding, dilation, in_q):
        return reference.ReferenceBackend().conv2d_static(x, p, stride, padding, dilation, in_q).to(x.dtype)
