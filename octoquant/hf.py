"""Hugging Face helpers: calibration batches from text (the `hf` extra provides the tokenizers)."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from .observers import CalibrationError


def calibration_batches(tokenizer, texts: str | Iterable[str], n: int, seq_len: int = 512) -> list[torch.Tensor]:
    """`n` batches of token ids (1, seq_len) cut from the concatenated `texts`, in order, without overlap.

    Raises:
        CalibrationError: the texts hold fewer than `seq_len` tokens (not one window), or n < 1.
    """
    if n < 1 or seq_len < 1:
        raise CalibrationError(f"calibration_batches needs n >= 1 and seq_len >= 1, got n={n}, seq_len={seq_len}")
    joined = texts if isinstance(texts, str) else "\n\n".join(texts)
    ids = tokenizer(joined, return_tensors="pt").input_ids[0]
    windows = len(ids) // seq_len
    if windows == 0:
        raise CalibrationError(
            f"calibration text has {len(ids)} tokens, fewer than one window of {seq_len}: give more text or a "
            "shorter seq_len"
        )
    return [ids[i * seq_len : (i + 1) * seq_len].unsqueeze(0) for i in range(min(n, windows))]


def _registered(name: str, suffix: str, mapping: str) -> bool:
    """`name` ends with `suffix`, or transformers' auto `mapping` (a dict of model type -> class name(s)) lists it."""
    if name.endswith(suffix):
        return True
    try:
        from transformers.models.auto import modeling_auto
    except ImportError:
        return False
    names = getattr(modeling_auto, mapping, {}).values()
    return any(name == v or (isinstance(v, tuple | list) and name in v) for v in names)


def is_causal_lm_architecture(name: str) -> bool:
    """A config `architectures` entry that generates text: `*ForCausalLM`, or a class transformers registers as a
    causal LM under another name (GPT2LMHeadModel, OpenAIGPTLMHeadModel, ...)."""
    return _registered(name, "ForCausalLM", "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES")


def is_image_classifier_architecture(name: str) -> bool:
    """A config `architectures` entry that classifies images (`*ForImageClassification` or registered as one)."""
    return _registered(name, "ForImageClassification", "MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES")
