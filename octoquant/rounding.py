"""Error-compensated weight rounding (GPTQ, Frantar et al. 2022) on fixed per-channel int8 scales.

Round-to-nearest rounds each weight alone. GPTQ rounds one input column at a time and pushes that
column's rounding error onto the columns not yet rounded, weighted by the inverse Hessian of the layer's
inputs (H = sum x x^T over calibration data), which minimises ||W X - W_q X||^2 greedily. Scales are
chosen before rounding (from the weights alone), so they stay independent of the calibration data.
"""

from __future__ import annotations

import torch

# Dampening added to the Hessian diagonal, as a fraction of its mean (the GPTQ paper's default).
GPTQ_DAMP = 0.01
GPTQ_BLOCK = 128


def gptq_round(
    weight: torch.Tensor,
    scale: torch.Tensor,
    hessian: torch.Tensor,
    qmin: int = -128,
    qmax: int = 127,
    damp: float = GPTQ_DAMP,
    block: int = GPTQ_BLOCK,
) -> torch.Tensor:
    """Int8 codes for `weight` with symmetric per-row `scale`, rounding order: input columns 0..K-1.

    Args:
        weight: (G, N, K) float: G independent groups (1 for a Linear, C for a depthwise conv).
        scale: (G, N) per-row scales (zero-point 0).
        hessian: (G, K, K) sum of x x^T of each group's inputs.

    Returns:
        (G, N, K) int8 codes.
    """
    g, n, k = weight.shape
    w = weight.detach().to(torch.float64).clone()
    s = scale.detach().to(torch.float64).unsqueeze(-1)  # (G, N, 1)
    h = hessian.detach().to(torch.float64).clone()
    diag = torch.diagonal(h, dim1=-2, dim2=-1)  # (G, K) view
    dead = diag == 0  # inputs that were always zero: their weights do not matter
    diag[dead] = 1.0
    w[dead.unsqueeze(1).expand_as(w)] = 0.0
    diag += damp * diag.mean(dim=-1, keepdim=True)
    chol = torch.linalg.cholesky(h)
    u = torch.linalg.cholesky(torch.cholesky_inverse(chol), upper=True)  # (G, K, K) upper factor of H^-1
    q = torch.empty(g, n, k, dtype=torch.float64)
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        w1 = w[:, :, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        u1 = u[:, i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = w1[:, :, i]  # (G, N)
            qc = torch.clamp(torch.round(col / s[:, :, 0]), qmin, qmax)
            q[:, :, i1 + i] = qc
            err = (col - qc * s[:, :, 0]) / u1[:, i, i].unsqueeze(1)  # (G, N)
            w1[:, :, i:] -= err.unsqueeze(2) * u1[:, i, i:].unsqueeze(1)
            err1[:, :, i] = err
        w[:, :, i2:] -= err1 @ u[:, i1:i2, i2:]
    return q.to(torch.int8)


def input_hessian_update(h: torch.Tensor | None, x: torch.Tensor, module: torch.nn.Module) -> torch.Tensor:
    """Add one batch of a Linear/Conv2d input to its (G, K, K) float64 Hessian sum x x^T."""
    if isinstance(module, torch.nn.Conv2d):
        groups, (kh, kw) = module.groups, module.kernel_size
        cg = module.in_channels // groups
        kg = cg * kh * kw
        if h is None:
            h = torch.zeros(groups, kg, kg, dtype=torch.float64)
        one_by_one = kh == kw == 1 and module.stride == (1, 1) and module.padding == (0, 0)
        for xi in x.detach().to(torch.float32):  # one image at a time bounds the im2col memory
            if one_by_one:
                cols = xi.reshape(groups, cg, -1)  # (G, K, L)
            else:
                cols = torch.nn.functional.unfold(
                    xi.unsqueeze(0), (kh, kw), module.dilation, module.padding, module.stride
                )[0].reshape(groups, kg, -1)
            h += torch.bmm(cols, cols.transpose(1, 2)).to(torch.float64)
        return h
    k = x.shape[-1]
    rows = x.detach().reshape(-1, k).to(torch.float32)
    if h is None:
        h = torch.zeros(1, k, k, dtype=torch.float64)
    h[0] += (rows.T @ rows).to(torch.float64)
    return h
