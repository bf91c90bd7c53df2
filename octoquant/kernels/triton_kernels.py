"""Triton kernels of the `cuda` backend: per-token / per-tensor activation quantization, the W8A8 GEMM with the
rescale + bias epilogue fused in, and the W8A16 GEMV / GEMM that reads int8 weights and converts in registers.

Numerics follow the reference backend (octoquant/kernels/reference.py), the spec:
- quantization: q = clamp(round_half_even(x / scale) + zero_point, qmin, qmax), float32 arithmetic; per-token
  scale = max(absmax / 127, FLT_MIN), 1.0 for an all-zero row. Divisions are IEEE round-to-nearest
  (`tl.math.div_rn`): Triton's plain `/` on a GPU is an approximate division (div.full.f32), which the H200 run
  showed flipping ties (per-token codes not bit-equal, static codes 1 off);
- int8 x int8 products accumulate in int32 (tensor-core IMMA on the GPU): exact, so int32 results are
  bit-identical to the reference;
- epilogue: float32(acc) * (row_scale * col_scale) + bias, the reference's order (an FMA may fold the bias add:
  at most 1 ulp of float32 away).

Without a GPU the same kernels run under Triton's interpreter (TRITON_INTERPRET=1, set here when CUDA is absent),
which is how CI checks their numerics on CPU. On a GPU the launch configurations are autotuned once per shape.
"""

from __future__ import annotations

import os
import sys

import torch

if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    # the interpreter is the only way Triton runs without a GPU; Triton reads the switch when it is imported
    if "triton" in sys.modules:
        raise ImportError(
            "Triton was imported before octoquant's cuda backend on a machine without a GPU: set "
            "TRITON_INTERPRET=1 in the environment (or import octoquant.kernels.cuda first) to run its kernels "
            "in Triton's interpreter"
        )
    os.environ["TRITON_INTERPRET"] = "1"

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
FLT_MIN = tl.constexpr(float(torch.finfo(torch.float32).tiny))  # qparams.SCALE_MIN, a compile-time constant


def _autotune(configs: list[triton.Config], key: list[str], prune=None):
    """Autotune on a GPU; under the interpreter the launcher passes one small configuration instead."""

    def wrap(fn):
        if INTERPRET:
            return fn
        pruning = {"early_config_prune": prune} if prune else None
        return triton.autotune(configs=configs, key=key, prune_configs_by=pruning)(fn)

    return wrap


def _k_tiles_inside_groups(configs, named_args, **kwargs):
    """Per-group W8A16 scales are loaded once per K tile: keep the configurations whose BK divides the group."""
    args = {**named_args, **kwargs}
    if not args.get("PER_GROUP"):
        return configs
    return [c for c in configs if args["GROUP"] % c.kwargs["BK"] == 0]


@triton.jit
def _round_half_even(v):
    """rint for |v| < 2**22 (larger values only matter after saturation, where the clamp decides)."""
    r = tl.floor(v + 0.5)
    tie = (r - v) == 0.5
    odd = (r - 2.0 * tl.floor(r * 0.5)) != 0.0
    return tl.where(tie & odd, r - 1.0, r)


# ---------------------------------------------------------------------------------------------------------------
# activation quantization


