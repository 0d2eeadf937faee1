"""Gradient checkpointing with the layer inputs offloaded to host memory.

Standard checkpointing keeps one ``[batch, seq, hidden]`` input per decoder layer on the GPU; at long context that is
what remains of the activations (32 layers x 32K tokens x 4096 x 2 bytes = 8 GiB for an 8B model). ``"fastft"`` mode
moves each layer's input to pinned host memory as soon as the layer has read it, on a side CUDA stream so the copy
overlaps the layer's compute, and brings it back for the recompute in the backward pass (the copy for layer i-1 is
started while layer i recomputes, so it is ready when needed).

On CPU there is no device memory to free: ``"fastft"`` mode degrades to standard (non-reentrant) checkpointing and
says so. The offloading function itself runs on CPU too (host copies), which is how its gradients are tested.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from typing import Any

import torch
from torch.utils.checkpoint import checkpoint

from fastft._log import info_once
from fastft.kernels import autocast_enabled


class _OffloadedCheckpoint(torch.autograd.Function):
    """Run ``function(hidden, **kwargs)`` without a graph; keep only ``hidden`` (on the host); recompute in backward."""

    @staticmethod
    def forward(ctx, function: Callable, prefetcher: _Prefetcher, hidden: torch.Tensor, *extra: torch.Tensor):
        ctx.function = function
        ctx.device = hidden.device
        ctx.extra = extra
        ctx.cpu_rng = torch.get_rng_state()
        ctx.cuda_rng = torch.cuda.get_rng_state(hidden.device) if hidden.is_cuda else None
        ctx.autocast = _autocast_state(hidden.device.type)
        ctx.handle = prefetcher.offload(hidden)
        ctx.prefetcher = prefetcher
        with torch.no_grad():
            out = function(hidden, *extra)
        return out

    @staticmethod
    def backward(ctx, *grads: torch.Tensor):
        hidden = ctx.prefetcher.fetch(ctx.handle, ctx.device).detach().requires_grad_(True)
        rng_devices = [ctx.device] if ctx.cuda_rng is not None else []
        # The backward runs after the Trainer's autocast (bf16/fp16 mixed precision) has exited: recompute under the
        # autocast state the forward saw, or the recomputed layer would differ from the one whose output was used.
        with torch.random.fork_rng(devices=rng_devices), torch.enable_grad(), _autocast_context(ctx.autocast):
            torch.set_rng_state(ctx.cpu_rng)
            if ctx.cuda_rng is not None:
                torch.cuda.set_rng_state(ctx.cuda_rng, ctx.device)
            out = ctx.function(hidden, *ctx.extra)
        outs = out if isinstance(out, tuple) else (out,)
        pairs = [(o, g) for o, g in zip(outs, grads) if isinstance(o, torch.Tensor) and o.requires_grad and g is not None]
        if pairs:
            torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
        return (None, None, hidden.grad) + (None,) * len(ctx.extra)


def _autocast_state(device_type: str) -> list[tuple[str, torch.dtype, bool]]:
    """(device type, dtype, cache flag) for each autocast that is on now: the model's device and the CPU."""
    state = []
    for dev in dict.fromkeys((device_type, "cpu")):
        if autocast_enabled(dev):
            state.append((dev, torch.get_autocast_dtype(dev), torch.is_autocast_cache_enabled()))
    return state


def _autocast_context(state: list[tuple[str, torch.dtype, bool]]) -> contextlib.ExitStack:
    stack = contextlib.ExitStack()
    for dev, dtype, cache in state:
        stack.enter_context(torch.autocast(dev, dtype=dtype, cache_enabled=cache))
    return stack


