"""Float-identity rewrites applied before rounding (each tested to leave the FP32 output unchanged)."""

from .batchnorm import fold_batchnorm
from .equalize import ChannelClamp, equalize_depthwise, find_depthwise_pairs
from .fuse import activation_upper, find_conv_activation_pairs

__all__ = [
    "fold_batchnorm",
    "equalize_depthwise",
    "find_depthwise_pairs",
    "ChannelClamp",
    "find_conv_activation_pairs",
    "activation_upper",
]
