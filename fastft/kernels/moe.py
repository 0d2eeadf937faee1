"""Fused expert MLP for mixture-of-experts blocks (transformers 5.24 qwen3_moe, mixtral, gpt_oss).

The model's experts loop over the experts hit, gather each expert's tokens, run two small GEMMs and scatter back with
``index_add_``: 2 x E launches per layer. Here: sort the (token, slot) pairs by expert once, gather, one grouped GEMM
for gate_up, the gate activation (fastft's fused SwiGLU kernel for silu experts), one grouped GEMM for down, the
routing weights applied, one ``index_add_`` back.

Routing is the model's own: :func:`fused_moe_forward` calls the block's router module (``block.gate`` for
qwen3_moe/mixtral, ``block.router`` for gpt_oss), so router logits, top-k, normalisation and the aux-loss inputs are
exactly what the model computes (mixtral's jitter noise included, it lives in the block's forward and is applied
here the same way).

Shapes and dtypes
    hidden: [T, H]; top_k_index: int64 [T, k]; top_k_weights: [T, k] (the router's dtype: fp32 for mixtral, the
    logits' dtype for qwen3_moe/gpt_oss; the product with the expert output follows torch's type promotion exactly as
    the model's loop does). Expert weights stacked as in transformers: qwen3_moe/mixtral ``gate_up_proj [E, 2I, H]``,
    ``down_proj [E, H, I]``; gpt_oss ``gate_up_proj [E, H, 2I]`` (gate/up interleaved), ``down_proj [E, I, H]`` and
    biases ``[E, 2I]``, ``[E, H]``.

Memory: saved for backward are the gathered input [T*k, H], gate_up [T*k, 2I] (SwiGLU saves its inputs, no
activation) and h [T*k, I], the same tensors the model's loop keeps per expert.
"""

from __future__ import annotations

import torch
from torch import nn

from fastft.kernels.glu import swiglu
from fastft.kernels.grouped_gemm import grouped_gemm

#: Expert classes whose contract (attributes, layout) this module was written against.
SUPPORTED_EXPERTS = {
    "Qwen3MoeExperts": "concatenated",
    "MixtralExperts": "concatenated",
    "GptOssExperts": "gpt_oss",
}


