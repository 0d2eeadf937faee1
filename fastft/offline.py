"""Tiny models and a tokenizer built locally, with no network: for tests, the demo, and notebook CI runs.

``build_tokenizer()`` trains a byte-level BPE on a small built-in corpus (well under a second) and wraps it in a
``PreTrainedTokenizerFast`` with bos/eos/pad tokens and a ChatML-style chat template carrying ``{% generation %}``
markers (so TRL's assistant-only loss works). ``build_tiny_model(model_type)`` builds a randomly initialized
transformers model of that architecture with a few layers and odd sizes, so kernels meet non-power-of-two shapes, and
each row's own features switched on (sliding windows shorter than the test sequences, no-RoPE layers, multipliers).
"""

from __future__ import annotations

import functools
from typing import Any

import torch

#: Architectures the fixtures can build: model_type -> (config class name, extra config fields).
TINY_ARCHITECTURES: dict[str, tuple[str, dict[str, Any]]] = {
    "llama": ("LlamaConfig", {}),
    "mistral": ("MistralConfig", {"sliding_window": None}),
    "qwen2": ("Qwen2Config", {}),
    "qwen3": ("Qwen3Config", {}),
    "gemma": ("GemmaConfig", {"hidden_activation": "gelu_pytorch_tanh", "tie_word_embeddings": True}),
    "gemma2": (
        "Gemma2Config",
        {
            "hidden_activation": "gelu_pytorch_tanh",
            "query_pre_attn_scalar": 16,
            "final_logit_softcapping": 30.0,
            "attn_logit_softcapping": 50.0,
            "sliding_window": 64,
            "tie_word_embeddings": True,
        },
    ),
    # Fused qkv_proj / gate_up_proj; full rotary (a partial one is handed to transformers' RoPE, see architectures).
    "phi3": ("Phi3Config", {"sliding_window": None}),
    # A sliding layer whose window (5) is shorter than the test sequences, then a global one; q/k norms; softcap.
    "gemma3_text": (
        "Gemma3TextConfig",
        {
            "hidden_activation": "gelu_pytorch_tanh",
            "query_pre_attn_scalar": 16,
            "final_logit_softcapping": 30.0,
            "sliding_window": 5,
            "layer_types": ["sliding_attention", "full_attention"],
            "tie_word_embeddings": True,
        },
    ),
    "olmo2": ("Olmo2Config", {}),
    "olmo3": ("Olmo3Config", {"sliding_window": 5, "layer_types": ["sliding_attention", "full_attention"]}),
    # Every multiplier away from 1 so a head that ignores one shows.
    "granite": (
        "GraniteConfig",
        {"embedding_multiplier": 12.0, "residual_multiplier": 0.22, "attention_multiplier": 0.0625, "logits_scaling": 8.0},
    ),
    # Layer 0 with RoPE, layer 1 without (no_rope_layers[i] == 1 means layer i uses RoPE).
    "smollm3": ("SmolLM3Config", {"no_rope_layers": [1, 0], "use_sliding_window": False}),
    "glm4": ("Glm4Config", {"partial_rotary_factor": 0.5}),
    # Gemma 4 text: a sliding layer (window 5), then two global ones with their own head_dim (32), one KV head and
    # k == v (attention_k_eq_v); the last layer reuses layer 1's KV (num_kv_shared_layers) and so has a double-wide MLP;
    # per-layer input embeddings (PLE, width 8); final logit softcap.
    "gemma4_text": (
        "Gemma4TextConfig",
        {
            "hidden_activation": "gelu_pytorch_tanh",
            "num_hidden_layers": 3,
            "layer_types": ["sliding_attention", "full_attention", "full_attention"],
            "sliding_window": 5,
            "global_head_dim": 32,
            "num_global_key_value_heads": 1,
            "attention_k_eq_v": True,
            "num_kv_shared_layers": 1,
            "use_double_wide_mlp": True,
            "hidden_size_per_layer_input": 8,
            "vocab_size_per_layer_input": 384,
            "final_logit_softcapping": 30.0,
            "tie_word_embeddings": True,
        },
    ),
    "ministral": ("MinistralConfig", {"sliding_window": 5, "layer_types": ["sliding_attention", "full_attention"]}),
    # Its YaRN defaults (factor 16 over 16,384 original positions) imply this many positions.
    "ministral3": ("Ministral3Config", {"sliding_window": None, "max_position_embeddings": 262144}),
    # MoE: 5 experts, top-2, odd expert width; random routers give uneven counts per expert. The router aux loss is on
    # (output_router_logits) so every training loss includes it. qwen3_moe's layer 1 is dense (mlp_only_layers).
    "qwen3_moe": (
        "Qwen3MoeConfig",
        {
            "num_experts": 5,
            "num_experts_per_tok": 2,
            "moe_intermediate_size": 44,
            "mlp_only_layers": [1],
            "norm_topk_prob": True,
            "output_router_logits": True,
            "router_aux_loss_coef": 0.02,
        },
    ),
    "mixtral": (
        "MixtralConfig",
        {
            "num_local_experts": 5,
            "num_experts_per_tok": 2,
            "intermediate_size": 44,
            "sliding_window": None,
            "output_router_logits": True,
            "router_aux_loss_coef": 0.02,
        },
    ),
    # gpt-oss: biased experts with the clamped interleaved gate, attention sinks, a sliding layer then a full one.
    "gpt_oss": (
        "GptOssConfig",
        {
            "num_local_experts": 5,
            "num_experts_per_tok": 2,
            "intermediate_size": 44,
            "sliding_window": 5,
            "layer_types": ["sliding_attention", "full_attention"],
            "output_router_logits": True,
            "router_aux_loss_coef": 0.02,
        },
    ),
}

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|im_start|>assistant\n' }}{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{{ '\n' }}"
    "{% else %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "What is 12 plus 7? The answer is 19.",
    "Fine-tuning a language model with LoRA adds small low-rank adapters to frozen weights.",
    "0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 + - * = ?",
    "user assistant system: please answer briefly and correctly.",
    "Gradient checkpointing trades compute for memory by recomputing activations in the backward pass.",
]


