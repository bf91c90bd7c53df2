"""Closed sets and frozen specs: integer dtypes, granularities, and the quantization scheme."""

from __future__ import annotations

import enum
from dataclasses import dataclass, replace

import torch

__all__ = [
    "QDtype",
    "PerTensor",
    "PerChannel",
    "PerToken",
    "PerGroup",
    "Granularity",
    "QScheme",
    "QuantMode",
]


class QDtype(enum.Enum):
    """An 8-bit integer storage type: 256 levels, signed or unsigned."""

    INT8 = "int8"
    UINT8 = "uint8"

    @property
    def torch_dtype(self) -> torch.dtype:
        return torch.int8 if self is QDtype.INT8 else torch.uint8

    def qrange(self, narrow_range: bool = False) -> tuple[int, int]:
        """(qmin, qmax). Narrow range drops the lowest level (int8: -127..127, uint8: 1..255)."""
        lo, hi = (-128, 127) if self is QDtype.INT8 else (0, 255)
        return (lo + 1, hi) if narrow_range else (lo, hi)

    @classmethod
    def parse(cls, value: QDtype | str | torch.dtype) -> QDtype:
        if isinstance(value, cls):
            return value
        if value is torch.int8:
            return cls.INT8
        if value is torch.uint8:
            return cls.UINT8
        try:
            return cls(value)
        except ValueError:
            valid = ", ".join(m.value for m in cls)
            raise ValueError(f"unsupported quantized dtype {value!r}; valid: {valid}") from None


@dataclass(frozen=True)
class PerTensor:
    """One scale for the whole tensor. Scale shape: ()."""


@dataclass(frozen=True)
class PerChannel:
    """One scale per index along `axis` (weights: axis 0 = output channel). Scale shape: (x.shape[axis],)."""

    axis: int = 0


@dataclass(frozen=True)
class PerToken:
    """One scale per row of an activation: reduce over the last dim. Scale shape: x.shape[:-1]."""


@dataclass(frozen=True)
class PerGroup:
    """One scale per `group_size` consecutive values along the last (input) dim.

    Scale shape: x.shape[:-1] + (x.shape[-1] // group_size,).
    """

    group_size: int

    def __post_init__(self) -> None:
        if not isinstance(self.group_size, int) or self.group_size < 1:
            raise ValueError(f"group_size must be a positive int, got {self.group_size!r}")


Granularity = PerTensor | PerChannel | PerToken | PerGroup


@dataclass(frozen=True)
class QScheme:
    """How one tensor is mapped to integers."""

    dtype: QDtype = QDtype.INT8
    symmetric: bool = True
    narrow_range: bool = False
    granularity: Granularity = PerTensor()

    def __post_init__(self) -> None:
        object.__setattr__(self, "dtype", QDtype.parse(self.dtype))
        if not isinstance(self.granularity, PerTensor | PerChannel | PerToken | PerGroup):
            raise ValueError(
                f"granularity must be PerTensor(), PerChannel(axis), PerToken() or PerGroup(size), "
                f"got {self.granularity!r}"
            )

    @property
    def qrange(self) -> tuple[int, int]:
        return self.dtype.qrange(self.narrow_range)

    def replace(self, **changes) -> QScheme:
        return replace(self, **changes)


class QuantMode(enum.Enum):
    """How a quantized layer computes."""

    W8A8_STATIC = "w8a8_static"  # int8 weights (per channel), activations with calibrated per-tensor qparams
    W8A8_DYNAMIC = "w8a8_dynamic"  # int8 weights, activations quantized per token at run time
    W8A16 = "w8a16"  # int8 weights (per channel or per group), float activations

    @classmethod
    def parse(cls, value: QuantMode | str) -> QuantMode:
        if isinstance(value, cls):
            return value
        try:
            return cls(value)
        except ValueError:
            raise ValueError(f"unknown quant mode {value!r}; valid: {', '.join(m.value for m in cls)}") from None
