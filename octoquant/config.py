"""Closed sets and frozen specs: integer dtypes, granularities, and the quantization scheme."""

from __future__ import annotations

import enum
import fnmatch
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
    "Calibrator",
    "Rounding",
    "Config",
    "W8A8",
    "W8A8_DYNAMIC",
    "W8A16",
]


class _ParseEnum(enum.Enum):
    """Enum built from itself or its value; an unknown value raises ValueError listing the valid ones."""

    @classmethod
    def parse(cls, value):
        if isinstance(value, cls):
            return value
        try:
            return cls(value)
        except ValueError:
            valid = ", ".join(m.value for m in cls)
            raise ValueError(f"unknown {cls._label()} {value!r}; valid: {valid}") from None

    @classmethod
    def _label(cls) -> str:
        return cls.__name__


class QDtype(_ParseEnum):
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
        if value is torch.int8:
            return cls.INT8
        if value is torch.uint8:
            return cls.UINT8
        return super().parse(value)

    @classmethod
    def _label(cls) -> str:
        return "quantized dtype"


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


class QuantMode(_ParseEnum):
    """How a quantized layer computes."""

    W8A8_STATIC = "w8a8_static"  # int8 weights (per channel), activations with calibrated per-tensor qparams
    W8A8_DYNAMIC = "w8a8_dynamic"  # int8 weights, activations quantized per token at run time
    W8A16 = "w8a16"  # int8 weights (per channel or per group), float activations

    @classmethod
    def _label(cls) -> str:
        return "quant mode"


class Calibrator(_ParseEnum):
    """How a static activation range is chosen from calibration data."""

    MINMAX = "minmax"
    MOVING_AVERAGE = "moving_average"
    PERCENTILE = "percentile"
    ENTROPY = "entropy"
    MSE = "mse"
    AUTO = "auto"  # per tensor: whichever of the above gives the smallest layer-output error vs FP32

    @classmethod
    def _label(cls) -> str:
        return "calibrator"


class Rounding(_ParseEnum):
    """How weights are rounded onto their int8 grid."""

    NEAREST = "nearest"  # round half to even, each weight alone
    GPTQ = "gptq"  # error-compensated, column by column, with the calibration inputs' Hessian

    @classmethod
    def _label(cls) -> str:
        return "rounding"


