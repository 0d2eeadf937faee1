"""Per-architecture GGUF metadata: one table row per transformers ``model_type`` llama.cpp runs.

A row says which llama.cpp architecture the model is written as, whether Q/K rows are permuted (llama.cpp's
``llama`` arch rotates adjacent pairs where transformers rotates halves; its ``qwen2``/``qwen3``/``gemma*`` archs
rotate halves like transformers), whether RMSNorm weights are stored as ``w + 1`` (Gemma's norms scale by ``1 + w``;
llama.cpp's by ``w``; the embedding scale ``sqrt(hidden)`` is applied by llama.cpp's Gemma graphs themselves), and
which extra keys it carries (softcapping, sliding windows, experts, Granite's multipliers, partial rotary dims,
Ministral 3's YaRN log multiplier and query temperature). Everything else is shared: sizes, heads, RoPE base and
scaling, norm epsilon. A config feature llama.cpp would silently compute differently is refused here, before writing,
with the reason; the llama.cpp behaviour each row relies on was read in the llama.cpp that llama-cpp-python 0.3.36
vendors (its converter under conversion/ and the graphs under src/models/).
"""

from __future__ import annotations

import difflib
import logging
from dataclasses import dataclass
from typing import Any

from fastft.export.errors import ExportError
from fastft.export.rope import extra_tensors as extra_tensors  # RoPE keys/tensors: rope.py (re-exported)
from fastft.export.rope import head_dim_of, rope_parameters
from fastft.export.rope import rope_keys as _rope_keys
from fastft.kernels.activation import Activation

logger = logging.getLogger("fastft")


@dataclass(frozen=True)
class ArchitectureRow:
    model_type: str
    gguf_arch: str  # llama.cpp's name (gguf.MODEL_ARCH_NAMES value)
    permute_qk: bool = False  # llama.cpp "llama" arch: interleaved RoPE pairs
    norm_plus_one: bool = False  # Gemma: RMSNorm scale stored as 1 + w
    softcapping: bool = False  # Gemma 2/3: attention and/or final logit softcapping keys
    sliding_window: bool = False  # Gemma 2/3: per-layer sliding-window pattern (llama.cpp reads it)
    llama3_rope: bool = False  # the arch loads a rope_freqs tensor (Llama 3.1 "llama3" RoPE scaling)
    partial_rotary: bool = False  # llama.cpp rotates only the first rope.dimension_count dims, as transformers


