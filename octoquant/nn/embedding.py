"""QEmbedding: embedding lookups from the int8 matrix of a tied, weight-only quantized output head."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class QEmbedding(nn.Module):
    """Rows of an int8 (V, D) matrix times their per-row scale: the input side of a tied embedding whose output
    side is a W8A16 `QLinear` head. Both share one int8 matrix (no second copy, the tie kept).

    Buffers: weight (V, D) int8 and weight_scale (V,) float32, the very tensors of the head when tied.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.dtype = num_embeddings, embedding_dim, dtype
        self.register_buffer("weight", torch.zeros(num_embeddings, embedding_dim, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(num_embeddings, dtype=torch.float32))

    @classmethod
    def tied_to(cls, head: nn.Module, dtype: torch.dtype = torch.float32) -> QEmbedding:
        """Share the head's int8 weight and per-row scales (a per-channel W8A16 QLinear)."""
        if head.weight_scale.dim() != 1:
            raise ValueError("a tied embedding needs per-channel (per-row) head scales, not per-group")
        with torch.device("meta"):
            q = cls(head.out_features, head.in_features, dtype)
        q.weight, q.weight_scale = head.weight, head.weight_scale
        return q

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = F.embedding(ids, self.weight).to(torch.float32)  # (..., D) int8 codes, exact in float32
        return (rows * self.weight_scale[ids].unsqueeze(-1)).to(self.dtype)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, int8 (tied to the output head)"