def expert_layout(experts: nn.Module) -> str:
    """Which layout: "concatenated" (gate_up [E, 2I, H], gate then up halves) or "gpt_oss" ([E, H, 2I], interleaved, biases).

    Raises a clear error for an experts module whose attributes do not match either contract."""
    name = type(experts).__name__
    has = {a: hasattr(experts, a) for a in ("gate_up_proj", "down_proj", "num_experts")}
    if not all(has.values()):
        missing = [a for a, ok in has.items() if not ok]
        raise TypeError(f"fused MoE: {name} lacks {missing}; supported experts: {sorted(SUPPORTED_EXPERTS)}")
    gate_up, down = experts.gate_up_proj, experts.down_proj
    e = experts.num_experts
    if hasattr(experts, "gate_up_proj_bias"):
        h, two_i = gate_up.shape[1], gate_up.shape[2]
        if gate_up.shape != (e, h, two_i) or down.shape != (e, two_i // 2, h) or not hasattr(experts, "limit"):
            raise TypeError(f"fused MoE: {name} has gpt_oss-style biases but shapes {tuple(gate_up.shape)}, "
                            f"{tuple(down.shape)} do not match [E, H, 2I], [E, I, H]")  # fmt: skip
        return "gpt_oss"
    two_i, h = gate_up.shape[1], gate_up.shape[2]
    if gate_up.shape != (e, two_i, h) or down.shape != (e, h, two_i // 2) or not hasattr(experts, "act_fn"):
        raise TypeError(f"fused MoE: {name} shapes {tuple(gate_up.shape)}, {tuple(down.shape)} do not match "
                        "[E, 2I, H], [E, H, I] (or lack act_fn)")  # fmt: skip
    return "concatenated"


def _is_silu(experts: nn.Module) -> bool:
    act = getattr(experts, "act_fn", None)
    return isinstance(act, nn.SiLU) or type(act).__name__ in ("SiLUActivation", "SiLU")


def fused_experts(
    experts: nn.Module, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """Drop-in for ``experts(hidden, top_k_index, top_k_weights)`` of the supported expert classes.

    Args:
        experts: a Qwen3MoeExperts / MixtralExperts / GptOssExperts (or anything with their contract).
        hidden: [T, H]; top_k_index: int [T, k] in [0, E); top_k_weights: [T, k].
    Returns:
        [T, H] in hidden.dtype.
    """
    layout = expert_layout(experts)
    num_experts = experts.num_experts
    t, k = top_k_index.shape
    flat = top_k_index.reshape(-1)
    meta = hidden.device.type == "meta"  # the memory model (fastft.memory.step_model): shapes only, no routing values
    if flat.numel() and not meta and (int(flat.min()) < 0 or int(flat.max()) >= num_experts):
        raise ValueError(f"fused MoE: expert indices must lie in [0, {num_experts}), got "
                         f"[{int(flat.min())}, {int(flat.max())}]")  # fmt: skip
    # Stable sort: within one expert, rows keep token order (as the model's torch.where does).
    order = torch.argsort(flat, stable=True)
    token = order // k
    expert_of_row = flat[order]
    if meta:  # every buffer's size is T*k rows whatever the routing; the grouped GEMM's fake impl needs no offsets
        offsets = torch.empty(num_experts + 1, dtype=torch.int64, device=hidden.device)
    else:
        counts = torch.bincount(flat, minlength=num_experts)
        offsets = torch.zeros(num_experts + 1, dtype=torch.int64, device=hidden.device)
        offsets[1:] = torch.cumsum(counts, 0)
    x = hidden[token]  # [T*k, H]
    weights = top_k_weights.reshape(-1)[order, None]
    if layout == "concatenated":
        gate_up = grouped_gemm(x, experts.gate_up_proj, offsets)  # [T*k, 2I]
        gate, up = gate_up.chunk(2, dim=-1)
        h = swiglu(gate, up) if _is_silu(experts) else experts.act_fn(gate) * up
        out = grouped_gemm(h, experts.down_proj, offsets)  # [T*k, H]
    else:
        gate_up = grouped_gemm(x, experts.gate_up_proj, offsets, transpose_w=True)
        gate_up = gate_up + experts.gate_up_proj_bias[expert_of_row]
        # gpt_oss's clamped, interleaved gate is not the SwiGLU kernel's math: the model's own _apply_gate runs here.
        h = experts._apply_gate(gate_up)
        out = grouped_gemm(h, experts.down_proj, offsets, transpose_w=True)
        out = out + experts.down_proj_bias[expert_of_row]
    out = out * weights
    result = torch.zeros_like(hidden)
    return result.index_add_(0, token, out.to(hidden.dtype))


def fused_moe_forward(block: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Replacement for the forward of Qwen3MoeSparseMoeBlock / MixtralSparseMoeBlock / GptOssMLP.

    Args:
        block: the MoE block; hidden_states: [B, S, H].
    Returns:
        What the block returns: [B, S, H] (qwen3_moe, mixtral), or (out [B, S, H], router_scores [B*S, k]) for
        gpt_oss. Router logits reach the aux loss through the model's own router hooks, untouched.
    """
    b, s, h = hidden_states.shape
    if hasattr(block, "router"):  # gpt_oss
        flat = hidden_states.reshape(-1, h)
        _, scores, indices = block.router(flat)
        out = fused_experts(block.experts, flat, indices, scores)
        return out.reshape(b, s, h), scores
    if block.training and getattr(block, "jitter_noise", 0) > 0:  # mixtral, exactly as its forward
        hidden_states = hidden_states * torch.empty_like(hidden_states).uniform_(
            1.0 - block.jitter_noise, 1.0 + block.jitter_noise
        )
    flat = hidden_states.view(-1, h)
    _, scores, indices = block.gate(flat)
    return fused_experts(block.experts, flat, indices, scores).reshape(b, s, h)
