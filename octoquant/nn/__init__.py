"""Quantized modules: int8 weights and scales as plain buffers; forward is one call into a kernel backend."""

from .conv import BlockChain, ConvChain, QConv2d, chain_convolutions
from .embedding import QEmbedding
from .linear import QLinear

__all__ = ["QLinear", "QConv2d", "QEmbedding", "ConvChain", "BlockChain", "chain_convolutions"]
