"""Gemma 4 (transformers ``gemma4_text``) as llama.cpp's ``gemma4`` arch: keys, checks and tensors.

What llama.cpp's gemma4 graph computes (src/models/gemma4.cpp and its loader, in the llama.cpp that llama-cpp-python
0.3.36 vendors), and how each Gemma 4 feature maps onto it:

- Per-layer head sizes: sliding layers use ``head_dim`` (``attention.key_length_swa``), full layers the per-layer
  config's ``head_dim`` (``global_head_dim``; ``attention.key_length``). KV heads per layer as an array
  (``attention.head_count_kv``); the query head count is shared.
- RoPE: sliding layers rotate the whole head (default RoPE, ``rope.freq_base_swa``, ``rope.dimension_count_swa``);
  full layers rotate their whole head too (NEOX, ``rope.dimension_count`` = head size) with a ``rope_freqs`` tensor
  of per-frequency divisors: 1 (or the proportional RoPE's ``factor``) on the rotated frequencies and 1e30 on the
  rest, so those angles are 0 -- transformers' proportional RoPE (``inv_freq`` zero past ``partial_rotary_factor``).
- Norms scale by ``w`` in both (Gemma 4's RMSNorm has no ``1 + w``): written as they are. The value norm has no
  weight in either; attention scale is 1 in both; the embedding is scaled by sqrt(hidden) by llama.cpp itself.
- k == v (``attention_k_eq_v``): full layers without ``v_proj``; llama.cpp uses the key projection as the value
  when ``attn_v`` is absent (before the key norm and RoPE, as transformers).
- Shared-KV layers (``num_kv_shared_layers``): the last layers have no K/V weights; llama.cpp (key
  ``attention.shared_kv_layers``) makes such a layer reuse layer ``first_shared - 1`` (full) or ``first_shared - 2``
  (sliding), where transformers reuses the last earlier layer of the same type: checked to be the same layer.
- Double-wide MLP on shared layers: ``feed_forward_length`` as a per-layer array.
- Per-layer input embeddings: ``per_layer_token_embd`` (scaled by sqrt(per-layer width) in both),
  ``per_layer_model_proj`` (scaled by 1/sqrt(hidden)), ``per_layer_proj_norm``, the 1/sqrt(2) mix, and per block
  ``inp_gate`` / ``proj`` / ``post_norm``; ``embedding_length_per_layer_input`` (0 without them).
- ``layer_scalar`` as ``layer_output_scale``; final logit softcapping; the sliding window and per-layer pattern.
- MoE layers (``enable_moe_block``): router as ``ffn_gate_inp`` (+ ``.scale``), the per-expert scale as
  ``ffn_down_exps.scale``, experts fused gate-first as ``ffn_gate_up_exps``, the three extra norms.

Refused (llama.cpp would compute something else): bidirectional attention over text (``"all"``), attention biases,
a per-layer vocabulary other than the main one, sliding-layer RoPE other than default, full-layer RoPE other than
default/proportional, head sizes that differ within one layer type, a KV-sharing layout whose source layers differ.
"""

from __future__ import annotations

from typing import Any

import torch

from fastft.export.errors import ExportError
from fastft.kernels.activation import Activation

#: llama.cpp's frequency divisor for the dims proportional RoPE leaves unrotated (its converter uses the same value)
_NO_ROTATION = 1e30


def _layer(config: Any, i: int) -> Any:
    """Layer ``i``'s resolved config (Gemma 4 configs are heterogeneous: head_dim / KV heads differ per layer)."""
    return config.per_layer_config[i]


def _one_per_type(config: Any, attr: str, kind: str) -> int:
    values = {int(getattr(_layer(config, i), attr)) for i, t in enumerate(config.layer_types) if t == kind}
    if len(values) > 1:
        raise ExportError(f"gemma4_text {kind} layers with different {attr} {sorted(values)}: llama.cpp has one per type")
    return values.pop()


