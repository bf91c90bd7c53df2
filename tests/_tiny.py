"""A tiny random Llama (hidden 64, 4 heads, 2 KV heads) for plumbing tests; accuracy claims use real models."""

import torch


def tiny_llama(*, layers: int = 2, vocab: int = 120, tie: bool = False):
    import transformers

    cfg = transformers.LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=vocab,
        tie_word_embeddings=tie,
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval()
