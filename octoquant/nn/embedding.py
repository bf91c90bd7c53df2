"""QEmbedding: embedding lookups from the int8 matrix of a tied, weight-only quantized output head."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class QEmbedding(nn.Module):
    """Rows of an int8 (V, D) matrix times their per-row scale: the input side of a tied embedding whose output
    side is a W8A16 `QLinear` head. Both share one int8 matrix (no second copy, the tie kept).

    Buffers: weight (V, D) int8 and weight_scale (V,) float32 per row, or (V, D // group_size) per group: the
    very tensors of the head when tied. `embed_scale`: a constant the embedding multiplies its rows by (Gemma's
    sqrt(hidden_size)), 1 for a plain lookup.
    """

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        dtype: torch.dtype = torch.float32,
        group_size: int | None = None,
        embed_scale: float = 1.0,
    ) -> None:
        super().__init__()
        if not (math.isfinite(embed_scale) and embed_scale != 0):
            raise ValueError(f"embed_scale must be finite and nonzero, got {embed_scale}")
        self.embed_scale = float(embed_scale)
        if group_size is not None and embedding_dim % group_size:
            raise ValueError(f"group size {group_size} does not divide embedding_dim {embedding_dim}")
        self.num_embeddings, self.embedding_dim, self.dtype = num_embeddings, embedding_dim, dtype
        self.group_size = group_size
        groups = 1 if group_size is None else embedding_dim // group_size
        self.register_buffer("weight", torch.zeros(num_embeddings, embedding_dim, dtype=torch.int8))
        shape = (num_embeddings,) if group_size is None else (num_embeddings, groups)
        self.register_buffer("weight_scale", torch.ones(shape, dtype=torch.float32))

    @classmethod
    def tied_to(cls, head: nn.Module, dtype: torch.dtype = torch.float32, embed_scale: float = 1.0) -> QEmbedding:
        """Share the head's int8 weight and scales (a W8A16 QLinear, per channel or per group)."""
        with torch.device("meta"):
            q = cls(head.out_features, head.in_features, dtype, head.group_size, embed_scale)
        q.weight, q.weight_scale = head.weight, head.weight_scale
        return q

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = F.embedding(ids, self.weight).to(torch.float32)  # (..., D) int8 codes, exact in float32
        scale = self.weight_scale[ids]  # (...,) or (..., G)
        if self.group_size is None:
            out = rows * scale.unsqueeze(-1)
        else:
            out = (rows.reshape(*rows.shape[:-1], -1, self.group_size) * scale.unsqueeze(-1)).reshape(rows.shape)
        return (out if self.embed_scale == 1.0 else out * self.embed_scale).to(self.dtype)

    def extra_repr(self) -> str:
        g = f", group_size={self.group_size}" if self.group_size else ""
        e = f", embed_scale={self.embed_scale:g}" if self.embed_scale != 1.0 else ""
        return f"{self.num_embeddings}, {self.embedding_dim}{g}{e}, int8 (tied to the output head)"