def _first_shared(config: Any) -> int:
    return int(config.num_hidden_layers) - int(config.num_kv_shared_layers or 0)


def _check_kv_sharing(config: Any) -> None:
    n, first = int(config.num_hidden_layers), _first_shared(config)
    if first == n:
        return
    if first < 2:
        raise ExportError(f"gemma4_text num_kv_shared_layers={config.num_kv_shared_layers}: llama.cpp needs two KV layers")
    types = list(config.layer_types)
    for i in range(first, n):
        hf_source = max((j for j in range(first) if types[j] == types[i]), default=None)  # last earlier, same type
        llama_source = first - (2 if types[i] == "sliding_attention" else 1)
        if hf_source != llama_source:
            raise ExportError(
                f"gemma4_text layer {i} ({types[i]}) reuses layer {hf_source}'s keys and values; llama.cpp's gemma4 "
                f"reuses layer {llama_source} (it assumes the last KV layer is full and the one before it sliding)"
            )


def _rope_freqs(config: Any, head_dim: int) -> torch.Tensor:
    """The full-attention layers' ``rope_freqs`` (fp32, ``[head_dim // 2]``): llama.cpp divides frequency i by it."""
    params = config.rope_parameters["full_attention"]
    kind = params.get("rope_type", "default")
    if kind == "default":
        return torch.ones(head_dim // 2)
    if kind != "proportional":
        raise ExportError(f"gemma4_text full-attention RoPE {kind!r}: exported are default and proportional")
    rotated = int(float(params.get("partial_rotary_factor", 1.0)) * head_dim // 2)  # transformers' rope_angles
    factors = torch.full((head_dim // 2,), _NO_ROTATION)
    factors[:rotated] = float(params.get("factor", 1.0))  # transformers: inv_freq /= factor
    return factors


def gemma4_metadata(row: Any, config: Any) -> dict[str, Any]:
    """The ``gemma4.*`` GGUF keys for a Gemma 4 text config (see the module docstring), checked first."""
    if getattr(config, "use_bidirectional_attention", None) == "all":
        raise ExportError("gemma4_text use_bidirectional_attention='all': llama.cpp's gemma4 attends causally over text")
    if getattr(config, "attention_bias", False):
        raise ExportError("gemma4_text attention_bias=True: llama.cpp's gemma4 loads no attention biases")
    act = getattr(config, "hidden_activation", None)
    if Activation.from_config(act) is not Activation.GELU_TANH:
        raise ExportError(f"gemma4_text activation {act!r}: llama.cpp's gemma4 graph uses tanh-approximated GELU")
    per_layer = int(getattr(config, "hidden_size_per_layer_input", 0) or 0)
    if per_layer and int(config.vocab_size_per_layer_input) != int(config.vocab_size):
        raise ExportError(
            f"gemma4_text vocab_size_per_layer_input={config.vocab_size_per_layer_input} != vocab_size="
            f"{config.vocab_size}: llama.cpp's per_layer_token_embd has one row per vocabulary token"
        )
    sliding = config.rope_parameters.get("sliding_attention") or {}
    if sliding.get("rope_type", "default") != "default":
        raise ExportError(f"gemma4_text sliding-layer RoPE {sliding['rope_type']!r}: llama.cpp rotates them by default")
    _check_kv_sharing(config)
    types = list(config.layer_types)
    n = int(config.num_hidden_layers)
    has_sliding, has_full = "sliding_attention" in types, "full_attention" in types
    head_full = _one_per_type(config, "head_dim", "full_attention") if has_full else None
    head_swa = _one_per_type(config, "head_dim", "sliding_attention") if has_sliding else None
    head_full = head_full or head_swa
    head_swa = head_swa or head_full
    _rope_freqs(config, head_full)  # refuses unknown full-layer RoPE types before anything is written
    ff = int(config.intermediate_size)
    if getattr(config, "use_double_wide_mlp", False):  # transformers: 2x wide on the KV-shared layers only
        ff_value: Any = [ff * (2 if i >= _first_shared(config) else 1) for i in range(n)]
    else:
        ff_value = ff
    meta: dict[str, Any] = {
        "context_length": int(config.max_position_embeddings),
        "embedding_length": int(config.hidden_size),
        "block_count": n,
        "feed_forward_length": ff_value,
        "attention.head_count": int(config.num_attention_heads),
        "attention.head_count_kv": [int(_layer(config, i).num_key_value_heads) for i in range(n)],
        "attention.layer_norm_rms_epsilon": float(config.rms_norm_eps),
        "attention.key_length": head_full,
        "attention.value_length": head_full,
        "attention.key_length_swa": head_swa,
        "attention.value_length_swa": head_swa,
        "rope.dimension_count": head_full,
        "rope.dimension_count_swa": head_swa,
        "rope.freq_base": float(config.rope_parameters["full_attention"].get("rope_theta", 1e6)),
        "rope.freq_base_swa": float(sliding.get("rope_theta", 1e4)),
        "attention.sliding_window": int(config.sliding_window),
        "attention.sliding_window_pattern": [t == "sliding_attention" for t in types],
        "attention.shared_kv_layers": int(config.num_kv_shared_layers or 0),
        "embedding_length_per_layer_input": per_layer,
        "vocab_size": int(config.vocab_size),
    }
    if getattr(config, "final_logit_softcapping", None) is not None:
        meta["final_logit_softcapping"] = float(config.final_logit_softcapping)
    if getattr(config, "enable_moe_block", False):
        meta["expert_count"] = int(config.num_experts)
        meta["expert_used_count"] = int(config.top_k_experts)
        meta["expert_feed_forward_length"] = int(config.moe_intermediate_size)
    return {f"{row.gguf_arch}.{key}": value for key, value in meta.items()}


#: transformers names llama.cpp's name table does not cover -> (GGUF tensor of the block, suffix)
_ROUTER = {"router.scale": ("ffn_gate_inp", "scale"), "router.per_expert_scale": ("ffn_down_exps", "scale")}


def gemma4_tensors(name_map: Any, config: Any, state: dict[str, torch.Tensor]) -> list[tuple[str, str, torch.Tensor]]:
    """``[(gguf_name, hf_name, fp32 tensor)]`` of a merged Gemma 4 state dict, plus ``rope_freqs.weight``; names
    llama.cpp has no tensor for raise :class:`ExportError`. No value transforms: the weights are llama.cpp's as they
    are (norms scale by ``w``; experts' ``gate_up_proj`` ``[E, 2I, H]`` gate-first is ``ffn_gate_up_exps``)."""
    out, unknown = [], []
    for hf_name, tensor in state.items():
        data = tensor.float()
        base, _, suffix = hf_name.rpartition(".")
        router = next((k for k in _ROUTER if hf_name.endswith("." + k)), None)
        if router is not None:
            block = hf_name.split(".layers.")[1].split(".")[0]
            name, kind = _ROUTER[router]
            out.append((f"blk.{block}.{name}.{kind}", hf_name, data))
        elif suffix in ("layer_scalar", "gate_up_proj", "down_proj") and name_map.get_name(hf_name):
            out.append((f"{name_map.get_name(hf_name)}.weight", hf_name, data))  # parameters without a .weight
        elif (mapped := name_map.get_name(base)) is not None:
            out.append((f"{mapped}.{suffix}", hf_name, data))
        else:
            unknown.append(hf_name)
    if unknown:
        raise ExportError(
            f"{len(unknown)} tensors have no llama.cpp name for arch 'gemma4': "
            f"{', '.join(unknown[:5])}{' ...' if len(unknown) > 5 else ''}"
        )
    types = list(config.layer_types)
    if "full_attention" in types:  # the loader requires it once any layer is full (later ones duplicate it)
        head = int(_layer(config, types.index("full_attention")).head_dim)
        out.append(("rope_freqs.weight", "rope_freqs.weight", _rope_freqs(config, head)))
    return out
