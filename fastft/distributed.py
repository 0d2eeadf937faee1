"""fastft under ``accelerate launch`` with more than one process: the one place that knows about sharded weights.

Why this exists. fastft's fused LM-head losses (``linear_cross_entropy``, ``selective_log_softmax``) and fused LoRA
read weights *directly* (``head.weight``, the LoRA base weight) instead of calling the module that owns them. Under
data parallelism (DDP) that is fine: every rank holds the full weight. Under sharding engines a weight read outside
its module's ``__call__`` can be a shard or a placeholder:

* FSDP2 (``torch.distributed.fsdp.fully_shard``, accelerate ``fsdp_version: 2``): outside the forward of the
  module group that owns it, a parameter is a ``DTensor`` holding this rank's shard. Inside that group's forward it is
  swapped for the unsharded plain tensor, so a head read inside the root model's forward is already full; a head
  wrapped in its *own* ``fully_shard`` group (never called by a fused loss) stays a DTensor.
  :func:`full_weight` all-gathers it with ``DTensor.full_tensor()``, which is differentiable: the backward
  reduce-scatters the gradient back to the shards, so the optimizer sees the same sharded gradient it would have
  seen from ``lm_head(hidden)``.
* DeepSpeed ZeRO-3: a partitioned parameter is an empty placeholder (``ds_status`` NOT_AVAILABLE, ``numel() == 0``)
  outside its module's forward, and its gradient is collected only through DeepSpeed's module hooks. There is no
  clean differentiable gather from outside the module, so :func:`direct_read_problem` reports it and callers take the
  unfused path (which calls the module, so ZeRO-3's hooks gather it) and log why.

Callers: the causal-LM fused loss (``fastft.patches.causal_lm_loss``), PatchFastRL's fast LM head
(``fastft.patches.trl``) and fused LoRA's ``can_fuse`` (``fastft.patches.peft_lora``).
"""

from __future__ import annotations

import os
from typing import Any

import torch

from fastft._log import info_once


