"""decompose_multihead_attention: torch's nn.MultiheadAttention as three projection Linears + the attention maths.

nn.MultiheadAttention keeps its query/key/value projection as one packed parameter (`in_proj_weight`, not a
module) and reads `out_proj.weight` directly in F.multi_head_attention_forward, so neither projection can be
swapped for an int8 layer. `DecomposedMultiheadAttention` holds q_proj, k_proj, v_proj and out_proj as nn.Linear
and computes what F.multi_head_attention_forward computes (its masks, need_weights and is_causal handling), so
that every projection is quantized, calibrated and smoothed like any Linear. A float identity up to the rounding
of three matmuls instead of one packed one (tested).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class DecomposedMultiheadAttention(nn.Module):
    """nn.MultiheadAttention (same call signature and outputs) with its projections as separate Linears.

    The fused inference fast paths of nn.MultiheadAttention / nn.TransformerEncoderLayer do not apply to it: it
    reports `in_proj_bias = None`, one of their off-switches, and computes with its modules instead.
    """

    in_proj_weight = None  # what nn.TransformerEncoderLayer's fast-path checks read
    in_proj_bias = None
    _qkv_same_embed_dim = True

    def __init__(self, embed_dim: int, num_heads: int, bias: bool, dropout: float, batch_first: bool) -> None:
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        self.embed_dim, self.num_heads, self.head_dim = embed_dim, num_heads, embed_dim // num_heads
        self.dropout, self.batch_first = dropout, batch_first
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.k_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.v_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias)

    @classmethod
    def from_float(cls, mha: nn.MultiheadAttention) -> DecomposedMultiheadAttention:
        e = mha.embed_dim
        bias = mha.in_proj_bias is not None
        with torch.device("meta"):  # parameters replaced below by slices of the attention's own
            new = cls(e, mha.num_heads, bias, mha.dropout, mha.batch_first)
        w, b = mha.in_proj_weight.detach(), None if not bias else mha.in_proj_bias.detach()
        for i, proj in enumerate((new.q_proj, new.k_proj, new.v_proj)):
            proj.weight = nn.Parameter(w[i * e : (i + 1) * e].clone(), requires_grad=mha.in_proj_weight.requires_grad)
            proj.bias = None if b is None else nn.Parameter(b[i * e : (i + 1) * e].clone())
        new.out_proj.weight = nn.Parameter(mha.out_proj.weight.detach().clone())
        new.out_proj.bias = None if mha.out_proj.bias is None else nn.Parameter(mha.out_proj.bias.detach().clone())
        new.train(mha.training)
        return new

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = True,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        is_batched = query.dim() == 3
        if self.batch_first and is_batched:  # (N, L, E) -> (L, N, E), the layout of the maths below
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        if not is_batched:
            query, key, value = (t.unsqueeze(1) for t in (query, key, value))
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        tgt_len, bsz, embed_dim = query.shape
        src_len = key.shape[0]
        if embed_dim != self.embed_dim:
            raise ValueError(f"expected embedding dimension {self.embed_dim}, got {embed_dim}")
        key_padding_mask = F._canonical_mask(
            mask=key_padding_mask,
            mask_name="key_padding_mask",
            other_type=F._none_or_dtype(attn_mask),
            other_name="attn_mask",
            target_type=query.dtype,
        )
        if is_causal and attn_mask is None:
            raise RuntimeError("Need attn_mask if specifying the is_causal hint (as nn.MultiheadAttention)")
        if is_causal and key_padding_mask is None and not need_weights:
            attn_mask = None
        else:
            attn_mask = F._canonical_mask(
                mask=attn_mask,
                mask_name="attn_mask",
                other_type=None,
                other_name="",
                target_type=query.dtype,
                check_other=False,
            )
            if key_padding_mask is not None:
                is_causal = False
        h, hd = self.num_heads, self.head_dim
        q = self.q_proj(query).view(tgt_len, bsz * h, hd).transpose(0, 1)  # (N*H, L, hd)
        k = self.k_proj(key).view(src_len, bsz * h, hd).transpose(0, 1)
        v = self.v_proj(value).view(src_len, bsz * h, hd).transpose(0, 1)
        if attn_mask is not None and attn_mask.dim() == 2:
            attn_mask = attn_mask.unsqueeze(0)
        if key_padding_mask is not None:
            kpm = key_padding_mask.view(bsz, 1, 1, src_len).expand(-1, h, -1, -1).reshape(bsz * h, 1, src_len)
            attn_mask = kpm if attn_mask is None else attn_mask + kpm
        dropout_p = self.dropout if self.training else 0.0
        if need_weights:
            q_scaled = q * math.sqrt(1.0 / float(hd))
            if attn_mask is not None:
                weights = torch.baddbmm(attn_mask, q_scaled, k.transpose(-2, -1))
            else:
                weights = torch.bmm(q_scaled, k.transpose(-2, -1))
            weights = F.softmax(weights, dim=-1)
            if dropout_p > 0.0:
                weights = F.dropout(weights, p=dropout_p)
            out = torch.bmm(weights, v).transpose(0, 1).reshape(tgt_len * bsz, embed_dim)
            out = self.out_proj(out).view(tgt_len, bsz, embed_dim)
            weights = weights.view(bsz, h, tgt_len, src_len)
            if average_attn_weights:
                weights = weights.mean(dim=1)
            if not is_batched:
                out, weights = out.squeeze(1), weights.squeeze(0)
        else:
            if attn_mask is not None:
                if attn_mask.size(0) == 1 and attn_mask.dim() == 3:
                    attn_mask = attn_mask.unsqueeze(0)
                else:
                    attn_mask = attn_mask.view(bsz, h, -1, src_len)
            q, k, v = q.view(bsz, h, tgt_len, hd), k.view(bsz, h, src_len, hd), v.view(bsz, h, src_len, hd)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask, dropout_p, is_causal)
            out = out.permute(2, 0, 1, 3).reshape(bsz * tgt_len, embed_dim)
            out = self.out_proj(out).view(tgt_len, bsz, embed_dim)
            weights = None
            if not is_batched:
                out = out.squeeze(1)
        if self.batch_first and is_batched:
            out = out.transpose(0, 1)
        return out, weights

    def extra_repr(self) -> str:
        return f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, batch_first={self.batch_first}"


def _decomposable(m: nn.Module) -> bool:
    return (
        type(m) is nn.MultiheadAttention
        and m._qkv_same_embed_dim
        and m.bias_k is None
        and m.bias_v is None
        and not m.add_zero_attn
    )


def decompose_multihead_attention(model: nn.Module) -> list[str]:
    """Replace every nn.MultiheadAttention (same embed dim for q/k/v, no bias_k/bias_v, no add_zero_attn) with a
    DecomposedMultiheadAttention in place; returns their names. Others stay as they are (their out_proj float)."""
    names = [n for n, m in model.named_modules() if _decomposable(m) and n]
    for name in names:
        model.set_submodule(name, DecomposedMultiheadAttention.from_float(model.get_submodule(name)))
    return names