ARCHITECTURES: dict[str, ArchitectureRow] = {
    row.model_type: row
    for row in [
        ArchitectureRow("llama", "llama", permute_qk=True, llama3_rope=True),
        # llama.cpp converts Mistral as its llama arch (MistralForCausalLM is registered on its LlamaModel converter).
        ArchitectureRow("mistral", "llama", permute_qk=True, llama3_rope=True),
        ArchitectureRow("qwen2", "qwen2"),
        ArchitectureRow("qwen3", "qwen3"),
        ArchitectureRow("gemma", "gemma", norm_plus_one=True),
        ArchitectureRow("gemma2", "gemma2", norm_plus_one=True, softcapping=True, sliding_window=True),
        ArchitectureRow("gemma3_text", "gemma3", norm_plus_one=True, softcapping=True, sliding_window=True),
        # Phi-3: fused qkv_proj and gate_up_proj are llama.cpp's own attn_qkv / ffn_up layout; RoPE rotates halves.
        # Partial rotary: llama.cpp's NEOX rope over the first rope.dimension_count dims = transformers' rotate-half of
        # the rotary slice.
        ArchitectureRow("phi3", "phi3", partial_rotary=True),
        ArchitectureRow("qwen3_moe", "qwen3moe"),
        # Mixtral: llama.cpp converts it as its llama arch with experts (softmax router, top-k renormalized).
        ArchitectureRow("mixtral", "llama", permute_qk=True, llama3_rope=True),
        # Ministral (8B): llama.cpp has no converter of its own; its GGUFs run as the llama arch (full attention).
        ArchitectureRow("ministral", "llama", permute_qk=True, llama3_rope=True),
        # Granite: llama layout plus four multipliers (embedding, residual, attention, logits) as GGUF keys.
        ArchitectureRow("granite", "granite", permute_qk=True, llama3_rope=True),
        # OLMo 2/3: post-norms and whole-projection Q/K norms; RoPE rotates halves (llama.cpp NEOX). OLMo 3 is
        # llama.cpp's olmo2 arch with a sliding window and per-layer pattern.
        ArchitectureRow("olmo2", "olmo2"),
        ArchitectureRow("olmo3", "olmo2", sliding_window=True),
        # SmolLM3: llama layout; llama.cpp skips RoPE in every 4th layer (fixed step), checked against no_rope_layers.
        ArchitectureRow("smollm3", "smollm3", permute_qk=True),
        # GLM-4: partial RoPE over interleaved pairs (llama.cpp NORM rope on the first rope.dimension_count dims, the
        # layout transformers uses, so no permutation); fused gate_up_proj is llama.cpp's double-wide ffn_up.
        ArchitectureRow("glm4", "glm4", partial_rotary=True),
        # gpt-oss: attention sinks, biased experts with the clamped SwiGLU (llama.cpp: alpha 1.702, limit 7), softmax
        # over the top-k router logits, sliding/full layer pattern; rotates halves (NEOX).
        ArchitectureRow("gpt_oss", "gpt-oss", sliding_window=True),
        # Ministral 3: llama layout with YaRN (mscale_all_dim as rope.scaling.yarn_log_multiplier) and Llama 4's
        # position-dependent query temperature (attention.temperature_scale; llama.cpp floors by the YaRN original ctx).
        ArchitectureRow("ministral3", "mistral3", permute_qk=True),
        # Gemma 4: per-layer head sizes, proportional RoPE, k == v, shared-KV layers, per-layer input embeddings;
        # its keys, checks and tensors are in fastft/export/gemma4.py (norms scale by w: no +1).
        ArchitectureRow("gemma4_text", "gemma4", softcapping=True, sliding_window=True),
    ]
}

#: Rows of fastft's architecture table that GGUF export does not cover yet, and why (named in the error).
NOT_EXPORTED: dict[str, str] = {}


def architecture_row(model_type: str) -> ArchitectureRow:
    """The row for ``model_type``; an :class:`ExportError` naming the supported ones (with did-you-mean) if none."""
    if model_type in ARCHITECTURES:
        return ARCHITECTURES[model_type]
    if model_type in NOT_EXPORTED:
        raise ExportError(
            f"GGUF export does not cover model_type {model_type!r} yet ({NOT_EXPORTED[model_type]}). "
            f"Exported: {', '.join(ARCHITECTURES)}."
        )
    close = difflib.get_close_matches(str(model_type), list(ARCHITECTURES), n=2, cutoff=0.6)
    hint = f" Did you mean {' or '.join(map(repr, close))}?" if close else ""
    raise ExportError(
        f"GGUF export has no row for model_type {model_type!r} (no llama.cpp architecture known to "
        f"fastft for it).{hint} Exported: {', '.join(ARCHITECTURES)}."
    )


#: Rows whose transformers model has a sliding window that llama.cpp's arch for them does not apply.
_FULL_ATTENTION_IN_LLAMA_CPP = ("mistral", "phi3", "mixtral", "ministral", "ministral3")


def _sliding_keys(row: ArchitectureRow, config: Any) -> dict[str, Any]:
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if row.sliding_window:
        meta: dict[str, Any] = {}
        if window:
            meta["attention.sliding_window"] = int(window)
        if layer_types:  # llama.cpp's default patterns (every 2nd / 6th layer full) only hold for stock configs
            meta["attention.sliding_window_pattern"] = [t == "sliding_attention" for t in layer_types]
        return meta
    if row.model_type in ("qwen2", "qwen3") and getattr(config, "use_sliding_window", False):
        raise ExportError(
            f"{row.model_type} use_sliding_window=True: llama.cpp's {row.gguf_arch} arch attends the "
            "whole context; export a model with use_sliding_window=False"
        )
    if row.model_type in _FULL_ATTENTION_IN_LLAMA_CPP and window and window < config.max_position_embeddings:
        # llama.cpp runs Mistral as llama and Phi-3 with its sliding window disabled, i.e. full attention: equal to
        # transformers up to the window's length.
        logger.warning(
            "fastft: %s sliding_window=%d: llama.cpp's %s arch attends the whole context, so the GGUF's "
            "context_length is set to %d (the length up to which both attend the same tokens)",
            row.model_type,
            window,
            row.gguf_arch,
            window,
        )
        return {"context_length": int(window)}
    return {}


