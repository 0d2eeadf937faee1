"""Optimizers in steady state: torch AdamW (foreach, states created before the measured step) and bitsandbytes'
8-bit AdamW layout (two uint8 states + fp32 absmax per 256 values for tensors >= 4096 elements, fp32 otherwise) with
an in-place update, which is what its fused kernel does."""

from __future__ import annotations

import math

import torch
from torch import nn


class Adam8bitModel:
    """bitsandbytes 8-bit AdamW's memory: uint8 m and v + fp32 absmax per 256 for tensors >= 4096 elements."""

    def __init__(self, params: list[nn.Parameter]) -> None:
        self.params = params
        self.state: dict[nn.Parameter, list[torch.Tensor]] = {}

    def init_state(self) -> None:
        for p in self.params:
            if p.numel() >= 4096:
                blocks = math.ceil(p.numel() / 256)
                self.state[p] = [
                    torch.zeros_like(p, dtype=torch.uint8),
                    torch.zeros_like(p, dtype=torch.uint8),
                    p.new_zeros(blocks, dtype=torch.float32),
                    p.new_zeros(blocks, dtype=torch.float32),
                ]
            else:
                self.state[p] = [torch.zeros_like(p, dtype=torch.float32), torch.zeros_like(p, dtype=torch.float32)]

    def state_tensors(self) -> list[torch.Tensor]:
        return [t for ts in self.state.values() for t in ts]

    def step(self) -> None:
        with torch.no_grad():
            for p in self.params:
                if p.grad is not None:
                    p.add_(p.grad, alpha=-1e-4)  # bnb's fused kernel updates in place with no temporaries

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            p.grad = None


def make_optimizer(name: str, params: list[nn.Parameter]):
    if name in ("adamw", "adamw_torch"):
        opt = torch.optim.AdamW(params, lr=1e-4, foreach=True)
        for p in params:  # steady state: create the states now, outside the measured step
            p.grad = torch.zeros_like(p)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return opt, [t for s in opt.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
    if name in ("adamw_8bit", "adamw_bnb_8bit", "paged_adamw_8bit"):
        opt = Adam8bitModel(params)
        opt.init_state()
        return opt, opt.state_tensors()
    if name == "sgd":
        opt = torch.optim.SGD(params, lr=1e-4)
        return opt, []
    raise ValueError(f"unknown optimizer {name!r}; choose adamw, adamw_8bit or sgd")
