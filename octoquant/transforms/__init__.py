"""Float-identity rewrites applied before rounding (each tested to leave the FP32 output unchanged)."""

from .batchnorm import fold_batchnorm

__all__ = ["fold_batchnorm"]
