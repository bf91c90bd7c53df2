import math
from types import SimpleNamespace

import pytest
import torch

from octoquant.evaluate.perplexity import perplexity


class UniformLM(torch.nn.Module):
    """Equal logits over V tokens: perplexity is exactly V."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.vocab = vocab

    def forward(self, ids):
        return SimpleNamespace(logits=torch.zeros(ids.shape[0], ids.shape[1], self.vocab))


class CharTokenizer:
    def __call__(self, text, return_tensors="pt"):
        return SimpleNamespace(input_ids=torch.tensor([[ord(c) % 50 for c in text]]))


def test_uniform_model_perplexity_is_vocab_size():
    ppl = perplexity(UniformLM(50), CharTokenizer(), "x" * 1000, seq_len=64, progress=False)
    assert math.isclose(ppl, 50.0, rel_tol=1e-5)


def test_text_shorter_than_one_window_raises():
    with pytest.raises(ValueError, match="fewer than one window"):
        perplexity(UniformLM(50), CharTokenizer(), "short", seq_len=64, progress=False)