@triton.jit
def _quantize_per_token_kernel(
    x_ptr, q_ptr, s_ptr, K, stride_x, stride_q, BLOCK_K: tl.constexpr, ONE_PASS: tl.constexpr
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_K)
    if ONE_PASS:  # the whole row fits one block: read it once, keep it in registers
        m = offs < K
        x = tl.load(x_ptr + row * stride_x + offs, mask=m, other=0.0).to(tl.float32)
        a = tl.max(tl.abs(x), axis=0)
        scale = tl.where(a == 0.0, 1.0, tl.maximum(tl.math.div_rn(a, 127.0), FLT_MIN))
        q = tl.minimum(tl.maximum(_round_half_even(tl.math.div_rn(x, scale)), -128.0), 127.0)
        tl.store(q_ptr + row * stride_q + offs, q.to(tl.int8), mask=m)
    else:
        amax = tl.zeros((BLOCK_K,), tl.float32)
        for k0 in range(0, K, BLOCK_K):
            x = tl.load(x_ptr + row * stride_x + k0 + offs, mask=k0 + offs < K, other=0.0).to(tl.float32)
            amax = tl.maximum(amax, tl.abs(x))
        a = tl.max(amax, axis=0)
        scale = tl.where(a == 0.0, 1.0, tl.maximum(tl.math.div_rn(a, 127.0), FLT_MIN))
        for k0 in range(0, K, BLOCK_K):
            m = k0 + offs < K
            x = tl.load(x_ptr + row * stride_x + k0 + offs, mask=m, other=0.0).to(tl.float32)
            q = tl.minimum(tl.maximum(_round_half_even(tl.math.div_rn(x, scale)), -128.0), 127.0)
            tl.store(q_ptr + row * stride_q + k0 + offs, q.to(tl.int8), mask=m)
    tl.store(s_ptr + row, scale)


