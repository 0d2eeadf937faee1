"""Tiny configs for the memory-model tests (odd sizes, a few layers)."""

from transformers import LlamaConfig


def tiny_llama(layers: int = 2, vocab: int = 320) -> LlamaConfig:
    return LlamaConfig(
        hidden_size=96,
        intermediate_size=224,
        num_hidden_layers=layers,
        num_attention_heads=6,
        num_key_value_heads=2,
        head_dim=16,
        vocab_size=vocab,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        rms_norm_eps=1e-5,
    )
