"""PEFT LoRA's forward, op for op, over a stand-in (or plain) base layer; ``fused`` routes it through fastft's
``LoRAProjections`` as FastModel does."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from fastft.memory.standins.linear4bit import Linear4bit

if TYPE_CHECKING:
    from fastft.kernels.lora import AdapterParts


class LoraLinear(nn.Module):
    """PEFT LoRA's forward op for op: base(x) [+ clone for 4-bit] + lora_B(lora_A(x)) * scaling."""

    def __init__(
        self,
        base: nn.Module,
        in_features: int,
        out_features: int,
        r: int,
        alpha: float,
        device: torch.device | str,
        clone_result: bool,
    ) -> None:
        super().__init__()
        self.base_layer = base
        self.lora_A = nn.Parameter(torch.zeros(r, in_features, device=device))  # fp32 master weights
        self.lora_B = nn.Parameter(torch.zeros(out_features, r, device=device))
        self.scaling = alpha / r
        self.clone_result = clone_result
        self.in_features, self.out_features = in_features, out_features
        self.fused = False  # fastft: run through fastft.kernels.lora's LoRAProjections, as FastModel does

    def fused_parts(self, dtype: torch.dtype) -> AdapterParts:
        """The adapter as fastft.patches.peft_lora reads a PEFT layer, the fp32 adapters cast to the compute dtype as
        autocast (and fastft's fused path under it) does."""
        from fastft.kernels.lora import AdapterParts, BaseWeight

        base = self.base_layer
        nf4 = isinstance(base, Linear4bit)
        weight = base.base_weight() if nf4 else BaseWeight(base.weight.detach())
        return AdapterParts(weight, self.lora_A.to(dtype), self.lora_B.to(dtype), self.scaling, nf4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused:
            from fastft.kernels.lora import projections_from_parts

            return projections_from_parts(x, [self.fused_parts(x.dtype)])[0]
        result = self.base_layer(x)
        if self.clone_result:
            result = result.clone()
        a = torch.nn.functional.linear(x, self.lora_A.to(x.dtype))
        b = torch.nn.functional.linear(a, self.lora_B.to(x.dtype))
        return result + b * self.scaling
