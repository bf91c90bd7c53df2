"""The CPU backend: octoquant's own C++ kernels (octoquant/_C), AVX-512 VNNI or AVX2 chosen at run time.

Exactness: u8 x s8 products accumulate in int32 without any int16 stage that could saturate (VNNI
vpdpbusd; AVX2 widens to int16 and uses vpmaddwd), so int8_mm equals the reference bit for bit; the
epilogue performs the reference's rescale as the same float32 operations.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import math
import mmap
import threading
from dataclasses import dataclass

import torch

from ..config import QDtype
from .reference import ActivationQParams, check_int8_operands, check_k, requantization

try:
    from .. import _C
except ImportError:  # extension not built (no compiler at install time)
    _C = None

log = logging.getLogger("octoquant.kernels")


def _share_torch_openmp() -> str:
    """Run octoquant's parallel loops on the OpenMP runtime torch already loaded (see _C.use_openmp).

    Two thread pools on few cores stall each other: torch's OpenMP workers spin after every op. The
    runtime is found among this process's mapped libraries; without one, octoquant keeps its own pool.
    """
    if _C is None:
        return "none"
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if "/libgomp" in line or "/libiomp" in line}
    except OSError:
        paths = set()
    for path in sorted(paths):
        try:
            lib = ctypes.CDLL(path, mode=ctypes.RTLD_LOCAL)  # already loaded: returns the same instance
            fn = ctypes.cast(lib.GOMP_parallel, ctypes.c_void_p).value
            tid = ctypes.cast(lib.omp_get_thread_num, ctypes.c_void_p).value
        except (OSError, AttributeError):
            continue
        _C.use_openmp(fn, tid)
        return _C.threading()
    log.info("octoquant: no OpenMP runtime found in this process; using octoquant's own thread pool")
    return _C.threading()


THREADING = _share_torch_openmp()

ISAS = {"scalar": 0, "avx2": 1, "avx512vnni": 2}


def available_isas() -> list[str]:
    if _C is None:
        return []
    f = _C.cpu_features()
    return ["scalar"] + [name for name in ("avx2", "avx512vnni") if f[name]]


def best_isa() -> str | None:
    isas = available_isas()
    return isas[-1] if isas else None


def _ptr(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


_scratch_space = threading.local()
SCRATCH_VIEWS = 256  # cached (slot, shape, dtype) views per thread


def scratch(slot: str, shape: tuple[int, ...], dtype: torch.dtype = torch.uint8) -> torch.Tensor:
    """A tensor of `shape` in this thread's reusable buffer `slot` (contents undefined; valid until the next
    call with the same slot in the same thread). Buffers only grow, and live as long as their thread.

    For short-lived intermediates (im2col columns, the codes one chained convolution hands the next): a fresh
    multi-MB tensor per call costs page faults and zero-filling in the kernel each time glibc trims or mmaps
    it. The views are cached too (a dict hit instead of three tensor constructions per call).
    """
    space = _scratch_space.__dict__
    views = space.get("views")
    if views is None:
        views = space["views"] = {}
        space["buffers"] = {}
    key = (slot, shape, dtype)
    view = views.get(key)
    if view is not None:
        return view
    n = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    buf = space["buffers"].get(slot)
    if buf is None or buf.numel() < n:
        buf = space["buffers"][slot] = torch.empty(n, dtype=torch.uint8)
        for k in [k for k in views if k[0] == slot]:  # views of the old buffer
            del views[k]
    if len(views) >= SCRATCH_VIEWS:  # many input shapes: start over rather than grow without bound
        views.clear()
    view = views[key] = buf[:n].view(dtype).view(shape)
    return view


HUGE_PAGE = 2 << 20


class _HugePages:
    """Memory for packed weights on transparent huge pages (2 MiB), where the OS serves them.

    A decode step streams every weight byte from DRAM once. On 4 KiB pages the hardware prefetchers stop at
    every page boundary and each page costs a TLB miss; on 2 MiB pages the stream runs on. Measured at M = 1,
    cold weights (in-process A/B, RESULTS.md): 4096 x 4096 0.92-0.95x the time on 2 threads, 0.83x on one;
    576 x 1536 (a small LLM's layer) 0.87x. The memory is an anonymous private mapping advised MADV_HUGEPAGE
    (Linux's default "madvise" THP mode serves it; "never", or an OS without THP, leaves ordinary pages: the
    same bytes, only slower). A tensor of 2 MiB or more gets its own mapping, of which only the whole 2 MiB
    pages inside the tensor are advised; smaller ones share 32 MiB slabs (a layer of a small model is a few
    hundred KiB). A filled slab is freed with the last tensor in it; the slab being filled is also held here, so
    up to 32 MiB of address space, and the pages already written in it, outlive the models that used it. Pages are
    touched only when the packing writes them: a slab's unused rest costs address space, not memory.
    """

    SLAB = 32 << 20
    ALIGN = 256

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._slab: torch.Tensor | None = None
        self._used = 0

    @staticmethod
    def _mapping(nbytes: int) -> torch.Tensor:
        area = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        whole = torch.frombuffer(area, dtype=torch.uint8)  # the storage holds `area` while any view lives
        start = -whole.data_ptr() % HUGE_PAGE
        try:
            area.madvise(mmap.MADV_HUGEPAGE, start, nbytes // HUGE_PAGE * HUGE_PAGE)
        except OSError:  # THP unavailable: ordinary pages
            pass
        return whole[start : start + nbytes]

    def take(self, nbytes: int) -> torch.Tensor:
        """`nbytes` uninitialized bytes, 256-byte aligned."""
        if nbytes >= HUGE_PAGE:
            return self._mapping(nbytes)
        with self._lock:
            if self._slab is None or self._used + nbytes > self.SLAB:
                self._slab, self._used = self._mapping(self.SLAB), 0
            view = self._slab[self._used : self._used + nbytes]
            self._used += -(-nbytes // self.ALIGN) * self.ALIGN
        return view


_huge_pages = _HugePages() if hasattr(mmap, "MADV_HUGEPAGE") and hasattr(mmap, "MAP_PRIVATE") else None


def weight_buffer(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialized contiguous tensor for packed weights, on huge pages where the OS has them (_HugePages)."""
    if _huge_pages is None:
        return torch.empty(shape, dtype=dtype)
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    return _huge_pages.take(nbytes).view(dtype).view(shape)


@dataclass(frozen=True)
class CpuPackedW8A8:
    packed: torch.Tensor  # (T, Kp/4, 4, 16, 4) int8, T = ceil(N / 64) tiles of 64 columns
    colsum: torch.Tensor  # (T*64,) int32
    scale: torch.Tensor  # (T*64,) float32, padded with 0
    bias: torch.Tensor | None  # (N,) float32
    n: int
    k: int
    kp: int
    clamp_hi: torch.Tensor | None = None  # (T*64,) fused activation: y = min(max(y, 0), clamp_hi)

    @functools.cached_property
    def addresses(self) -> tuple[int, int, int, int, int]:
        """(packed, colsum, scale, bias, clamp_hi) data addresses, read once (the tensors never move)."""
        return (
            self.packed.data_ptr(),
            self.colsum.data_ptr(),
            self.scale.data_ptr(),
            _ptr(self.bias),
            _ptr(self.clamp_hi),
        )


@dataclass(frozen=True)
class ConvSpec:
    """One convolution's kernel calls for one input shape (`CpuBackend.conv_spec`). Holds data addresses of the
    packed weights: valid while they live."""

    in_shape: torch.Size  # (N, H, W, C) codes
    out_shape: tuple[int, int, int, int]  # (N, Ho, Wo, O)
    q_rest: tuple  # requantized output (scale, zero-point, qmin, qmax, shift), or () for float
    dw_args: tuple | None  # depthwise: the kernel's geometry and weights
    dw_tail: tuple | None
    groups: tuple  # GEMM: per group (im2col arguments or None, lda, weights, tail, (M, N, Kp), column, ldy)
    keep: tuple = ()  # tensors whose addresses the calls hold (the requantization's constants)


class ChainPlan:
    """A `ChainProgram` and the buffers it needs: float (N, C, H, W) out of (N, H, W, C) input codes."""

    def __init__(
        self, program, isa: int, in_shape, out_shape, handovers: int, codes_bytes: int, cols_bytes: int, keep=()
    ):
        self.program, self.isa, self.in_shape, self.out_shape = program, isa, in_shape, out_shape
        self.keep = keep  # the tensors whose addresses the program holds (besides the packed weights)
        self.handovers = handovers  # layers that hand codes to the next
        self.codes_bytes, self.cols_bytes = max(codes_bytes, 1), max(cols_bytes, 1)

    def __call__(self, codes: torch.Tensor, slots: tuple[str, str]) -> torch.Tensor:
        """Run on `codes`; the codes handed between layers go to this thread's scratch buffers `slots` in turn."""
        if codes.shape != self.in_shape or codes.dtype != torch.uint8 or not codes.is_contiguous():
            raise ValueError(f"ChainPlan expects contiguous uint8 codes of shape {tuple(self.in_shape)}")
        out = torch.empty(self.out_shape, dtype=torch.float32)
        buffers = (
            codes.data_ptr(),
            scratch(slots[0], (self.codes_bytes,)).data_ptr(),
            scratch(slots[1], (self.codes_bytes,)).data_ptr(),
            out.data_ptr(),
            scratch("im2col", (self.cols_bytes,)).data_ptr(),  # the slot of conv_plan's columns
        )
        self.program.run(buffers, self.isa, torch.get_num_threads())
        return out


class BlockPlan:
    """A `ChainProgram` over a sequence of convolution blocks (`CpuBackend.block_program`) and its buffers."""

    def __init__(
        self,
        program,
        isa: int,
        in_shape,
        out_shape,
        sizes: tuple[int, int, int],
        float_input: bool,
        step_kinds: tuple[str, ...] = (),
        keep: tuple = (),
    ):
        self.program, self.isa, self.in_shape, self.out_shape = program, isa, in_shape, out_shape
        self.keep = keep  # the tensors whose addresses the program holds (besides the packed weights)
        self.step_kinds = step_kinds  # "gemm" / "dw" / "addq" per program step (for program.step_ns())
        codes_bytes, cols_bytes, float_bytes = sizes
        self.codes_bytes, self.cols_bytes, self.float_bytes = (
            max(codes_bytes, 1),
            max(cols_bytes, 1),
            max(float_bytes, 4),
        )
        self.float_input = float_input  # the first unit adds the program's float input (buffer 7)

    def __call__(
        self, codes: torch.Tensor, slots: tuple[str, str], float_in: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Run on `codes` (N, H, W, C) and, where the first unit adds its input, `float_in` (the same values in
        float32, channels_last memory); the result is a fresh (N, Ho, Wo, O) float tensor."""
        if codes.shape != self.in_shape or codes.dtype != torch.uint8 or not codes.is_contiguous():
            raise ValueError(f"BlockPlan expects contiguous uint8 codes of shape {tuple(self.in_shape)}")
        if self.float_input:
            n, h, w, c = self.in_shape
            if (
                float_in is None
                or float_in.dtype != torch.float32
                or tuple(float_in.shape) != (n, c, h, w)
                or not float_in.is_contiguous(memory_format=torch.channels_last)
            ):
                raise ValueError("BlockPlan: the first block adds its input: give it as float32, channels_last memory")
        out = torch.empty(self.out_shape, dtype=torch.float32)
        floats = self.float_bytes // 4
        buffers = (
            codes.data_ptr(),
            scratch(slots[0], (self.codes_bytes,)).data_ptr(),
            scratch(slots[1], (self.codes_bytes,)).data_ptr(),
            out.data_ptr(),
            scratch("im2col", (self.cols_bytes,)).data_ptr(),
            scratch("block-float-0", (floats,), torch.float32).data_ptr(),
            scratch("block-float-1", (floats,), torch.float32).data_ptr(),
            float_in.data_ptr() if self.float_input else 0,
        )
        self.program.run(buffers, self.isa, torch.get_num_threads())
        return out


@dataclass(frozen=True)
class CpuPackedW8A16:
    packed: torch.Tensor  # (NB, K, 16) int8
    scale: torch.Tensor  # (NB, G, 16) float32
    group_size: int
    bias: torch.Tensor | None
    n: int
    k: int


@dataclass(frozen=True)
class CpuPackedConv:
    groups: int
    kernel_size: tuple[int, int]
    out_channels: int
    depthwise_weight: torch.Tensor | None  # (kh, kw, C) int32 lanes (int16 weight, 0), depthwise only
    scale: torch.Tensor  # (O,) float32
    bias: torch.Tensor | None
    gemms: tuple[CpuPackedW8A8, ...]  # one per group (K order kh, kw, C/groups), empty for depthwise
    clamp_hi: torch.Tensor | None = None  # (O,) fused activation


def _pad_to(t: torch.Tensor, n: int) -> torch.Tensor:
    out = torch.zeros(n, dtype=t.dtype)
    out[: t.numel()] = t
    return out


class CpuBackend:
    name = "cpu"

    def __init__(self, isa: str | None = None) -> None:
        if _C is None:
            raise RuntimeError("octoquant._C is not built: reinstall octoquant with a C++17 compiler available")
        isa = isa or best_isa()
        if isa not in ISAS:
            raise ValueError(f"unknown ISA {isa!r}; valid: {', '.join(ISAS)}")
        if isa not in available_isas():
            raise ValueError(f"this CPU cannot run ISA {isa!r}; available: {', '.join(available_isas())}")
        self.isa = isa
        self._isa_id = ISAS[isa]

    # -------------------------------------------------------------------------------------------- packing
    def pack_w8a8(
        self,
        weight: torch.Tensor,
        scale: torch.Tensor,
        bias: torch.Tensor | None,
        clamp_hi: torch.Tensor | None = None,
    ) -> CpuPackedW8A8:
        n, k = weight.shape
        check_k(k)
        kp = (k + 3) // 4 * 4
        tiles = (n + 63) // 64
        w = weight.contiguous()
        packed = weight_buffer((tiles, kp // 4, 4, 16, 4), torch.int8)
        _C.pack_weight_u8s8(w.data_ptr(), n, k, packed.data_ptr(), kp)
        colsum = _pad_to(w.to(torch.int32).sum(dim=1, dtype=torch.int32), tiles * 64)
        b = None if bias is None else bias.detach().to(torch.float32).contiguous()
        hi = None if clamp_hi is None else _pad_to(clamp_hi.to(torch.float32), tiles * 64)
        return CpuPackedW8A8(packed, colsum, _pad_to(scale.to(torch.float32), tiles * 64), b, n, k, kp, hi)

    def pack_w8a16(self, weight, scale, group_size, bias) -> CpuPackedW8A16:
        n, k = weight.shape
        nb = (n + 15) // 16
        g = k // group_size
        packed = weight_buffer((nb, k, 16), torch.int8)
        _C.pack_weight_wo(weight.contiguous().data_ptr(), n, k, packed.data_ptr())
        sc = torch.zeros(nb * 16, g, dtype=torch.float32)
        sc[:n] = scale.to(torch.float32).reshape(n, g)
        sc = sc.reshape(nb, 16, g).transpose(1, 2).contiguous()  # (NB, G, 16)
        b = None if bias is None else bias.detach().to(torch.float32).contiguous()
        return CpuPackedW8A16(packed, sc, group_size, b, n, k)

    # -------------------------------------------------------------------------------------------- ops
    def _gemm(
        self,
        a_u8: torch.Tensor,
        offset: int,
        p: CpuPackedW8A8,
        row_scale: torch.Tensor | None,
        row_scale0: float,
        out: torch.Tensor,
        acc_out: bool = False,
    ) -> None:
        m = a_u8.shape[0]
        w, colsum, scale, bias, clamp_hi = p.addresses
        _C.gemm_u8s8(
            a_u8.data_ptr(),
            a_u8.stride(0),
            w,
            colsum,
            offset,
            _ptr(row_scale),
            row_scale0,
            scale,
            bias,
            clamp_hi,
            0,
            0 if acc_out else out.data_ptr(),
            out.data_ptr() if acc_out else 0,
            out.stride(0),
            m,
            p.n,
            p.kp,
            self._isa_id,
            torch.get_num_threads(),
            (),
        )

    def int8_mm(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """(M, K) int8 @ (K, N) int8 -> (M, N) int32, exact (see module docstring)."""
        check_int8_operands(a, b)
        m, k = a.shape
        p = self.pack_w8a8(b.T, torch.ones(b.shape[1]), None)
        a_u8 = torch.full((m, p.kp), 128, dtype=torch.uint8)
        a_u8[:, :k] = a.view(torch.uint8) ^ 0x80  # q + 128 as u8
        out = torch.empty(m, p.n, dtype=torch.int32)
        self._gemm(a_u8, 128, p, None, 1.0, out, acc_out=True)
        return out

    def quantize_per_token(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(M, K) float32 -> ((M, K) int8, (M,) scales). Same rule and bits as the reference."""
        x = _as_f32_rows(x)
        m, k = x.shape
        a_u8, scale = torch.empty(m, k, dtype=torch.uint8), torch.empty(m, dtype=torch.float32)
        _C.quantize_rows_dynamic(x.data_ptr(), x.stride(0), m, k, a_u8.data_ptr(), k, scale.data_ptr(), self._isa_id)
        return (a_u8 ^ 0x80).view(torch.int8), scale

    def _linear(self, x: torch.Tensor, p: CpuPackedW8A8, in_q: ActivationQParams | None) -> torch.Tensor:
        """(M, K) float -> (M, N) float32: quantization (per-token without `in_q`) and GEMM in one kernel call
        (the codes in the kernel's per-thread buffer)."""
        x = _as_f32_rows(x)
        m, k = x.shape
        if k != p.k:
            raise ValueError(f"the weights expect {p.k} input features, got {k}")
        out = torch.empty(m, p.n, dtype=torch.float32)
        w, colsum, scale, bias, _ = p.addresses
        _C.linear_u8s8(
            x.data_ptr(), x.stride(0), m, k, *_row_quant(in_q), w, colsum, scale, bias,
            out.data_ptr(), p.n, p.n, p.kp, self._isa_id, torch.get_num_threads(),
        )  # fmt: skip
        return out

    def linear_dynamic(self, x: torch.Tensor, p: CpuPackedW8A8) -> torch.Tensor:
        return self._linear(x, p, None)

    def quantize_static_u8(
        self, x: torch.Tensor, kp: int, scale: float, zero_point: int, dtype: QDtype
    ) -> torch.Tensor:
        """(M, K) float -> (M, kp) u8 holding q (+128 for int8), the padding holding the zero-point."""
        x = _as_f32_rows(x)
        m, k = x.shape
        a = torch.empty(m, k, dtype=torch.uint8)
        self._quantize_into(x, float(scale), int(zero_point), dtype, a)
        if kp == k:
            return a
        shift = 128 if dtype is QDtype.INT8 else 0
        a_u8 = torch.full((m, kp), zero_point + shift, dtype=torch.uint8)  # K padded to a multiple of 4
        a_u8[:, :k] = a
        return a_u8

    def linear_static(
        self, x: torch.Tensor, p: CpuPackedW8A8, in_scale: float, in_zero_point: int, in_dtype: QDtype
    ) -> torch.Tensor:
        return self._linear(x, p, ActivationQParams(in_scale, in_zero_point, in_dtype))

    def linear_weight_only(self, x: torch.Tensor, p: CpuPackedW8A16) -> torch.Tensor:
        x = _as_f32_rows(x)
        m = x.shape[0]
        out = torch.empty(m, p.n, dtype=torch.float32)
        _C.linear_wo(
            x.data_ptr(),
            x.stride(0),
            m,
            p.k,
            p.packed.data_ptr(),
            p.scale.data_ptr(),
            p.group_size,
            _ptr(p.bias),
            out.data_ptr(),
            out.stride(0),
            p.n,
            self._isa_id,
            torch.get_num_threads(),
        )
        return out

    def linear_plan(self, p: CpuPackedW8A8 | CpuPackedW8A16, in_q: ActivationQParams | None = None):
        """`linear_dynamic` (W8A8 weights, no `in_q`), `linear_static` (`in_q`: the calibrated input) or
        `linear_weight_only` (W8A16 weights) with every argument but the data worked out once: a function of a
        contiguous float32 cpu (..., K) tensor giving (..., N) float32, no reshapes (a decode step runs ~200 small
        linears: per-call Python is a visible share of it)."""
        k, n, isa = p.k, p.n, self._isa_id
        shape_n = (n,)
        if isinstance(p, CpuPackedW8A16):
            fn, args = _C.linear_wo, (p.packed.data_ptr(), p.scale.data_ptr(), p.group_size, _ptr(p.bias))

            def run_wo(x: torch.Tensor) -> torch.Tensor:
                out = torch.empty(x.shape[:-1] + shape_n, dtype=torch.float32)
                fn(x.data_ptr(), k, x.numel() // k, k, *args, out.data_ptr(), n, n, isa, torch.get_num_threads())
                return out

            return run_wo
        w, colsum, scale, bias, _ = p.addresses
        plan = _C.LinearPlan(k, n, p.kp, *_row_quant(in_q), w, colsum, scale, bias, isa).run

        def run(x: torch.Tensor) -> torch.Tensor:
            out = torch.empty(x.shape[:-1] + shape_n, dtype=torch.float32)
            plan(x.data_ptr(), x.numel() // k, out.data_ptr(), torch.get_num_threads())
            return out

        return run

    def pack_conv(self, weight, scale, bias, groups, clamp_hi: torch.Tensor | None = None) -> CpuPackedConv:
        o, cg, kh, kw = weight.shape
        check_k(cg * kh * kw)
        b = None if bias is None else bias.detach().to(torch.float32).contiguous()
        s = scale.to(torch.float32).contiguous()
        hi = None if clamp_hi is None else clamp_hi.to(torch.float32).contiguous()
        if groups > 1 and cg == 1 and o == groups:
            # (kh, kw, C) 32-bit lanes: int16 weight in the low half, 0 in the high half (see the C++ kernel)
            dw = (weight[:, 0].permute(1, 2, 0).to(torch.int32) & 0xFFFF).contiguous()
            return CpuPackedConv(groups, (kh, kw), o, dw, s, b, (), hi)
        og = o // groups
        gemms = tuple(
            self.pack_w8a8(
                weight[g * og : (g + 1) * og].permute(0, 2, 3, 1).reshape(og, kh * kw * cg),
                s[g * og : (g + 1) * og],
                None if b is None else b[g * og : (g + 1) * og],
                None if hi is None else hi[g * og : (g + 1) * og],
            )
            for g in range(groups)
        )
        return CpuPackedConv(groups, (kh, kw), o, None, s, b, gemms, hi)

    def quantize_nhwc(self, x: torch.Tensor, q: ActivationQParams, out: torch.Tensor | None = None) -> torch.Tensor:
        """(N, C, H, W) float -> (N, H, W, C) uint8 codes, written into `out` if given. No float copy when x is
        float32 in channels_last or contiguous (NCHW: the layout change is fused with the quantization)."""
        if x.dim() != 4:
            raise ValueError(f"expected an (N, C, H, W) activation, got shape {tuple(x.shape)}")
        if x.device.type != "cpu":
            raise ValueError(f"activation is on {x.device}; the cpu backend needs a cpu tensor")
        n, c, h, w = x.shape
        if out is None:
            out = torch.empty((n, h, w, c), dtype=torch.uint8)
        elif out.shape != (n, h, w, c) or out.dtype != torch.uint8 or not out.is_contiguous():
            raise ValueError(f"quantize_nhwc: out must be contiguous uint8 {(n, h, w, c)}, got {out.dtype} {out.shape}")
        x_nhwc = x.permute(0, 2, 3, 1)
        if x.dtype == torch.float32 and x_nhwc.is_contiguous():
            self._quantize_into(x_nhwc, q.scale, q.zero_point, q.dtype, out)
            return out
        x = x.to(torch.float32).contiguous()
        shift = 128 if q.dtype is QDtype.INT8 else 0
        args = (x.data_ptr(), n, c, h * w, q.scale, q.zero_point, *q.dtype.qrange(), shift, out.data_ptr())
        _C.quantize_nchw_nhwc(*args, self._isa_id, torch.get_num_threads())
        return out

    def _quantize_into(self, x: torch.Tensor, scale: float, zero_point: int, dtype: QDtype, out: torch.Tensor) -> None:
        """Contiguous float32 x -> u8 codes in `out` (same element count): q (+128 for int8), saturated."""
        shift = 128 if dtype is QDtype.INT8 else 0
        _C.quantize_static(
            x.data_ptr(),
            out.numel(),
            scale,
            zero_point,
            *dtype.qrange(),
            shift,
            out.data_ptr(),
            self._isa_id,
            torch.get_num_threads(),
        )

    def conv2d_codes(self, a, p: CpuPackedConv, stride, padding, dilation, in_q: ActivationQParams, out_q=None):
        """NHWC int8 conv on (N, H, W, C) codes: im2col (none for 1x1 stride 1) + int8 GEMM, or the depthwise
        kernel. Padding reads the zero-point (real 0). Returns (N, Ho, Wo, O) float32, or codes given `out_q`.
        """
        if a.dim() != 4:
            raise ValueError(f"conv2d_codes expects (N, H, W, C) uint8 codes, got shape {tuple(a.shape)}")
        return self.conv_plan(a.shape, p, stride, padding, dilation, in_q, out_q)(a)

    def conv_spec(self, shape, p: CpuPackedConv, stride, padding, dilation, in_q: ActivationQParams, out_q=None):
        """The kernel calls of `conv2d_codes` for one (N, H, W, C) input shape, every argument but the data
        addresses worked out: a `ConvSpec` (run by `conv_plan`, or by a `ChainProgram` with its neighbours)."""
        n, h, w, c = shape
        kh, kw = p.kernel_size
        expected = (
            p.depthwise_weight.shape[2] if p.depthwise_weight is not None else p.gemms[0].k // (kh * kw) * p.groups
        )
        if c != expected:
            raise ValueError(f"conv2d_codes: input has {c} channels, the convolution expects {expected}")
        (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation
        pad_value = in_q.zero_point + in_q.shift
        ho = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
        wo = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
        out_shape, m, o = (n, ho, wo, p.out_channels), n * ho * wo, p.out_channels
        q_rest = () if out_q is None else _out_q_rest(out_q)  # the requantization arguments after the address
        # codes out: the kernels take the requantization's multiplier as column scales (row scale 1) and its int32
        # bias instead of the float bias (reference.requantize_codes)
        mult = bias_q = None
        if out_q is not None:
            mult, bias_q = requantization(in_q.scale, p.scale, p.bias, out_q.scale)
        if p.depthwise_weight is not None:  # taps outside the image are skipped in the kernel: no padded copy
            dw_args = (n, h, w, c, p.depthwise_weight.data_ptr(), kh, kw, sh, sw, ph, pw, dh, dw, ho, wo, pad_value)
            if out_q is None:
                dw_tail = (in_q.scale, p.scale.data_ptr(), _ptr(p.bias), _ptr(p.clamp_hi), 0)
            else:
                dw_tail = (1.0, mult.data_ptr(), 0, _ptr(p.clamp_hi), bias_q.data_ptr())
            return ConvSpec(torch.Size(shape), out_shape, q_rest, dw_args, dw_tail, (), (mult, bias_q))
        cg = c // p.groups
        offset = in_q.zero_point + in_q.shift
        elem = 1 if out_q else 4
        groups = []  # per group: (im2col arguments or None, lda, weights, tail, (M, N, Kp), column byte offset, ldy)
        keep = []
        for g, gemm in enumerate(p.gemms):
            pointwise = kh == kw == 1 and sh == sw == 1 and p.groups == 1 and gemm.kp == c
            cols = None if pointwise else (n, h, w, c, g * cg, cg, kh, kw, sh, sw, ph, pw, dh, dw, ho, wo, pad_value)
            if out_q is None:
                weights = (gemm.packed.data_ptr(), gemm.colsum.data_ptr(), offset, 0, in_q.scale, gemm.scale.data_ptr())
                tail = (_ptr(gemm.bias), _ptr(gemm.clamp_hi), 0)
            else:  # this group's columns, padded like the packed column scales
                span = slice(g * gemm.n, (g + 1) * gemm.n)
                gm, gb = _pad_to(mult[span], gemm.scale.numel()), _pad_to(bias_q[span], gemm.scale.numel())
                keep += [gm, gb]
                weights = (gemm.packed.data_ptr(), gemm.colsum.data_ptr(), offset, 0, 1.0, gm.data_ptr())
                tail = (0, _ptr(gemm.clamp_hi), gb.data_ptr())
            lda = gemm.kp if cols is not None else c
            groups.append((cols, lda, weights, tail, (m, gemm.n, gemm.kp), g * gemm.n * elem, o))
        return ConvSpec(torch.Size(shape), out_shape, q_rest, None, None, tuple(groups), tuple(keep))

    def conv_plan(self, shape, p: CpuPackedConv, stride, padding, dilation, in_q: ActivationQParams, out_q=None):
        """`conv2d_codes` for one input shape (see `conv_spec`): a function of the (N, H, W, C) codes and an
        optional `slot`: the result then goes to that per-thread scratch buffer (`scratch`) instead of a fresh
        tensor. QConv2d caches these (a few microseconds of Python per call instead of ~10)."""
        spec = self.conv_spec(shape, p, stride, padding, dilation, in_q, out_q)
        out_shape, q_rest, isa = spec.out_shape, spec.q_rest, self._isa_id
        out_dtype = torch.uint8 if q_rest else torch.float32

        def checked(a: torch.Tensor) -> torch.Tensor:
            if a.shape != spec.in_shape or a.dtype != torch.uint8 or not a.is_cpu or not a.is_contiguous():
                raise ValueError(
                    f"conv2d_codes expects contiguous cpu (N, H, W, C) uint8 codes of shape {tuple(spec.in_shape)}, "
                    f"got {a.dtype} {tuple(a.shape)} on {a.device}"
                )
            return a

        def output(slot: str | None) -> torch.Tensor:
            return torch.empty(out_shape, dtype=out_dtype) if slot is None else scratch(slot, out_shape, out_dtype)

        # a one-step kernel program: the step's arguments and epilogue constants worked out once, here (per call they
        # were ~20 arguments and a few vectors of the output channels)
        step, cols_bytes = self._conv_step(spec, 0, 3)
        program, cols_bytes = _C.ChainProgram([step]).run, max(cols_bytes, 1)

        def run(a: torch.Tensor, slot: str | None = None) -> torch.Tensor:
            a = checked(a)
            y = output(slot)
            cols = scratch("im2col", (cols_bytes,))  # the slot of a chain program's columns
            program((a.data_ptr(), 0, 0, y.data_ptr(), cols.data_ptr()), isa, torch.get_num_threads())
            return y

        return run

    @staticmethod
    def _conv_step(spec: ConvSpec, src: int, dst: int) -> tuple[tuple, int]:
        """A ChainProgram step running `spec` from buffer `src` into `dst`, and the im2col bytes it needs."""
        if spec.dw_args is not None:
            return ("dw", src, dst, spec.q_rest, spec.dw_args, spec.dw_tail), 0
        cols = max([0] + [g[4][0] * g[4][2] for g in spec.groups if g[0] is not None])
        return ("gemm", src, dst, spec.q_rest, list(spec.groups)), cols

    def chain_program(self, specs: list[ConvSpec]) -> ChainPlan:
        """Consecutive convolutions handing codes to each other (every spec but the last requantizes for the
        next, the last gives float) as one kernel call per run: a `ChainPlan`."""
        steps, cols_bytes, codes_bytes = [], 0, 0
        for i, spec in enumerate(specs):
            last = i == len(specs) - 1
            if last == bool(spec.q_rest) or (i and spec.in_shape != specs[i - 1].out_shape):
                raise ValueError("chain_program: specs must chain, codes out of all but the last, float out of it")
            src, dst = (0 if i == 0 else 1 + (i - 1) % 2), (3 if last else 1 + i % 2)
            step, cols = self._conv_step(spec, src, dst)
            steps.append(step)
            cols_bytes = max(cols_bytes, cols)
            if not last:
                codes_bytes = max(codes_bytes, math.prod(spec.out_shape))
        return ChainPlan(
            _C.ChainProgram(steps),
            self._isa_id,
            specs[0].in_shape,
            specs[-1].out_shape,
            len(specs) - 1,
            codes_bytes,
            cols_bytes,
            tuple(spec.keep for spec in specs),
        )

    def block_program(self, units: list[tuple]) -> BlockPlan:
        """A sequence of convolution blocks as one kernel program. Per unit: (residual, its convolutions' specs,
        the next unit's input quantization or None for the last, the spec of a branch convolution on the unit's
        input (a ResNet downsample) or None, ReLU after the residual add). Inside a unit the specs hand codes on;
        a unit whose last spec requantizes hands its codes to the next unit directly; one whose last spec gives
        float (a residual block, or one whose output the next block adds) is followed by an add-and-quantize step:
        y = v + r (the unit's float input, or its branch's float output; then the ReLU), and the next unit's codes
        from y (quantize_static's rounding): the arithmetic of running the blocks one by one. A first unit that
        adds its own input reads it from buffer 7 (`BlockPlan.float_input`). Buffers: 0 input codes, 1 / 2 codes,
        3 the result, 4 im2col columns, 5 / 6 floats kept for an add, 7 the float input."""
        if not units or not units[0][1]:
            raise ValueError("block_program: every unit needs specs")
        steps, cols_bytes, codes_bytes, float_bytes = [], 0, 0, 0
        shape = units[0][1][0].in_shape
        cur, float_in, float_in_shape = 0, 7, shape  # unit 0's float input: the program's (buffer 7)
        uses_float_input = False
        for i, (residual, specs, next_q, branch, relu) in enumerate(units):
            final = i == len(units) - 1
            if not specs or final != (next_q is None) or (branch is not None and not residual):
                raise ValueError("block_program: every unit needs specs, a branch only with a residual add")
            unit_in, out_shape = shape, specs[-1].out_shape
            vbuf = 3 if final else (6 if float_in == 5 else 5)
            rbuf = -1
            if residual and branch is not None:
                if branch.in_shape != unit_in or branch.q_rest or branch.out_shape != out_shape:
                    raise ValueError("block_program: a branch reads the unit's input and gives float like its output")
                rbuf = 5 if vbuf != 5 else 6
                step, cols = self._conv_step(branch, cur, rbuf)
                steps.append(step)
                cols_bytes = max(cols_bytes, cols)
                float_bytes = max(float_bytes, 4 * math.prod(out_shape))
            elif residual:
                if float_in is None:
                    raise ValueError("block_program: a residual unit needs a float input")
                if float_in_shape != out_shape:
                    raise ValueError("block_program: a residual add needs equal shapes")
                rbuf = float_in
                uses_float_input = uses_float_input or float_in == 7
            float_out = None
            for j, spec in enumerate(specs):
                last = j == len(specs) - 1
                if spec.in_shape != shape or (not last and not spec.q_rest) or (last and final and spec.q_rest):
                    raise ValueError("block_program: specs must chain (codes between them, float out of the last)")
                shape = spec.out_shape
                if spec.q_rest:  # codes for the next conv (of this unit or the next one)
                    if last and residual:
                        raise ValueError("block_program: a residual unit's last convolution must give float")
                    dst = 2 if cur == 1 else 1
                    step, cols = self._conv_step(spec, cur, dst)
                    cur = dst
                    codes_bytes = max(codes_bytes, math.prod(spec.out_shape))
                else:
                    step, cols = self._conv_step(spec, cur, vbuf)
                    float_out = vbuf
                    if not final:
                        float_bytes = max(float_bytes, 4 * math.prod(spec.out_shape))
                steps.append(step)
                cols_bytes = max(cols_bytes, cols)
            if float_out is not None and (residual or next_q is not None):
                n = math.prod(out_shape)
                cdst = (2 if cur == 1 else 1) if next_q is not None else -1
                rest = _out_q_rest(next_q) if next_q is not None else ()
                steps.append(("addq", vbuf, vbuf, rbuf, cdst, n, rest, bool(relu and residual)))
                if next_q is not None:
                    cur = cdst
                    codes_bytes = max(codes_bytes, n)
            float_in, float_in_shape = float_out, out_shape
        return BlockPlan(
            _C.ChainProgram(steps),
            self._isa_id,
            units[0][1][0].in_shape,
            units[-1][1][-1].out_shape,
            (codes_bytes, cols_bytes, float_bytes),
            uses_float_input,
            tuple(step[0] for step in steps),
            tuple(spec.keep for _, specs, _, branch, _ in units for spec in (*specs, *((branch,) if branch else ()))),
        )

    def conv2d_static(self, x, p: CpuPackedConv, stride, padding, dilation, in_q: ActivationQParams):
        """Float (N, C, H, W) in, float (N, O, Ho, Wo) out, in channels_last memory (no copy back)."""
        y = self.conv2d_codes(self.quantize_nhwc(x, in_q), p, stride, padding, dilation, in_q)
        return y.permute(0, 3, 1, 2)


def _row_quant(in_q: ActivationQParams | None) -> tuple:
    """linear_u8s8's activation arguments (scale, zero-point, qmin, qmax, shift): per-token (scale < 0) without
    `in_q`, else the static qparams (the float32 scale the reference uses, validated positive)."""
    if in_q is None:
        return (-1.0, 0, *QDtype.INT8.qrange(), 128)
    return (in_q.scale, in_q.zero_point, *in_q.dtype.qrange(), in_q.shift)


def _out_q_rest(q: ActivationQParams) -> tuple:
    """(scale, zero-point, qmin, qmax, shift): the kernels' requantized-output argument after the address."""
    qmin, qmax = q.dtype.qrange()
    return (q.scale, q.zero_point, qmin, qmax, q.shift)


def _as_f32_rows(x: torch.Tensor) -> torch.Tensor:
    if x.dim() != 2:
        raise ValueError(f"expected a 2-D (M, K) activation, got shape {tuple(x.shape)}")
    if x.device.type != "cpu":
        raise ValueError(f"activation is on {x.device}; the cpu backend needs a cpu tensor")
    x = x.to(torch.float32)
    return x if x.stride(1) == 1 else x.contiguous()