@dataclass(frozen=True)
class Config:
    """What `oq.quantize` does to each layer. Vary presets with `.replace(...)`; strings are accepted for enums.

    Attributes:
        mode: static W8A8, dynamic W8A8 (per-token activations) or weight-only W8A16.
        weight_granularity: PerChannel(0) (default) or PerTensor(); PerGroup(size) in W8A16 only.
        weight_calibrator: "minmax" or "mse" for the per-channel weight clip.
        activation_dtype: static activations as "uint8" (asymmetric, default) or "int8" (symmetric).
        calibrator: static activation range: minmax, moving_average, percentile, entropy, mse or auto. Default
            (None): minmax on token models (an nn.Embedding feeds them: transformers, LLMs), where clipping the
            rare very large tokens (attention sinks) costs more than the resolution it buys; mse otherwise
            (CNNs). Measured: SmolLM2 static + SmoothQuant perplexity +5.6% (minmax) vs +10.7% (mse); MiniLM
            cosine 0.9934 vs 0.9927; MobileNetV2 agreement 0.891 (mse) vs lower with minmax (RESULTS.md).
        percentile: the percentile of the percentile calibrator.
        bias_correction: static W8A8: shift each layer's bias by the mean output error seen in calibration.
        weight_rounding: "nearest", or "gptq" (error-compensated rounding; needs calibration data).
        equalize_depthwise: static/dynamic W8A8: rescale the channels feeding each depthwise conv to one range
            (a float identity; needs calibration data).
        equalize_channels: static W8A8 with per-channel weights: rescale every activation between Conv2d producers
            and dense Conv2d consumers (residual streams through their adds, depthwise -> pointwise pairs) channel
            by channel, alpha searched per group on the consumers' int8 output error (a float identity; needs
            calibration data). MobileNetV2 all-int8: agreement 0.891 -> 0.914, KL 0.0328 -> 0.0271 (RESULTS.md).
            Runs with the mse, minmax and auto calibrators (measured to hurt percentile and entropy).
        smoothquant: with calibration data: migrate activation outliers into the weights, alpha searched per
            (producer -> linears) pair (a float identity); in W8A16 the same search on float activations scales
            the weight columns of large-activation channels up before rounding (AWQ's activation-aware scaling).
            Pairs come from a table for Hugging Face Llama / Mistral / Qwen / GPT-2, and for any other model from one
            traced forward (norm -> the linears reading its output, linear -> linear), each kind kept only if moving
            power-of-two scales through it leaves the output bit-identical (post-norm residuals, GELU or softmax in
            between fail it) and the producer's parameters can divide its output (Gemma's (1 + weight) norms
            included), and searched only where the input has outlier channels (range >= 8x the median channel's:
            random-weight CLIP lost 13 dB on its text embeddings with every traced pair smoothed). A warning names
            the blocks when nothing folds.
        head_weight_only: W8A8 on a Hugging Face model: its output head (lm_head) is quantized weight-only
            (W8A16, per-channel), and a head tied to the input embedding stays tied (one int8 matrix serves
            both); `exclude=["lm_head"]` keeps it float. `head_granularity`: PerChannel(0) or PerGroup(size).
        outlier_threshold: dynamic W8A8 only: LLM.int8() decomposition. Input columns holding any |x| above it
            are computed in float (with the dequantized weight columns), the rest in int8; found at run time.
        overrides: (glob, Config) pairs: a module whose name matches uses that config (the last match wins).
    """

    mode: QuantMode = QuantMode.W8A8_STATIC
    weight_granularity: Granularity = PerChannel(0)
    weight_calibrator: Calibrator = Calibrator.MINMAX
    activation_dtype: QDtype = QDtype.UINT8
    # None: by model kind (`with_default_calibrator`): minmax for token models, mse otherwise (both measured best)
    calibrator: Calibrator | None = None
    percentile: float = 99.99
    bias_correction: bool = True
    weight_rounding: Rounding = Rounding.NEAREST
    equalize_depthwise: bool = True
    equalize_channels: bool = True
    smoothquant: bool = True
    head_weight_only: bool = True
    head_granularity: Granularity = PerGroup(64)
    outlier_threshold: float | None = None
    overrides: tuple[tuple[str, Config], ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "mode", QuantMode.parse(self.mode))
        if self.calibrator is not None:
            object.__setattr__(self, "calibrator", Calibrator.parse(self.calibrator))
        object.__setattr__(self, "weight_calibrator", Calibrator.parse(self.weight_calibrator))
        object.__setattr__(self, "activation_dtype", QDtype.parse(self.activation_dtype))
        object.__setattr__(self, "weight_rounding", Rounding.parse(self.weight_rounding))
        if self.weight_rounding is Rounding.GPTQ and not isinstance(self.weight_granularity, PerChannel | PerTensor):
            raise ValueError("gptq rounding works with per-channel or per-tensor weight scales")
        g = self.weight_granularity
        if isinstance(g, PerChannel) and g.axis != 0:
            raise ValueError(f"weights are quantized per output channel (axis 0), got {g!r}")
        if isinstance(g, PerGroup) and self.mode is not QuantMode.W8A16:
            raise ValueError("per-group weights are supported in W8A16 mode only")
        if not isinstance(g, PerTensor | PerChannel | PerGroup):
            raise ValueError(f"weight_granularity must be PerTensor(), PerChannel(0) or PerGroup(size), got {g!r}")
        if self.weight_calibrator not in (Calibrator.MINMAX, Calibrator.MSE):
            raise ValueError(f"weight_calibrator must be minmax or mse, got {self.weight_calibrator.value}")
        if not isinstance(self.head_granularity, PerChannel | PerGroup):
            raise ValueError(f"head_granularity must be PerChannel(0) or PerGroup(size), got {self.head_granularity!r}")
        if self.outlier_threshold is not None:
            if self.mode is not QuantMode.W8A8_DYNAMIC:
                raise ValueError("outlier_threshold (LLM.int8() decomposition) applies to dynamic W8A8 only")
            if not self.outlier_threshold > 0:
                raise ValueError(f"outlier_threshold must be > 0, got {self.outlier_threshold}")
        if not 50.0 < self.percentile <= 100.0:
            raise ValueError(f"percentile must be in (50, 100], got {self.percentile}")
        pairs = tuple(self.overrides.items()) if isinstance(self.overrides, dict) else tuple(self.overrides)
        for pair in pairs:
            if len(pair) != 2 or not isinstance(pair[0], str) or not isinstance(pair[1], Config):
                raise ValueError(f"overrides must be (glob, Config) pairs, got {pair!r}")
        object.__setattr__(self, "overrides", pairs)

    def replace(self, **changes) -> Config:
        return replace(self, **changes)

    def with_default_calibrator(self, token_model: bool) -> Config:
        """This config and its overrides with `calibrator=None` resolved: minmax for a token model, else mse."""
        default = Calibrator.MINMAX if token_model else Calibrator.MSE
        overrides = tuple((p, c.with_default_calibrator(token_model)) for p, c in self.overrides)
        return self.replace(calibrator=self.calibrator or default, overrides=overrides)

    def for_module(self, name: str) -> Config:
        """The config that applies to module `name` (the last matching override, else self)."""
        chosen = self
        for pattern, cfg in self.overrides:
            if fnmatch.fnmatchcase(name, pattern):
                chosen = cfg
        return chosen

    @property
    def needs_calibration(self) -> bool:
        return self.mode is QuantMode.W8A8_STATIC or any(c.needs_calibration for _, c in self.overrides)


W8A8 = Config()
W8A8_DYNAMIC = Config(mode=QuantMode.W8A8_DYNAMIC)
# weight-only: per-group scales of 64 inputs (measured on SmolLM2: perplexity +0.04% vs +0.45% per channel, same
# decode speed); layers whose input size 64 does not divide fall back to per-channel scales
W8A16 = Config(mode=QuantMode.W8A16, weight_granularity=PerGroup(64))
# LLM.int8() (Dettmers et al., 2022): per-token int8 with outlier input columns (|x| > 6) kept in float
LLM_INT8 = Config(mode=QuantMode.W8A8_DYNAMIC, outlier_threshold=6.0)