def _attention_scale_check(row: ArchitectureRow, config: Any, head_dim: int) -> None:
    scalar = getattr(config, "query_pre_attn_scalar", None)
    if not row.model_type.startswith("gemma") or scalar is None:
        return
    # llama.cpp scales Gemma 2/3 queries by 1/sqrt(head_dim); by hidden/heads only for its 27B types (46 / 62 layers)
    allowed = {head_dim}
    if config.num_hidden_layers == {"gemma2": 46, "gemma3_text": 62}.get(row.model_type):
        allowed = {config.hidden_size // config.num_attention_heads}
    if scalar not in allowed:
        raise ExportError(
            f"{row.model_type} query_pre_attn_scalar={scalar} cannot be represented: llama.cpp scales "
            f"queries by 1/sqrt({sorted(allowed)[0]})"
        )


def _moe_keys(row: ArchitectureRow, config: Any) -> dict[str, Any]:
    # llama.cpp's qwen3moe graph: every layer sparse, top-k weights always renormalized.
    if getattr(config, "mlp_only_layers", None) or getattr(config, "decoder_sparse_step", 1) != 1:
        raise ExportError(
            f"{row.model_type} with dense layers (mlp_only_layers={config.mlp_only_layers}, "
            f"decoder_sparse_step={config.decoder_sparse_step}): llama.cpp's {row.gguf_arch} arch "
            "makes every layer sparse"
        )
    if not getattr(config, "norm_topk_prob", True):
        raise ExportError(f"{row.model_type} norm_topk_prob=False: llama.cpp's {row.gguf_arch} arch renormalizes")
    return {
        "expert_count": int(config.num_experts),
        "expert_used_count": int(config.num_experts_per_tok),
        "expert_feed_forward_length": int(config.moe_intermediate_size),
    }


def _whole_width_heads(row: ArchitectureRow, config: Any, head_dim: int) -> None:
    # llama.cpp's granite/olmo2 graphs take the head size as hidden / heads (granite's converter drops head_dim)
    if head_dim * config.num_attention_heads != config.hidden_size:
        raise ExportError(
            f"{row.model_type} head_dim={head_dim} with {config.num_attention_heads} heads != hidden_size "
            f"{config.hidden_size}: llama.cpp's {row.gguf_arch} arch derives the head size as hidden / heads"
        )


def _family_keys(row: ArchitectureRow, config: Any, head_dim: int) -> dict[str, Any]:
    """Keys and checks of one model family beyond the shared ones."""
    kind = row.model_type
    if kind == "qwen3_moe":
        return _moe_keys(row, config)
    if kind == "mixtral":  # llama.cpp's llama MoE: softmax router, top-k renormalized -- Mixtral's routing
        return {"expert_count": int(config.num_local_experts), "expert_used_count": int(config.num_experts_per_tok)}
    if kind == "granite":
        _whole_width_heads(row, config, head_dim)
        # llama.cpp: inputs * embedding_scale, Q.K * attention.scale, residual += out * residual_scale,
        # logits / logit_scale -- transformers' four multipliers, one for one
        return {
            "embedding_scale": float(config.embedding_multiplier),
            "residual_scale": float(config.residual_multiplier),
            "attention.scale": float(config.attention_multiplier),
            "logit_scale": float(config.logits_scaling),
        }
    if kind in ("olmo2", "olmo3"):
        _whole_width_heads(row, config, head_dim)
        sliding = (getattr(config, "rope_parameters", None) or {}).get("sliding_attention") or {}
        if sliding.get("rope_type", "default") != "default":
            raise ExportError(f"{kind}: sliding layers' RoPE {sliding['rope_type']!r}: llama.cpp's olmo2 uses plain RoPE")
        return {}
    if kind == "gpt_oss":
        if float(config.swiglu_limit) != 7.0:
            raise ExportError(f"gpt_oss swiglu_limit={config.swiglu_limit}: llama.cpp's gpt-oss graph clamps at 7.0")
        return {
            "expert_count": int(config.num_local_experts),
            "expert_used_count": int(config.num_experts_per_tok),
            "expert_feed_forward_length": int(config.intermediate_size),
        }
    if kind == "ministral3":
        params, _ = rope_parameters(config)
        beta = params.get("llama_4_scaling_beta")
        if not beta:
            return {}
        if params["rope_type"] != "yarn":  # llama.cpp floors positions by the YaRN original context length
            raise ExportError("ministral3 llama_4_scaling_beta without YaRN: llama.cpp has no floor length for it")
        # transformers and llama.cpp: q *= 1 + beta * log(1 + floor(pos / original_max_position_embeddings))
        return {"attention.temperature_scale": float(beta)}
    if kind == "smollm3":
        if getattr(config, "use_sliding_window", False):
            raise ExportError("smollm3 use_sliding_window=True: llama.cpp's smollm3 arch attends the whole context")
        # llama.cpp's smollm3 graph skips RoPE in layer i iff (i + 1) % 4 == 0 (n_no_rope_layer_step, not a GGUF key)
        want = [int((i + 1) % 4 != 0) for i in range(config.num_hidden_layers)]
        if [int(x) for x in config.no_rope_layers] != want:
            raise ExportError(
                f"smollm3 no_rope_layers={list(config.no_rope_layers)}: llama.cpp's smollm3 arch always skips RoPE in "
                f"every 4th layer ({want})"
            )
    return {}


def architecture_metadata(row: ArchitectureRow, config: Any) -> dict[str, Any]:
    """The ``{arch}.*`` GGUF keys for ``config`` (full key -> Python value: int -> uint32, float -> float32, str,
    list[bool] -> array), checked for what llama.cpp can run."""
    if row.gguf_arch == "gemma4":  # heterogeneous per-layer config: its own keys and checks
        from fastft.export.gemma4 import gemma4_metadata

        return gemma4_metadata(row, config)
    head_dim = head_dim_of(config)
    meta: dict[str, Any] = {
        "context_length": int(config.max_position_embeddings),
        "embedding_length": int(config.hidden_size),
        "block_count": int(config.num_hidden_layers),
        "feed_forward_length": int(config.intermediate_size),
        "attention.head_count": int(config.num_attention_heads),
        "attention.head_count_kv": int(getattr(config, "num_key_value_heads", None) or config.num_attention_heads),
        "attention.layer_norm_rms_epsilon": float(config.rms_norm_eps),
        "attention.key_length": head_dim,
        "attention.value_length": head_dim,
        "rope.dimension_count": head_dim,
        "vocab_size": int(config.vocab_size),
    }
    meta.update(_rope_keys(row, config))
    meta.update(_sliding_keys(row, config))
    if row.softcapping:
        for key in ("attn_logit_softcapping", "final_logit_softcapping"):
            if getattr(config, key, None) is not None:
                meta[key] = float(getattr(config, key))
    if row.model_type == "gemma3_text" and getattr(config, "attn_logit_softcapping", None) is not None:
        raise ExportError("gemma3 attn_logit_softcapping: llama.cpp's gemma3 graph has no attention softcapping")
    _attention_scale_check(row, config, head_dim)
    meta.update(_family_keys(row, config, head_dim))
    act = getattr(config, "hidden_activation", None) or getattr(config, "hidden_act", None)
    want = Activation.GELU_TANH if row.model_type.startswith("gemma") else Activation.SILU
    if Activation.from_config(act) is not want:
        raise ExportError(f"{row.model_type} activation {act!r}: llama.cpp's {row.gguf_arch} graph uses {want.op_name}")
    return {f"{row.gguf_arch}.{key}": value for key, value in meta.items()}
