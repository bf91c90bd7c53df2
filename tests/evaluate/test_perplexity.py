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


class BigramLM(torch.nn.Module):
    """Predicts the previous token + 1 (mod V) with probability depending on context length: tests windowing."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.vocab = vocab

    def forward(self, ids):
        logits = torch.zeros(ids.shape[0], ids.shape[1], self.vocab)
        logits.scatter_(2, ((ids + 1) % self.vocab).unsqueeze(-1), 3.0)
        logits[:, :, 0] += torch.arange(ids.shape[1]).float() * 0.01  # position-dependent: context length matters
        return SimpleNamespace(logits=logits)


def test_stride_equal_to_window_is_the_plain_path():
    text = "".join(chr(65 + (i * 7) % 26) for i in range(700))
    a = perplexity(BigramLM(50), CharTokenizer(), text, seq_len=64, progress=False)
    b = perplexity(BigramLM(50), CharTokenizer(), text, seq_len=64, progress=False, stride=64)
    assert a == b


def test_sliding_windows_score_every_token_once():
    text = "".join(chr(65 + (i * 7) % 26) for i in range(300))
    # uniform model: any windowing gives exactly V
    uniform = perplexity(UniformLM(50), CharTokenizer(), text, 64, None, False, stride=16)
    assert math.isclose(uniform, 50.0, rel_tol=1e-6)
    strided = perplexity(BigramLM(50), CharTokenizer(), text, 64, None, False, stride=16)
    plain = perplexity(BigramLM(50), CharTokenizer(), text, 64, None, False)
    assert strided != plain  # more context per scored token changes the position-dependent model's score


def test_calibration_batches_cut_windows_and_refuse_short_text():
    import octoquant as oq

    batches = oq.hf.calibration_batches(CharTokenizer(), ["a" * 100, "b" * 100], n=3, seq_len=64)
    assert len(batches) == 3 and all(b.shape == (1, 64) for b in batches)
    assert len(oq.hf.calibration_batches(CharTokenizer(), "c" * 130, n=10, seq_len=64)) == 2  # what the text holds
    with pytest.raises(oq.CalibrationError, match="fewer than one window"):
        oq.hf.calibration_batches(CharTokenizer(), "too short", n=4, seq_len=64)
