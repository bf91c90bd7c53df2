"""One table of kernel backends. Each row implements the same ops:

    int8_mm(a int8 (M,K), b int8 (K,N)) -> int32 (M,N)          exact
    quantize_per_token(x (M,K)) -> (int8 (M,K), scale (M,))     symmetric absmax per row
    pack_w8a8 / linear_dynamic / linear_static                  int8 x int8 -> int32 -> rescale + bias
    pack_w8a16 / linear_weight_only                             int8 weights, float activations
    pack_conv / quantize_nhwc / conv2d_codes / conv2d_static    NHWC uint8 codes in; float32 out, or codes
                                                                requantized in the epilogue (ActivationQParams)

`reference` is the spec (pure torch); `cpu` is octoquant's own C++ (AVX-512 VNNI / AVX2) and `cuda` Triton
kernels on INT8 tensor cores (run in Triton's interpreter on CPU for CI), both tested bit-exact against it.
`default_backend()` picks the fastest available CPU row and logs once when it has to fall back; modules whose
weights live on a GPU use `cuda` (see `backend_for`). The `cpu` row also offers call plans, the same ops with
their arguments worked out once: `conv_plan` (per input shape, writing into a per-thread reusable buffer if
given its slot: `cpu.scratch`, so a forward pass allocates no multi-MB tensor per layer), `chain_program`
(consecutive convolutions handing codes on, from their `conv_spec`s, run in one kernel call) and `linear_plan`
(a QLinear's fused quantize + GEMM on any contiguous (..., K) input); QConv2d, ConvChain and QLinear cache them.
Also `quantize_nhwc(..., out=)`.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable

import torch

from .cpu import CpuBackend, available_isas, best_isa
from .reference import MAX_K, ReferenceBackend

log = logging.getLogger("octoquant.kernels")


def _cuda_backend() -> object:
    from .cuda import CudaBackend  # imports Triton: only when asked for

    return CudaBackend()


# name -> factory; a factory raises if the row cannot run on this machine
BACKENDS: dict[str, Callable[[], object]] = {
    "reference": ReferenceBackend,
    "cpu": CpuBackend,
    "cuda": _cuda_backend,
}


@functools.cache
def get_backend(name: str) -> object:
    """The backend called `name`; unknown names raise ValueError listing the valid ones."""
    try:
        factory = BACKENDS[name]
    except KeyError:
        raise ValueError(f"unknown kernel backend {name!r}; valid: {', '.join(BACKENDS)}") from None
    return factory()


@functools.cache
def default_backend() -> object:
    """`cpu` when the extension is built and the CPU has AVX2 or better; else `reference`, logged once."""
    isa = best_isa()
    if isa in ("avx2", "avx512vnni"):
        return get_backend("cpu")
    reason = "octoquant._C is not built" if isa is None else "this CPU has neither AVX2 nor AVX-512 VNNI"
    log.warning("octoquant: %s; using the pure-torch reference kernels (exact, slow)", reason)
    return get_backend("reference")


def backend_for(device: torch.device) -> object:
    """The backend for tensors on `device`: `cuda` on a GPU, else `default_backend()`."""
    return get_backend("cuda") if device.type == "cuda" else default_backend()


__all__ = [
    "backend_for",
    "BACKENDS",
    "get_backend",
    "default_backend",
    "CpuBackend",
    "ReferenceBackend",
    "available_isas",
    "MAX_K",
]