class _Prefetcher:
    """Moves layer inputs to pinned host memory on a side stream and back, one step ahead in the backward."""

    def __init__(self) -> None:
        self.stream: torch.cuda.Stream | None = None
        self._slots: list[list[Any]] = []  # [host tensor, ready event, device tensor or None]

    def offload(self, hidden: torch.Tensor) -> int:
        if hidden.is_cuda:
            if self.stream is None:
                self.stream = torch.cuda.Stream(hidden.device)
            host = torch.empty(hidden.shape, dtype=hidden.dtype, pin_memory=True)
            self.stream.wait_stream(torch.cuda.current_stream(hidden.device))
            with torch.cuda.stream(self.stream):
                host.copy_(hidden, non_blocking=True)
                hidden.record_stream(self.stream)  # keep the device buffer alive until the copy finishes
                event = torch.cuda.Event()
                event.record(self.stream)
        else:
            host, event = hidden.detach().clone(), None
        self._slots.append([host, event, None])
        return len(self._slots) - 1

    def _start_fetch(self, index: int, device: torch.device) -> None:
        slot = self._slots[index]
        if slot[2] is not None or slot[0] is None:
            return
        host, event = slot[0], slot[1]
        if device.type == "cuda":
            with torch.cuda.stream(self.stream):
                if event is not None:
                    self.stream.wait_event(event)
                slot[2] = host.to(device, non_blocking=True)
                slot[1] = torch.cuda.Event()
                slot[1].record(self.stream)
        else:
            slot[2] = host

    def fetch(self, index: int, device: torch.device) -> torch.Tensor:
        self._start_fetch(index, device)
        slot = self._slots[index]
        tensor = slot[2]
        if device.type == "cuda":
            torch.cuda.current_stream(device).wait_event(slot[1])
            tensor.record_stream(torch.cuda.current_stream(device))
        if index > 0:
            self._start_fetch(index - 1, device)  # the layer below is next in the backward: start its copy now
        self._slots[index] = [None, None, None]
        if all(s[0] is None for s in self._slots):
            self._slots.clear()
        return tensor


_PREFETCHERS: dict[int, _Prefetcher] = {}


def offloaded_checkpoint(function: Callable, hidden: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
    """Drop-in for ``torch.utils.checkpoint.checkpoint`` as transformers calls it (``function(hidden, ...)``)."""
    extra = tuple(args)
    if kwargs:
        function = functools.partial(function, **kwargs)
    if not torch.is_grad_enabled():
        return function(hidden, *extra)
    prefetcher = _PREFETCHERS.setdefault(hidden.device.index or 0, _Prefetcher())
    return _OffloadedCheckpoint.apply(function, prefetcher, hidden, *extra)


def enable_checkpointing(model: torch.nn.Module, mode: bool | str) -> str:
    """Turn on checkpointing per ``mode`` (True/"standard", "fastft" offloaded, False/None off); returns what ran."""
    if mode in (False, None, "none"):
        if getattr(model, "is_gradient_checkpointing", False):
            model.gradient_checkpointing_disable()
        return "off"
    if mode not in (True, "standard", "fastft", "unsloth"):
        raise ValueError(f"use_gradient_checkpointing must be True, False or 'fastft'; got {mode!r}")
    base = getattr(model, "get_base_model", lambda: model)()
    on_cuda = mode in ("fastft", "unsloth") and _on_cuda(base)  # standard mode: no walk over the parameters
    if on_cuda:
        base._set_gradient_checkpointing(True, offloaded_checkpoint)
        _require_input_grads(base)
        return "fastft (offloaded to pinned host memory)"
    if mode in ("fastft", "unsloth"):
        info_once(
            "fastft: offloaded checkpointing frees GPU memory; the model is not on CUDA, so standard gradient "
            "checkpointing runs instead"
        )
    base._set_gradient_checkpointing(True, functools.partial(checkpoint, use_reentrant=False))
    return "standard"


def _on_cuda(model: torch.nn.Module) -> bool:
    """Whether any parameter of ``model`` is on CUDA (where offloading frees device memory)."""
    return any(p.is_cuda for p in model.parameters())


def _require_input_grads(model: torch.nn.Module) -> None:
    # The offloaded function builds its graph in backward only, so its input must require grad for backward to reach
    # it when the embeddings are frozen (LoRA): same need, same remedy, as reentrant checkpointing.
    if hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()
