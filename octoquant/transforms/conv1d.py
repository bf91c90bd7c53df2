"""conv1d_as_conv2d: nn.Conv1d as a height-1 nn.Conv2d, so 1-D convolutions (audio front ends, time series, the
feature encoders of wav2vec2-style models) run on the int8 convolution kernels. A float identity (tested).
"""

from __future__ import annotations

import torch
from torch import nn


class Conv1dAs2d(nn.Module):
    """y = conv2d(x[:, :, None, :])[:, :, 0, :]: nn.Conv1d's function, its weight (O, C/g, k) held as (O, C/g, 1, k)
    in `conv2d` (a layer oq.quantize turns into a QConv2d)."""

    def __init__(self, conv2d: nn.Conv2d) -> None:
        super().__init__()
        self.conv2d = conv2d

    @classmethod
    def from_float(cls, conv: nn.Conv1d) -> Conv1dAs2d:
        with torch.device("meta"):  # parameters replaced below by the convolution's own, reshaped
            c2 = nn.Conv2d(
                conv.in_channels,
                conv.out_channels,
                (1, conv.kernel_size[0]),
                (1, conv.stride[0]),
                (0, conv.padding[0]),
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
    """Replace every nn.Conv1d with explicit zero padding by a Conv1dAs2d in place; returns their names (others, e.g.
    padding="same" or circular padding, stay nn.Conv1d: float)."""
    names = [
        n
        for n, m in model.named_modules()
        if type(m) is nn.Conv1d and n and m.padding_mode == "zeros" and not isinstance(m.padding, str)
    ]
    for name in names:
        model.set_submodule(name, Conv1dAs2d.from_float(model.get_submodule(name)))
    return names