def is_dtensor(t: Any) -> bool:
    """True when ``t`` is a ``torch.distributed.tensor.DTensor`` (an FSDP2 / tensor-parallel sharded tensor)."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch built without distributed
        return False
    return isinstance(t, DTensor)


def is_zero3_param(t: Any) -> bool:
    """True for any parameter DeepSpeed ZeRO-3 manages (it carries a ``ds_id``), gathered on this rank or not."""
    return hasattr(t, "ds_id")


def is_zero3_partitioned(t: Any) -> bool:
    """True for a DeepSpeed ZeRO-3 parameter whose data is not gathered on this rank (an empty placeholder)."""
    if not is_zero3_param(t):
        return False
    status = getattr(t, "ds_status", None)
    return getattr(status, "name", str(status)) != "AVAILABLE" or t.numel() == 0


def direct_read_problem(weight: Any) -> str | None:
    """Why ``weight`` cannot be handed to a fused kernel as a full tensor (None: it can, possibly via full_weight).

    DTensors are fine (:func:`full_weight` gathers them); ZeRO-3 placeholders are not.
    """
    if is_zero3_partitioned(weight):
        return (
            "the weight is a DeepSpeed ZeRO-3 partitioned parameter (not gathered outside its module's forward; "
            "its gradient flows only through DeepSpeed's module hooks)"
        )
    return None


def full_weight(weight: torch.Tensor) -> torch.Tensor:
    """The full, unsharded ``weight`` for a fused kernel, differentiable.

    Shapes: a ``[V, H]`` (or any) weight; returns a plain tensor of the same global shape and dtype.

    * plain tensor / Parameter (single process, DDP, FSDP2 inside its group's forward): returned as is.
    * FSDP2 / TP ``DTensor``: ``weight.full_tensor(grad_placements=Partial(sum))`` -- an all-gather whose backward
      reduce-scatters the gradient into the shards, scaled by 1 / mesh size, so ``weight.grad`` is the same sharded
      mean gradient FSDP2 produces for the module's own forward. Costs one temporary full copy of the weight per call
      (what the module's own forward would gather).
    * ZeRO-3 placeholder: ``RuntimeError`` (callers check :func:`direct_read_problem` first and fall back).
    """
    problem = direct_read_problem(weight)
    if problem:
        raise RuntimeError(f"fastft.distributed.full_weight: {problem}; call the module instead")
    if is_dtensor(weight):
        info_once(
            f"fastft: gathering a sharded (DTensor {tuple(weight.shape)}, placements "
            f"{tuple(str(p) for p in weight.placements)}) weight for a fused kernel with full_tensor(); its "
            "gradient is reduce-scattered back to the shards",
            key=f"full-weight-{tuple(weight.shape)}",
        )
        from torch.distributed.tensor import Partial

        # full_tensor()'s default backward treats the incoming gradient as Replicate (identical on every rank) and
        # just keeps this rank's slice: under FSDP each rank's gradient comes from different data, so the shards
        # would get an un-reduced local gradient (measured: per-step losses diverge from one process at step 2).
        # Declaring it Partial(sum) makes the backward a reduce-scatter; 1/mesh.size() turns the sum into the mean
        # FSDP uses for every other gradient (tested: FSDP2, 1-D mesh; for a tensor-parallel mesh, where the
        # incoming gradients are identical, sum / size is that gradient again -- reasoned, not tested).
        mesh = weight.device_mesh
        full = weight.full_tensor(grad_placements=[Partial("sum")] * mesh.ndim)
        return _ScaleGrad.apply(full, 1.0 / mesh.size()) if full.requires_grad else full
    return weight


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; multiplies the gradient by ``scale`` in the backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad * ctx.scale, None


def is_plain_linear(module: Any) -> bool:
    """``type(module) is nn.Linear``, also after FSDP2's ``fully_shard`` (which swaps the instance's class for a
    dynamic ``FSDPLinear(FSDPModule, nn.Linear)`` without changing its forward)."""
    from torch import nn

    if type(module) is nn.Linear:
        return True
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch built without distributed
        return False
    return isinstance(module, FSDPModule) and type(module).__bases__ == (FSDPModule, nn.Linear)


def full_bias(bias: torch.Tensor | None) -> torch.Tensor | None:
    """:func:`full_weight` for an optional bias."""
    return None if bias is None else full_weight(bias)


def sharded_reason(weight: Any) -> str | None:
    """Why a kernel that reads ``weight`` *in place* (and would write no gradient through autograd, e.g. fused
    LoRA's frozen base) cannot use it: a DTensor shard or a ZeRO-3 placeholder. None when it is a plain tensor."""
    if is_dtensor(weight):
        return (
            f"the base weight is a sharded DTensor (FSDP2 / tensor parallel, placements "
            f"{tuple(str(p) for p in weight.placements)}) outside its module's forward"
        )
    return direct_read_problem(weight)


# ----------------------------------------------------------------------------------------------------------------
# World size and checkpoints
# ----------------------------------------------------------------------------------------------------------------
def world_size() -> int:
    """Processes in the default group (1 when torch.distributed is not initialized)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def saved_world_size(checkpoint_dir: str) -> int:
    """How many processes wrote a Trainer checkpoint: its per-rank RNG files (``rng_state_<rank>.pth``, written only
    when world > 1; a lone ``rng_state.pth`` means 1)."""
    if not os.path.isdir(checkpoint_dir):
        raise FileNotFoundError(f"fastft: checkpoint directory {checkpoint_dir!r} does not exist")
    ranks = [n for n in os.listdir(checkpoint_dir) if n.startswith("rng_state_") and n.endswith(".pth")]
    return len(ranks) or 1


def check_resume_world_size(checkpoint_dir: str, current: int | None = None, *, allow_change: bool = False) -> int:
    """Raise a clear error when ``checkpoint_dir`` was saved by a different number of processes; returns that number.

    Why refuse: the HF Trainer resumes at *step* k and skips k * gradient_accumulation_steps micro-batches per rank,
    so with M ranks instead of N it skips a different number of samples, the global batch (per-device x world x
    accumulation) changes size under a learning-rate schedule and optimizer state tuned for the old one, and the
    per-rank RNG files no longer match (transformers only logs that). DDP checkpoints are replicated, so weights and
    optimizer state load with any world size; ``allow_change=True`` continues anyway and logs the consequences.
    (FSDP SHARDED_STATE_DICT checkpoints rely on torch.distributed.checkpoint to re-shard; not tested here.)
    """
    current = world_size() if current is None else current
    saved = saved_world_size(checkpoint_dir)
    if saved != current:
        if not allow_change:
            raise ValueError(
                f"fastft: checkpoint {checkpoint_dir!r} was saved by {saved} process(es) but this run has {current}. "
                f"Resume with `accelerate launch --num_processes {saved}` to continue the same run; to continue "
                f"with {current} anyway (weights and optimizer state load; the data order, global batch size and RNG "
                f"streams change), pass allow_change=True"
            )
        info_once(
            f"fastft: resuming a checkpoint saved by {saved} processes with {current}: weights and optimizer "
            "state load; the remaining steps see a different data order and global batch size than the "
            "original run",
            key=f"resume-world-{saved}-{current}",
        )
    return saved