@triton.jit
def _quantize_per_tensor_kernel(x_ptr, q_ptr, scale, zero_point, qmin, qmax, shift, n, BLOCK: tl.constexpr):
    """q - shift as int8, q = clamp(rhe(x / scale) + zero_point, qmin, qmax); shift 128 maps uint8 onto int8."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    x = tl.load(x_ptr + offs, mask=m, other=0.0).to(tl.float32)
    q = tl.minimum(tl.maximum(_round_half_even(tl.math.div_rn(x, scale)) + zero_point, qmin), qmax) - shift
    tl.store(q_ptr + offs, q.to(tl.int8), mask=m)


PER_TOKEN_ONE_PASS_K = 16384  # rows up to this length are read once (kept in registers)


def quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(M, K) float -> (M, K) int8, (M,) float32 scales: symmetric absmax per row (the reference's rule)."""
    x = x if x.stride(-1) == 1 else x.contiguous()
    m, k = x.shape
    q = torch.empty((m, k), dtype=torch.int8, device=x.device)
    s = torch.empty((m,), dtype=torch.float32, device=x.device)
    if m:
        block = 64 if INTERPRET else min(PER_TOKEN_ONE_PASS_K, triton.next_power_of_2(k))
        warps = 4 if INTERPRET else max(1, min(16, block // 512))
        one_pass = k <= block
        _quantize_per_token_kernel[(m,)](
            x, q, s, k, x.stride(0), q.stride(0), BLOCK_K=block, ONE_PASS=one_pass, num_warps=warps
        )
    return q, s


def quantize_per_tensor_s8(x: torch.Tensor, scale: float, zero_point: int, qmin: int, qmax: int) -> torch.Tensor:
    """Static per-tensor quantization to int8 codes; uint8 ranges (qmin = 0) come back shifted by -128."""
    x = x.contiguous()
    q = torch.empty(x.shape, dtype=torch.int8, device=x.device)
    n = x.numel()
    shift = 128 if qmin == 0 else 0
    block = 1024
    if n:
        _quantize_per_tensor_kernel[(triton.cdiv(n, block),)](
            x, q, float(scale), float(zero_point), float(qmin), float(qmax), float(shift), n, BLOCK=block
        )
    return q


# ---------------------------------------------------------------------------------------------------------------
# W8A8: int8 x int8 -> int32 with the rescale epilogue fused

_MM_CONFIGS = [
    triton.Config({"BM": bm, "BN": bn, "BK": bk, "GROUP_M": 8}, num_stages=s, num_warps=w)
    for bm, bn, bk, s, w in [
        (128, 256, 128, 3, 8),
        (256, 128, 128, 3, 8),
        (128, 128, 128, 4, 8),
        (128, 128, 64, 4, 4),
        (64, 128, 128, 4, 4),
        (64, 64, 128, 4, 4),
        (16, 64, 256, 4, 4),
        (16, 128, 128, 4, 4),
        (32, 64, 256, 3, 4),
    ]
]


@triton.jit
def _grouped_tile(pid, M, N, BM: tl.constexpr, BN: tl.constexpr, GROUP_M: tl.constexpr):
    """(tile row, tile column) of program `pid`, GROUP_M tile rows at a time so a W tile is reused from L2."""
    num_m = (M + BM - 1) // BM
    num_n = (N + BN - 1) // BN
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    group_m = min(num_m - first_m, GROUP_M)
    return first_m + (pid % per_group) % group_m, (pid % per_group) // group_m


@_autotune(_MM_CONFIGS, key=["M", "N", "K"])
@triton.jit
def _int8_mm_kernel(
    a_ptr, w_ptr, out_ptr, rs_ptr, cs_ptr, bias_ptr, corr_ptr,
    M, N, K,
    stride_am, stride_ak, stride_wn, stride_wk, stride_om,
    ROW_SCALES: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_CORR: tl.constexpr, RAW: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    """out (M, N) = epilogue(a (M, K) int8 @ w (N, K)^T int8); grouped tile order keeps W tiles in L2."""
    pid_m, pid_n = _grouped_tile(tl.program_id(0), M, N, BM, BN, GROUP_M)

    rm = (pid_m * BM + tl.arange(0, BM)).to(tl.int64)
    rn = (pid_n * BN + tl.arange(0, BN)).to(tl.int64)
    rk = tl.arange(0, BK)
    ra = tl.where(rm < M, rm, 0)  # clamp rows / columns past the edge (their results are masked at the store)
    rw = tl.where(rn < N, rn, 0)
    a_ptrs = a_ptr + ra[:, None] * stride_am + rk[None, :] * stride_ak
    w_ptrs = w_ptr + rw[None, :] * stride_wn + rk[:, None] * stride_wk  # (BK, BN) view of W^T
    acc = tl.zeros((BM, BN), dtype=tl.int32)
    for k in range(0, (K + BK - 1) // BK):
        k_left = K - k * BK
        a = tl.load(a_ptrs, mask=rk[None, :] < k_left, other=0)
        w = tl.load(w_ptrs, mask=rk[:, None] < k_left, other=0)
        acc = tl.dot(a, w, acc, out_dtype=tl.int32)
        a_ptrs += BK * stride_ak
        w_ptrs += BK * stride_wk

    out_ptrs = out_ptr + rm[:, None] * stride_om + rn[None, :]
    out_mask = (rm[:, None] < M) & (rn[None, :] < N)
    if RAW:
        tl.store(out_ptrs, acc, mask=out_mask)
    else:
        if HAS_CORR:  # zero-point correction: (q - zp) @ w = q @ w + (shift - zp) * colsum(w)
            acc += tl.load(corr_ptr + rn, mask=rn < N, other=0)[None, :]
        if ROW_SCALES:
            rs = tl.load(rs_ptr + rm, mask=rm < M, other=0.0)[:, None]
        else:
            rs = tl.load(rs_ptr)
        cs = tl.load(cs_ptr + rn, mask=rn < N, other=0.0)[None, :]
        y = acc.to(tl.float32) * (rs * cs)
        if HAS_BIAS:
            y += tl.load(bias_ptr + rn, mask=rn < N, other=0.0)[None, :]
        tl.store(out_ptrs, y.to(out_ptr.dtype.element_ty), mask=out_mask)


_INTERPRET_MM = {"BM": 16, "BN": 16, "BK": 32, "GROUP_M": 2}


def int8_linear(
    a: torch.Tensor,
    w: torch.Tensor,
    row_scale: torch.Tensor | None = None,
    col_scale: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    col_correction: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """a (M, K) int8 @ w (N, K)^T int8.

    With no scales: the raw (M, N) int32 accumulator. With scales: float32(acc [+ col_correction]) *
    (row_scale * col_scale) + bias stored as `out_dtype`; `row_scale` is (M,) per token or a 0-d tensor.
    """
    m, k = a.shape
    n = w.shape[0]
    raw = col_scale is None
    out = torch.empty((m, n), dtype=torch.int32 if raw else out_dtype, device=a.device)
    if m == 0 or n == 0:
        return out
    dummy = out  # never read when the matching flag is off
    args = (
        a, w, out,
        dummy if raw else row_scale, dummy if raw else col_scale,
        dummy if bias is None else bias, dummy if col_correction is None else col_correction,
        m, n, k, a.stride(0), a.stride(1), w.stride(0), w.stride(1), out.stride(0),
    )  # fmt: skip
    flags = {
        "ROW_SCALES": (not raw) and row_scale.dim() > 0,
        "HAS_BIAS": bias is not None,
        "HAS_CORR": col_correction is not None,
        "RAW": raw,
    }
    grid = lambda meta: (triton.cdiv(m, meta["BM"]) * triton.cdiv(n, meta["BN"]),)
    _int8_mm_kernel[grid](*args, **flags, **(_INTERPRET_MM if INTERPRET else {}))
    return out


# ---------------------------------------------------------------------------------------------------------------
# W8A16: float activations x int8 weights, converted in registers (the weights cross memory as 1 byte each)

_GEMV_CONFIGS = [
    triton.Config({"BN": bn, "BK": bk}, num_warps=w, num_stages=s)
    for bn, bk, w, s in [
        (16, 512, 4, 4),
        (32, 256, 4, 4),
        (8, 1024, 4, 3),
        (64, 128, 4, 4),
        (16, 256, 2, 4),
        (64, 64, 4, 4),
    ]
]


@_autotune(_GEMV_CONFIGS, key=["N", "K", "GROUP"], prune=_k_tiles_inside_groups)
@triton.jit
def _w8a16_gemv_kernel(
    x_ptr, w_ptr, s_ptr, bias_ptr, out_ptr, N, K, stride_xm, stride_wn, stride_sn, stride_om,
    GROUP: tl.constexpr, PER_GROUP: tl.constexpr, HAS_BIAS: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
):  # fmt: skip
    """One row of x per program column: y[m, n] = sum_k x[m, k] * w[n, k] * s[n, k // GROUP] + bias[n]."""
    pid_n = tl.program_id(0)
    row = tl.program_id(1).to(tl.int64)
    rn = (pid_n * BN + tl.arange(0, BN)).to(tl.int64)
    rk = tl.arange(0, BK)
    nmask = rn < N
    acc = tl.zeros((BN, BK), dtype=tl.float32)
    for k0 in range(0, K, BK):
        kmask = k0 + rk < K
        x = tl.load(x_ptr + row * stride_xm + k0 + rk, mask=kmask, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + rn[:, None] * stride_wn + k0 + rk[None, :], mask=nmask[:, None] & kmask[None, :], other=0)
        wf = w.to(tl.float32)
        if PER_GROUP:  # BK divides GROUP: one scale per row of the tile
            wf = wf * tl.load(s_ptr + rn * stride_sn + k0 // GROUP, mask=nmask, other=0.0)[:, None]
        acc += wf * x[None, :]
    y = tl.sum(acc, axis=1)
    if not PER_GROUP:
        y = y * tl.load(s_ptr + rn, mask=nmask, other=0.0)
    if HAS_BIAS:
        y += tl.load(bias_ptr + rn, mask=nmask, other=0.0)
    tl.store(out_ptr + row * stride_om + rn, y.to(out_ptr.dtype.element_ty), mask=nmask)


_W16_MM_CONFIGS = [
    triton.Config({"BM": bm, "BN": bn, "BK": bk, "GROUP_M": 8}, num_stages=s, num_warps=w)
    for bm, bn, bk, s, w in [
        (128, 256, 64, 3, 8),
        (128, 128, 64, 4, 8),
        (64, 128, 64, 4, 4),
        (16, 128, 128, 4, 4),
        (16, 64, 256, 4, 4),
        (32, 128, 128, 4, 4),
        (64, 128, 64, 3, 4),
    ]
]


@_autotune(_W16_MM_CONFIGS, key=["M", "N", "K", "GROUP"], prune=_k_tiles_inside_groups)
@triton.jit
def _w8a16_mm_kernel(
    x_ptr, w_ptr, s_ptr, bias_ptr, out_ptr, M, N, K, stride_xm, stride_wn, stride_sn, stride_om,
    GROUP: tl.constexpr, PER_GROUP: tl.constexpr, HAS_BIAS: tl.constexpr, IEEE: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    """Tensor-core GEMM on x's dtype: int8 weight tiles converted to x.dtype in registers (exact for bf16/fp16)."""
    pid_m, pid_n = _grouped_tile(tl.program_id(0), M, N, BM, BN, GROUP_M)
    rm = (pid_m * BM + tl.arange(0, BM)).to(tl.int64)
    rn = (pid_n * BN + tl.arange(0, BN)).to(tl.int64)
    rk = tl.arange(0, BK)
    ra = tl.where(rm < M, rm, 0)
    rw = tl.where(rn < N, rn, 0)
    x_ptrs = x_ptr + ra[:, None] * stride_xm + rk[None, :]
    w_ptrs = w_ptr + rw[None, :] * stride_wn + rk[:, None]
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k in range(0, (K + BK - 1) // BK):
        k_left = K - k * BK
        x = tl.load(x_ptrs, mask=rk[None, :] < k_left, other=0.0)
        w = tl.load(w_ptrs, mask=rk[:, None] < k_left, other=0)
        wt = w.to(tl.float32)  # exact; bf16 / fp16 hold every int8 value too
        if PER_GROUP:
            wt = wt * tl.load(s_ptr + rw * stride_sn + (k * BK) // GROUP)[None, :]
        if IEEE:  # float32 activations (and the interpreter, whose bf16 dot is unreliable): full-precision dot
            acc = tl.dot(x.to(tl.float32), wt, acc, input_precision="ieee")
        else:
            acc = tl.dot(x, wt.to(x.dtype), acc)
        x_ptrs += BK
        w_ptrs += BK
    if not PER_GROUP:
        acc = acc * tl.load(s_ptr + rn, mask=rn < N, other=0.0)[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=rn < N, other=0.0)[None, :]
    out_mask = (rm[:, None] < M) & (rn[None, :] < N)
    tl.store(out_ptr + rm[:, None] * stride_om + rn[None, :], acc.to(out_ptr.dtype.element_ty), mask=out_mask)


GEMV_MAX_M = 4  # up to this many rows the GEMV (weights read once per row, L2-resident) beats padding to 16


def w8a16_linear(
    x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor, group_size: int, bias: torch.Tensor | None
) -> torch.Tensor:
    """x (M, K) float @ (w (N, K) int8 * scale (N, K // group_size))^T + bias, in x.dtype."""
    x = x if x.stride(-1) == 1 else x.contiguous()
    m, k = x.shape
    n = w.shape[0]
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return out
    per_group = group_size < k
    bias_arg = out if bias is None else bias
    common = {"GROUP": group_size, "PER_GROUP": per_group, "HAS_BIAS": bias is not None}
    if m <= GEMV_MAX_M:
        grid = lambda meta: (triton.cdiv(n, meta["BN"]), m)
        extra = {"BN": 16, "BK": 32} if INTERPRET else {}
        _w8a16_gemv_kernel[grid](
            x, w, scale, bias_arg, out, n, k, x.stride(0), w.stride(0), scale.stride(0), out.stride(0),
            **common, **extra,
        )  # fmt: skip
    else:
        grid = lambda meta: (triton.cdiv(m, meta["BM"]) * triton.cdiv(n, meta["BN"]),)
        extra = _INTERPRET_MM if INTERPRET else {}
        _w8a16_mm_kernel[grid](
            x, w, scale, bias_arg, out, m, n, k, x.stride(0), w.stride(0), scale.stride(0), out.stride(0),
            **common, IEEE=INTERPRET or x.dtype == torch.float32, **extra,
        )  # fmt: skip
    return out


def w8a16_block_ok(group_size: int, k: int) -> bool:
    """The per-group kernels need every K tile inside one group: group sizes that are multiples of 64 do."""
    return group_size >= k or group_size % 64 == 0
