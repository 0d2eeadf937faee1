"""Sequence-tiled MLP: run the MLP over chunks of tokens so its [tokens, intermediate] activations never exist for the
whole sequence at once, in forward or backward.

Forward runs each chunk without building a graph and keeps only the input. Backward recomputes one chunk at a time
with autograd on, backpropagates that chunk's output gradient (parameter gradients -- the LoRA adapters' -- accumulate
as usual) and writes that chunk's input gradient. Peak MLP activation memory drops from ``tokens x intermediate`` to
``tile x intermediate``; the price is one extra MLP forward per chunk in the backward, as with checkpointing.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


class _TiledMLP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, mlp: Callable[[torch.Tensor], torch.Tensor], tile: int, x: torch.Tensor, *params: torch.Tensor):
        ctx.mlp, ctx.tile = mlp, tile
        ctx.save_for_backward(x)
        flat = x.reshape(-1, x.shape[-1])
        with torch.no_grad():
            out = torch.cat([mlp(chunk) for chunk in flat.split(tile)], dim=0)
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        (x,) = ctx.saved_tensors
        flat = x.reshape(-1, x.shape[-1])
        grad_flat = grad_out.reshape(-1, grad_out.shape[-1])
        dx = torch.empty_like(flat) if ctx.needs_input_grad[2] else None
        for start in range(0, flat.shape[0], ctx.tile):
            stop = min(start + ctx.tile, flat.shape[0])
            chunk = flat[start:stop].detach().requires_grad_(ctx.needs_input_grad[2])
            with torch.enable_grad():
                out = ctx.mlp(chunk)
            torch.autograd.backward(out, grad_flat[start:stop])
            if dx is not None:
                dx[start:stop] = chunk.grad
        return (None, None, None if dx is None else dx.view_as(x)) + (None,) * (len(ctx.needs_input_grad) - 3)


def tiled_mlp(mlp: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, tile: int) -> torch.Tensor:
    """``mlp(x)`` computed ``tile`` tokens at a time; x [..., hidden] -> [..., out]. Same values and gradients.

    The trainable parameters reached by ``mlp`` get their gradients from the per-chunk backward (accumulated into
    ``.grad``); the function's autograd node exists only so the backward runs, so at least one input of the graph
    must require grad (x does inside a model in training).
    """
    if tile <= 0:
        raise ValueError(f"tile must be positive, got {tile}")
    if not torch.is_grad_enabled() or not x.requires_grad:
        flat = x.reshape(-1, x.shape[-1])
        out = torch.cat([mlp(chunk) for chunk in flat.split(tile)], dim=0)
        return out.view(*x.shape[:-1], out.shape[-1])
    return _TiledMLP.apply(mlp, tile, x)
