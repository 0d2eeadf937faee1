"""MoE expert stacks in the step model (fastft.memory.step_model): weights, LoRA and activations, modeled on meta.

The experts modules (``Qwen3MoeExperts`` / ``MixtralExperts`` / ``GptOssExperts``) are swapped for
:class:`ExpertsStandIn`, which adds PEFT's LoRA on the stacked weights and runs one of the paths below. Buffer sizes
depend on the routing only through its total, T*k rows, which no routing changes (transformers' eager loop picks the
experts hit with ``nonzero()``, which meta cannot answer: there the routing is fixed, uniform).

- Weights: the stacked ``gate_up_proj`` / ``down_proj`` (and gpt_oss's biases) stay in the compute dtype. bitsandbytes
  4-bit quantizes ``nn.Linear`` layers only, and transformers 5.24 holds experts as 3-D parameters, so a QLoRA load
  leaves the experts in 16 bits -- checked: neither ``integrations/bitsandbytes.py`` nor
  ``quantizers/quantizer_bnb_4bit.py`` mentions experts, nor ``integrations/moe.py`` bitsandbytes.
- LoRA (``lora_r > 0``): PEFT's ``target_parameters`` path, as FastModel's defaults set it -- fp32 factors A
  [E*r, in] and B [out, E*r], and on every forward ``W + scaling * B @ A`` materialized per stack (PEFT's
  ``_LoraFactorsProxy``: one ``baddbmm`` in W's dtype), whose gradient is the full [E, N, K] in backward.
- baseline / unpatched: what transformers runs. By default (``experts_implementation`` unset) that is its
  ``grouped_mm`` path -- ``transformers.integrations.moe.grouped_mm_experts_forward`` itself runs here, on meta:
  sort, gather, torch's grouped_mm per projection, gate, routing weights, reshape-sum. With ``"eager"``: the loop op
  for op (gather, ``linear`` with ``W[e]``, act * up, ``linear``, weight, ``index_add_``) with every expert given
  ``T*k/E`` rows; ``W[e]``'s backward allocates the whole stack's gradient per expert when W requires grad (LoRA).
- fastft: :func:`fastft.kernels.moe.fused_experts` on the same (effective) weights -- one grouped GEMM per
  projection, their fake impls charging the outputs.
"""

from __future__ import annotations

import types
from typing import Any

import torch
from torch import nn


