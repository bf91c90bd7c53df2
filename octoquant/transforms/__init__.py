"""Float-identity rewrites applied before rounding (each tested to leave the FP32 output unchanged)."""

from .attention import DecomposedMultiheadAttention, decompose_multihead_attention
from .batchnorm import fold_batchnorm
from .conv1d import Conv1dAs2d, conv1d_as_conv2d
from .equalize import (
    ChannelClamp,
    ChannelGroup,
    equalize_channels,
    equalize_depthwise,
    find_channel_groups,
    find_depthwise_pairs,
)
from .fuse import activation_upper, find_conv_activation_pairs

__all__ = [
    "DecomposedMultiheadAttention",
    "decompose_multihead_attention",
    "fold_batchnorm",
    "Conv1dAs2d",
    "conv1d_as_conv2d",
    "equalize_depthwise",
    "equalize_channels",
    "find_channel_groups",
    "ChannelGroup",
    "find_depthwise_pairs",
    "ChannelClamp",
    "find_conv_activation_pairs",
    "activation_upper",
]
