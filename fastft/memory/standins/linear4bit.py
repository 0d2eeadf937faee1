"""A frozen base linear stored as bitsandbytes stores NF4 (packed uint8, absmax fp32 per 64 values, or with double
quantization uint8 absmax + fp32 per 256 + a 256-entry code); its forward and backward dequantize a temporary
[out, in] weight (an opaque op: counted, then freed), as ``bnb.matmul_4bit`` does."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
from torch import nn

QUANT_BLOCK = 64  # bitsandbytes' default 4-bit blocksize
NESTED_BLOCK = 256  # double quantization: one fp32 scale per 256 quantized absmax values

#: NF4's 16 levels (QLoRA, Dettmers et al. 2023: quantiles of N(0, 1) scaled to [-1, 1], with an exact zero) as
#: bitsandbytes stores them; the step uses them only on real tensors. tests/bnb_reference.py's oracle reads them from
#: here, and tests/kernels/test_nf4.py checks them against bitsandbytes' own table.
NF4_LEVELS = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)


@torch.library.custom_op("fastft_memmodel::dequantize_4bit", mutates_args=())
def dequantize_4bit(
    packed: torch.Tensor, absmax: torch.Tensor, out_features: int, in_features: int, dtype: torch.dtype
) -> torch.Tensor:
    codes = torch.stack([packed.view(-1) >> 4, packed.view(-1) & 0xF], dim=1).view(-1)[: out_features * in_features]
    table = torch.tensor(NF4_LEVELS, device=packed.device)
    scale = absmax.float().repeat_interleave(QUANT_BLOCK)[: codes.numel()]
    return (table[codes.long()] * scale).to(dtype).view(out_features, in_features)


@dequantize_4bit.register_fake
def _(packed, absmax, out_features, in_features, dtype):
    return packed.new_empty(out_features, in_features, dtype=dtype)


class _Matmul4bit(torch.autograd.Function):
    """y = x @ dequant(W).T; the dequantized weight is a temporary in forward and again in backward, never saved."""

    @staticmethod
    def forward(ctx, x, module, bias):
        ctx.module = module
        w = module.dequantize()
        return torch.nn.functional.linear(x, w, bias)

    @staticmethod
    def backward(ctx, grad):
        w = ctx.module.dequantize()
        return torch.matmul(grad, w), None, None


class Linear4bit(nn.Module):
    """A frozen base linear stored as bitsandbytes NF4 (buffers sized exactly as bnb stores them)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        dtype: torch.dtype,
        device: torch.device | str,
        double_quant: bool = True,
        bias: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)
        self.in_features, self.out_features, self.compute_dtype = in_features, out_features, dtype
        numel = in_features * out_features
        blocks = math.ceil(numel / QUANT_BLOCK)
        self.register_buffer("packed", torch.zeros((numel + 1) // 2, 1, dtype=torch.uint8, device=device))
        if double_quant:
            self.register_buffer("absmax_q", torch.zeros(blocks, dtype=torch.uint8, device=device))
            self.register_buffer("absmax2", torch.ones(math.ceil(blocks / NESTED_BLOCK), device=device))
            self.register_buffer("code2", torch.zeros(256, device=device))
            self.register_buffer("offset", torch.zeros((), device=device))
        else:
            self.register_buffer("absmax", torch.ones(blocks, device=device))
        self.register_buffer("code", torch.zeros(16, device=device))
        self.double_quant = double_quant

    def dequantize(self) -> torch.Tensor:
        # The absmax de-nesting is a handful of KB; only the [out, in] weight matters, and that is what the op outputs.
        absmax = self.absmax2.repeat_interleave(NESTED_BLOCK)[: self.absmax_q.numel()] if self.double_quant else self.absmax
        return dequantize_4bit(self.packed, absmax, self.out_features, self.in_features, self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _Matmul4bit.apply(x, self, self.bias)

    def base_weight(self) -> Any:
        """The weight as fastft's fused LoRA reads a bitsandbytes Params4bit: packed bytes + a quant state."""
        from fastft.kernels.lora import BaseWeight

        if self.double_quant:
            nested = _QuantState(self.absmax2, self.code2, NESTED_BLOCK, None, torch.float32)
            state = _QuantState(
                self.absmax_q,
                self.code,
                QUANT_BLOCK,
                "nf4",
                self.compute_dtype,
                (self.out_features, self.in_features),
                self.offset,
                nested,
            )
        else:
            state = _QuantState(
                self.absmax, self.code, QUANT_BLOCK, "nf4", self.compute_dtype, (self.out_features, self.in_features)
            )
        return BaseWeight(self.packed, state)


@dataclasses.dataclass
class _QuantState:
    """The fields of ``bitsandbytes.functional.QuantState`` that fastft.kernels.nf4 reads."""

    absmax: torch.Tensor
    code: torch.Tensor
    blocksize: int
    quant_type: str | None
    dtype: torch.dtype
    shape: tuple[int, int] | None = None
    offset: torch.Tensor | None = None
    state2: _QuantState | None = None

    @property
    def nested(self) -> bool:
        return self.state2 is not None