@functools.lru_cache(maxsize=4)
def _tokenizer_json(vocab_size: int) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|pad|>", "<|bos|>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 20, trainer=trainer)
    return tok.to_str()


def build_tokenizer(vocab_size: int = 384):
    """A byte-level BPE tokenizer (any text round-trips) with a chat template; pad/bos/eos set."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tokenizer_json(vocab_size)),
        bos_token="<|bos|>",
        eos_token="<|im_end|>",
        pad_token="<|pad|>",
        additional_special_tokens=["<|im_start|>", "<|endoftext|>"],
        padding_side="right",
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


#: The tiny decoder's sizes (2 layers, hidden 64, GQA 4:2, head_dim 16): every fixture's, ``fastft demo --quick``'s and
#: the GPU check's dry run's.
TINY_SIZES: dict[str, int] = dict(
    hidden_size=64,
    intermediate_size=176,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
)


def tiny_config(model_type: str = "llama", vocab_size: int = 384, **overrides: Any):
    """A transformers config for a tiny ``model_type`` model (2 layers, hidden 64, GQA 4:2, head_dim 16)."""
    import transformers

    if model_type not in TINY_ARCHITECTURES:
        raise ValueError(f"no tiny fixture for {model_type!r}; known: {sorted(TINY_ARCHITECTURES)}")
    cls_name, extra = TINY_ARCHITECTURES[model_type]
    fields = dict(
        vocab_size=vocab_size,
        **TINY_SIZES,
        max_position_embeddings=4096,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=4,
        tie_word_embeddings=False,
    )
    fields.update(extra)  # per-architecture fields win over the defaults (Gemma ties its embeddings)
    fields.update(overrides)
    return getattr(transformers, cls_name)(**fields)


def build_tiny_model(
    model_type: str = "llama", *, seed: int = 0, dtype: torch.dtype = torch.float32, vocab_size: int = 384, **overrides: Any
):
    """A randomly initialized causal LM of ``model_type``, deterministic for a given ``seed``, in eval mode."""
    from transformers import AutoModelForCausalLM

    config = tiny_config(model_type, vocab_size=vocab_size, **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="eager")
    return model.eval()


def save_tiny_model(directory: str, model_type: str = "llama", **kwargs: Any) -> str:
    """Write a tiny model and the tokenizer to ``directory`` (safetensors) so it loads like a hub checkpoint."""
    model = build_tiny_model(model_type, **kwargs)
    model.save_pretrained(directory, safe_serialization=True)
    build_tokenizer(model.config.vocab_size).save_pretrained(directory)
    return directory
