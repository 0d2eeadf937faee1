"""Gradient checkpointing per decoder layer (our own recompute: some torch.utils.checkpoint paths call ``.item()``),
optionally offloading the saved input to host memory (counted in :class:`HostLedger`, not by the tracker), and the
layer replay that lets a meta run skip identical layers."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import _disable_current_modes

from fastft.memory.tracker import LiveBytesTracker


class HostLedger:
    """Host (CPU RAM) bytes held by offloaded checkpoints; live and peak."""

    def __init__(self) -> None:
        self.live = 0
        self.peak = 0

    def add(self, nbytes: int) -> None:
        self.live += nbytes
        self.peak = max(self.peak, self.live)

    def remove(self, nbytes: int) -> None:
        self.live -= nbytes


@contextlib.contextmanager
def _phase(tracker: LiveBytesTracker | None, name: str) -> Iterator[None]:
    if tracker is None:
        yield
    else:
        with tracker.in_phase(name):
            yield


class _Checkpoint(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, run: Callable[[torch.Tensor], torch.Tensor], owner: CheckpointedLayer, x: torch.Tensor, *params: torch.Tensor
    ):
        ctx.run, ctx.owner = run, owner
        tracker, memo = owner.tracker, owner.memo
        key = ("forward", owner.signature, tuple(x.shape), x.dtype)
        if memo is not None and key in memo:
            # An identical layer already ran on identical shapes: replay its transient high-water mark and output.
            extra, out_shape, out_dtype = memo[key]
            tracker.transient(extra)
            out = x.new_empty(out_shape, dtype=out_dtype)
        else:
            with torch.no_grad(), tracker.local_peak() if memo is not None else contextlib.nullcontext([]) as peak:
                before = tracker.live_bytes if tracker is not None else 0
                out = run(x)
            if memo is not None:
                memo[key] = (peak[0] - before, tuple(out.shape), out.dtype)
        if owner.offload:
            with _disable_current_modes():  # the host copy is not device memory: keep it out of the tracker
                ctx.host = x.detach().clone()
            ctx.host_bytes = x.untyped_storage().nbytes()
            owner.ledger.add(ctx.host_bytes)
        else:
            ctx.save_for_backward(x)
        return out

    @staticmethod
    def backward(ctx, grad):
        owner = ctx.owner
        tracker, memo = owner.tracker, owner.memo
        key = ("backward", owner.signature, tuple(grad.shape), grad.dtype)
        if owner.offload:
            host = ctx.host
            del ctx.host
            owner.ledger.remove(ctx.host_bytes)
        if memo is not None and key in memo:
            with _phase(tracker, "recompute"):
                tracker.transient(memo[key])
            with _phase(tracker, "gradients"):
                for p in owner.trainable:  # what the layer's backward would have accumulated
                    if p.grad is None:
                        p.grad = torch.zeros_like(p)
            with _phase(tracker, "backward"):
                dx = grad.new_empty(grad.shape)
            return (None, None, dx) + (None,) * (len(ctx.needs_input_grad) - 3)
        with tracker.local_peak() if memo is not None else contextlib.nullcontext([]) as peak:
            before = tracker.live_bytes if tracker is not None else 0
            with _phase(tracker, "recompute"):
                x = host.clone() if owner.offload else ctx.saved_tensors[0]  # copy-back: a counted allocation
                x = x.detach().requires_grad_(True)
                with torch.enable_grad():
                    out = ctx.run(x)
            with _phase(tracker, "backward"):
                torch.autograd.backward(out, grad)
            dx = x.grad
            del out, x
        if memo is not None:
            memo[key] = peak[0] - before
        return (None, None, dx) + (None,) * (len(ctx.needs_input_grad) - 3)


class CheckpointedLayer(nn.Module):
    """Checkpoint one decoder layer: no graph in forward, recompute in backward; optionally offload its input.

    ``memo`` (a dict shared by the layers of one model, meta runs only): identical layers on identical shapes
    allocate identically, so after the first layer has run for real, the others replay its measured transient
    high-water mark and its persistent allocations (output; in backward, parameter grads and dx). The replay is
    checked against full execution in tests/memory/test_step_model.py.
    """

    def __init__(self, layer: nn.Module, offload: bool, ledger: HostLedger) -> None:
        super().__init__()
        self.layer = layer
        self.offload = offload
        self.ledger = ledger
        self.tracker: LiveBytesTracker | None = None
        self.memo: dict | None = None
        self.attention_type = getattr(layer, "attention_type", None)

    @property
    def trainable(self) -> list[nn.Parameter]:
        return [p for p in self.layer.parameters() if p.requires_grad]

    @property
    def signature(self) -> tuple:
        sig = getattr(self, "_signature", None)
        if sig is None:
            sig = self._signature = (
                type(self.layer).__name__,
                self.attention_type,
                self.offload,
                tuple(
                    (n, tuple(t.shape), t.dtype, t.requires_grad)
                    for n, t in list(self.layer.named_parameters()) + list(self.layer.named_buffers())
                ),
            )
        return sig

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        def run(x: torch.Tensor) -> torch.Tensor:
            out = self.layer(x, *args, **kwargs)
            return out[0] if isinstance(out, tuple) else out

        if not torch.is_grad_enabled():
            return run(hidden_states)
        # Trainable params reached by the layer are passed so the node exists even if x did not require grad.
        return _Checkpoint.apply(run, self, hidden_states, *self.trainable)