class ExpertsStandIn(nn.Module):
    """An experts stack for the step model: the module's own parameters, optional PEFT-style LoRA, the loop or the
    grouped GEMM (``fused``)."""

    def __init__(self, experts: nn.Module, r: int, alpha: float, fused: bool, device: Any) -> None:
        from fastft.kernels.moe import expert_layout

        super().__init__()
        self.layout = expert_layout(experts)
        self.original = experts  # holds the parameters (frozen) and act_fn / _apply_gate
        self.num_experts = experts.num_experts
        self.fused = fused
        #: what transformers runs for this model: "grouped_mm" (5.24's default: sort, gather, torch grouped_mm) or
        #: "eager" (the loop over experts, modeled with a uniform routing)
        self.implementation = getattr(getattr(experts, "config", None), "_experts_implementation", None) or "eager"
        self.scaling = alpha / r if r > 0 else 0.0
        self.lora = nn.ParameterDict()
        for name in ("gate_up_proj", "down_proj"):
            if r <= 0:
                break
            e, d1, d2 = getattr(experts, name).shape
            out_f, in_f = (d1, d2) if self.layout == "concatenated" else (d2, d1)
            # PEFT's ParamWrapper: lora_A Linear(in, r*E), lora_B Linear(r*E, out), fp32 master weights
            self.lora[f"{name}_A"] = nn.Parameter(torch.zeros(r * e, in_f, device=device))
            self.lora[f"{name}_B"] = nn.Parameter(torch.zeros(out_f, r * e, device=device))

    def _weight(self, name: str) -> torch.Tensor:
        w = getattr(self.original, name)
        if f"{name}_A" not in self.lora:
            return w
        a, b = self.lora[f"{name}_A"], self.lora[f"{name}_B"]
        e = self.num_experts
        a = a.to(w.dtype).reshape(e, -1, a.shape[-1])  # [E, r, in]
        b = b.to(w.dtype).reshape(b.shape[0], -1, e).permute(2, 0, 1)  # [E, out, r]
        if self.layout == "concatenated":  # W [E, out, in] += B @ A
            return torch.baddbmm(w, b, a, alpha=self.scaling)
        return torch.baddbmm(w, a.transpose(1, 2), b.transpose(1, 2), alpha=self.scaling)  # W [E, in, out]

    def forward(self, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        weights = {name: self._weight(name) for name in ("gate_up_proj", "down_proj")}
        view = types.SimpleNamespace(num_experts=self.num_experts, **weights)
        for name in ("act_fn", "gate_up_proj_bias", "down_proj_bias", "limit", "alpha"):
            if hasattr(self.original, name):
                setattr(view, name, getattr(self.original, name))
        if self.layout == "gpt_oss":
            view._apply_gate = self.original._apply_gate
        if self.fused:
            from fastft.kernels.moe import fused_experts

            return fused_experts(view, hidden, top_k_index, top_k_weights)
        if self.implementation == "grouped_mm":  # transformers 5.24's default experts implementation
            from transformers.integrations.moe import grouped_mm_experts_forward

            for name in ("has_gate", "has_bias", "is_transposed", "has_post_expert_norm", "_is_expert_parallel"):
                setattr(view, name, getattr(self.original, name))
            view._apply_gate = self.original._apply_gate
            return grouped_mm_experts_forward(view, hidden, top_k_index, top_k_weights)
        return self._loop(view, hidden, top_k_index, top_k_weights)

    def _loop(self, view: Any, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        """transformers' loop over experts, each expert given T*k/E rows (the total is the routing's T*k)."""
        t, k = top_k_index.shape
        out = torch.zeros_like(hidden)
        rows = t * k
        for e in range(self.num_experts):
            n = rows // self.num_experts + (1 if e < rows % self.num_experts else 0)
            if n == 0:
                continue
            first = e * (rows // self.num_experts) + min(e, rows % self.num_experts)
            row = torch.arange(first, first + n, device=hidden.device)  # valid rows on any device, meta included
            token, slot = row // k, row % k
            x = hidden[token]
            if self.layout == "concatenated":
                gate, up = nn.functional.linear(x, view.gate_up_proj[e]).chunk(2, dim=-1)
                h = view.act_fn(gate) * up
                y = nn.functional.linear(h, view.down_proj[e])
            else:
                gate_up = x @ view.gate_up_proj[e] + view.gate_up_proj_bias[e]
                y = view._apply_gate(gate_up) @ view.down_proj[e] + view.down_proj_bias[e]
            y = y * top_k_weights[token, slot, None]
            out.index_add_(0, token, y.to(out.dtype))
        return out


def replace_experts(model: nn.Module, r: int, alpha: float, fused: bool, device: Any) -> list[str]:
    """Swap every supported experts module of ``model`` for :class:`ExpertsStandIn`; returns notes (empty for a
    dense model)."""
    from fastft.kernels.moe import SUPPORTED_EXPERTS

    count, total, implementation = 0, 0, None
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child).__name__ in SUPPORTED_EXPERTS:
                stand_in = ExpertsStandIn(child, r, alpha, fused, device)
                setattr(parent, name, stand_in)
                implementation = stand_in.implementation
                count += 1
                total += sum(p.numel() for p in child.parameters())
    if not count:
        return []
    how = (
        "fastft's grouped GEMM"
        if fused
        else {"grouped_mm": "transformers' grouped_mm experts path (its default)"}.get(
            implementation, f"transformers' loop over experts (experts_implementation={implementation!r})"
        )
    )
    lora = f"LoRA r={r} on the stacked experts (PEFT target_parameters)" if r > 0 else "no LoRA on experts"
    return [
        f"MoE: {count} expert stacks, {total / 1e9:.2f}B parameters kept in 16 bits (bitsandbytes quantizes "
        f"nn.Linear only); {lora}; {how}; routing: T*k rows in all"
        + (", uniform over experts (T*k/E each)" if not fused and implementation == "eager" else "")
    ]
