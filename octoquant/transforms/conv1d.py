"""conv1d_as_conv2d: nn.Conv1d as a height-1 nn.Conv2d, so 1-D convolutions (audio front ends, time series, the
feature encoders of wav2vec2-style models) run on the int8 convolution kernels. A float identity (tested).
"""

from __future__ import annotations

import torch
from torch import nn

from ..nn.conv import explicit_padding


class Conv1dAs2d(nn.Module):
    """y = conv2d(x[:, :, None, :])[:, :, 0, :]: nn.Conv1d's function, its weight (O, C/g, k) held as (O, C/g, 1, k)
    in `conv2d` (a layer oq.quantize turns into a QConv2d). It answers nn.Conv1d's shape attributes (`in_channels`,
    `out_channels`, `kernel_size`, `stride`, `padding`, `dilation`, `groups`, as 1-tuples), which models read (Whisper
    sizes its input from `conv1.stride`); the weight lives in `conv2d`."""

    def __init__(self, conv2d: nn.Conv2d) -> None:
        super().__init__()
        self.conv2d = conv2d
        self.in_channels, self.out_channels, self.groups = conv2d.in_channels, conv2d.out_channels, conv2d.groups
        self.kernel_size, self.stride = conv2d.kernel_size[1:], conv2d.stride[1:]
        self.padding, self.dilation = conv2d.padding[1:], conv2d.dilation[1:]
        self.padding_mode = "zeros"

    @classmethod
    def from_float(cls, conv: nn.Conv1d) -> Conv1dAs2d:
        padding = explicit_padding(conv)
        if padding is None:
            raise ValueError(
                f"Conv1dAs2d needs zero padding, the same on both sides; got {conv.padding!r}/{conv.padding_mode}"
            )
        with torch.device("meta"):  # parameters replaced below by the convolution's own, reshaped
            c2 = nn.Conv2d(
                conv.in_channels,
                conv.out_channels,
                (1, conv.kernel_size[0]),
                (1, conv.stride[0]),
                (0, padding[0]),
                (1, conv.dilation[0]),
                conv.groups,
                conv.bias is not None,
            )
        c2.weight = nn.Parameter(conv.weight.detach().unsqueeze(2).clone(), requires_grad=conv.weight.requires_grad)
        if conv.bias is not None:
            c2.bias = nn.Parameter(conv.bias.detach().clone(), requires_grad=conv.bias.requires_grad)
        new = cls(c2)
        new.train(conv.training)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2:  # unbatched (C, L), as nn.Conv1d accepts
            return self.conv2d(x[None, :, None, :])[0, :, 0, :]
        return self.conv2d(x.unsqueeze(2)).squeeze(2)


def conv1d_as_conv2d(model: nn.Module) -> list[str]:
    """Replace every nn.Conv1d with zero padding, the same on both sides ("valid", "same" with an odd kernel, explicit),
    by a Conv1dAs2d in place; returns their names (others, e.g. circular padding, stay nn.Conv1d: float)."""
    names = [n for n, m in model.named_modules() if type(m) is nn.Conv1d and n and explicit_padding(m) is not None]
    for name in names:
        model.set_submodule(name, Conv1dAs2d.from_float(model.get_submodule(name)))
    return names
