"""transformers state-dict names -> GGUF tensor names, and the value transforms llama.cpp expects.

Names come from the ``gguf`` package's own map (``gguf.get_tensor_name_map``), so they are llama.cpp's. A tensor the
map does not know raises before anything is written, rather than being dropped.
"""

from __future__ import annotations

import torch

from fastft.export.architectures import ArchitectureRow
from fastft.export.errors import ExportError

#: llama.cpp archs whose graph has no output tensor of its own (the embedding is always the output layer).
_TIED_ONLY = ("gemma", "gemma2")


def _permute_for_llama_rope(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """Reorder Q/K rows from transformers' rotate-half layout to llama.cpp's interleaved pairs (as its converter)."""
    rows = weight.shape[0]
    return weight.reshape(n_head, 2, rows // n_head // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _expert_tensors(name_map, hf_name: str, data: torch.Tensor) -> list[tuple[str, str, torch.Tensor]]:
    """transformers 5's stacked experts as llama.cpp's ``ffn_{gate,up,down}_exps``: ``gate_up_proj`` ``[E, 2I, H]``
    holds the gate rows first (the expert forward chunks its output in two, gate then up); ``down_proj`` ``[E, H, I]``
    is already llama.cpp's layout."""
    prefix, _, kind = hf_name.rpartition(".")
    if kind == "down_proj":
        pieces = [("down_proj", data)]
    else:
        gate, up = data.chunk(2, dim=1)
        pieces = [("gate_proj", gate.contiguous()), ("up_proj", up.contiguous())]
    out = []
    for part, tensor in pieces:
        mapped = name_map.get_name(f"{prefix}.{part}")
        if mapped is None:
            return []
        out.append((f"{mapped}.weight", hf_name, tensor))
    return out


def _gpt_oss_tensors(name_map, hf_name: str, data: torch.Tensor) -> list[tuple[str, str, torch.Tensor]]:
    """gpt-oss experts as llama.cpp's ``ffn_{gate,up,down}_exps`` (weight and bias): transformers stores them as
    ``x @ W`` (``gate_up_proj`` ``[E, H, 2I]``, ``down_proj`` ``[E, I, H]``) with gate and up *interleaved* along
    2I (the expert's forward takes columns ``::2`` as gate, ``1::2`` as up); llama.cpp wants ``[E, out, in]`` rows."""
    prefix, _, kind = hf_name.rpartition(".")
    is_bias = kind.endswith("_bias")
    if kind.startswith("down_proj"):
        pieces = [("down_proj", data if is_bias else data.transpose(-1, -2))]
    else:
        rows = data if is_bias else data.transpose(-1, -2)  # [E, 2I] / [E, 2I, H]
        pieces = [("gate_proj", rows[:, 0::2]), ("up_proj", rows[:, 1::2])]
    out = []
    for part, tensor in pieces:
        mapped = name_map.get_name(f"{prefix}.{part}")
        if mapped is None:
            return []
        out.append((f"{mapped}.{'bias' if is_bias else 'weight'}", hf_name, tensor.contiguous()))
    return out


def gguf_tensors(row: ArchitectureRow, config, state: dict[str, torch.Tensor]) -> list[tuple[str, str, torch.Tensor]]:
    """``[(gguf_name, hf_name, fp32 tensor)]`` for a merged state dict; :class:`ExportError` on an unknown name."""
    import gguf

    arch = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == row.gguf_arch)
    name_map = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    if row.gguf_arch == "gemma4":  # per-layer head sizes, router scales, rope_freqs: fastft/export/gemma4.py
        from fastft.export.gemma4 import gemma4_tensors

        return gemma4_tensors(name_map, config, state)
    n_head = config.num_attention_heads
    n_kv = getattr(config, "num_key_value_heads", None) or n_head
    if row.gguf_arch in _TIED_ONLY and "lm_head.weight" in state:
        raise ExportError(
            f"{row.model_type} with an untied lm_head: llama.cpp's {row.gguf_arch} arch always uses the "
            "token embedding as the output layer (it has no output.weight to load)"
        )
    out, unknown = [], []
    for hf_name, tensor in state.items():
        if row.gguf_arch == "gpt-oss" and ".experts." in hf_name:
            experts = _gpt_oss_tensors(name_map, hf_name, tensor.float())
            out.extend(experts) if experts else unknown.append(hf_name)
            continue
        if row.gguf_arch == "gpt-oss" and hf_name.endswith(".self_attn.sinks"):  # one logit per head, no suffix
            mapped = name_map.get_name(hf_name)
            out.append((f"{mapped}.weight", hf_name, tensor.float())) if mapped else unknown.append(hf_name)
            continue
        if hf_name.endswith((".experts.gate_up_proj", ".experts.down_proj")):
            experts = _expert_tensors(name_map, hf_name, tensor.float())
            out.extend(experts) if experts else unknown.append(hf_name)
            continue
        base, _, suffix = hf_name.rpartition(".")
        mapped = name_map.get_name(base)
        if mapped is None:
            unknown.append(hf_name)
            continue
        data = tensor.float()
        if row.permute_qk and suffix == "weight" and mapped.endswith(".attn_q"):
            data = _permute_for_llama_rope(data, n_head)
        elif row.permute_qk and suffix == "weight" and mapped.endswith(".attn_k"):
            data = _permute_for_llama_rope(data, n_kv)
        elif row.permute_qk and suffix == "bias" and mapped.endswith((".attn_q", ".attn_k")):
            data = _permute_for_llama_rope(data, n_head if mapped.endswith(".attn_q") else n_kv)
        if row.norm_plus_one and mapped.endswith("norm") and suffix == "weight":
            data = data + 1.0
        out.append((f"{mapped}.{suffix}", hf_name, data))
    if unknown:
        raise ExportError(
            f"{len(unknown)} tensors have no llama.cpp name for arch {row.gguf_arch!r}: "
            f"{', '.join(unknown[:5])}{' ...' if len(unknown) > 5 else ''}"
        )
    return out
