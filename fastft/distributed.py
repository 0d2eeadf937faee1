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

Callers: the causal-LM fused loss (``fastft.patches.architectures``), PatchFastRL's fast LM head
(``fastft.patches.trl``) and fused LoRA's ``can_fuse`` (``fastft.kernels.lora``).
"""

from __future__ import annotations

import json
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


def is_zero3_partitioned(t: Any) -> bool:
    """True for a DeepSpeed ZeRO-3 parameter whose data is not gathered on this rank (an empty placeholder)."""
    if not hasattr(t, "ds_id"):
        return False
    status = getattr(t, "ds_status", None)
    return getattr(status, "name", str(status)) != "AVAILABLE" or t.numel() == 0


def direct_read_problem(weight: Any) -> str | None:
    """Why ``weight`` cannot be handed to a fused kernel as a full tensor (None: it can, possibly via full_weight).

    DTensors are fine (:func:`full_weight` gathers them); ZeRO-3 placeholders are not.
    """
    if is_zero3_partitioned(weight):
        return ("the weight is a DeepSpeed ZeRO-3 partitioned parameter (not gathered outside its module's forward; "
                "its gradient flows only through DeepSpeed's module hooks)")
    return None


def full_weight(weight: torch.Tensor) -> torch.Tensor:
    """The full, unsharded ``weight`` for a fused kernel, differentiable.

    Shapes: a ``[V, H]`` (or any) weight; returns a plain tensor of the same global shape and dtype.

    * plain tensor / Parameter (single process, DDP, FSDP2 inside its group's forward): returned as is.
    * FSDP2 / TP ``DTensor``: ``weight.full_tensor()`` -- an all-gather whose backward reduce-scatters the gradient
      into the shards (as a Replicate -> Shard redistribution), so ``weight.grad`` ends up a correctly summed sharded
      DTensor. Costs one temporary full copy of the weight per call (what the module's own forward would gather).
    * ZeRO-3 placeholder: ``RuntimeError`` (callers check :func:`direct_read_problem` first and fall back).
    """
    problem = direct_read_problem(weight)
    if problem:
        raise RuntimeError(f"fastft.distributed.full_weight: {problem}; call the module instead")
    if is_dtensor(weight):
        info_once(f"fastft: gathering a sharded (DTensor {tuple(weight.shape)}, placements "
                  f"{tuple(str(p) for p in weight.placements)}) weight for a fused kernel with full_tensor(); its "
                  "gradient is reduce-scattered back to the shards", key=f"full-weight-{tuple(weight.shape)}")
        return weight.full_tensor()
    return weight


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
        return (f"the base weight is a sharded DTensor (FSDP2 / tensor parallel, placements "
                f"{tuple(str(p) for p in weight.placements)}) outside its module's forward")
    return direct_read_problem(weight)


# ----------------------------------------------------------------------------------------------------------------
# World size and checkpoints
# ----------------------------------------------------------------------------------------------------------------
def world_size() -> int:
    """Processes in the default group (1 when torch.distributed is not initialized)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


WORLD_FILE = "fastft_world.json"


def record_world_size(checkpoint_dir: str, *, sharded: bool) -> None:
    """Write ``{"world_size": N, "sharded": bool}`` into a checkpoint (rank 0 only) so a resume can check it."""
    if int(os.environ.get("RANK", "0")) != 0:
        return
    os.makedirs(checkpoint_dir, exist_ok=True)
    with open(os.path.join(checkpoint_dir, WORLD_FILE), "w") as f:
        json.dump({"world_size": world_size(), "sharded": bool(sharded)}, f)


def check_resume_world_size(checkpoint_dir: str, current: int | None = None) -> None:
    """Refuse to resume a *sharded* checkpoint with another world size; a replicated one (DDP, or FSDP with
    FULL_STATE_DICT) resumes with any world size.

    What goes wrong otherwise: a SHARDED_STATE_DICT checkpoint holds one optimizer/model shard file per rank
    (``pytorch_model_fsdp_0/__*_N.distcp``...) that torch.distributed.checkpoint can re-shard for model weights,
    but the Trainer's per-rank RNG files and the data position assume the old rank count, so the resumed run is
    silently not the continuation of the saved one. Raise instead, with what to do.
    """
    path = os.path.join(checkpoint_dir, WORLD_FILE)
    current = world_size() if current is None else current
    if os.path.isfile(path):
        with open(path) as f:
            saved = json.load(f)
        saved_world, sharded = int(saved["world_size"]), bool(saved.get("sharded", False))
    else:
        # No record: infer from the Trainer's per-rank RNG files (rng_state_<rank>.pth when world > 1).
        ranks = [n for n in os.listdir(checkpoint_dir) if n.startswith("rng_state_") and n.endswith(".pth")]
        saved_world = len(ranks) or 1
        sharded = any(n.startswith(("pytorch_model_fsdp_", "optimizer_0")) for n in os.listdir(checkpoint_dir))
    if saved_world != current and sharded:
        raise ValueError(
            f"fastft: checkpoint {checkpoint_dir!r} was saved sharded by {saved_world} processes, but this run has "
            f"{current}. Resume with `accelerate launch --num_processes {saved_world}`, or save with "
            f"fsdp_state_dict_type: FULL_STATE_DICT (any world size can load it)")
    if saved_world != current:
        info_once(f"fastft: resuming a replicated checkpoint saved by {saved_world} processes with {current}: "
                  "weights and optimizer state load exactly; per-rank RNG streams and the data order of the remaining "
                  "steps differ from an uninterrupted run", key=f"resume-world-{saved_world}-{current}")
