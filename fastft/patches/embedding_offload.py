"""Keep a frozen input embedding in host memory: gather rows on the host, copy only [B, T, H] to the GPU.

The input embedding of an untied 8B model is 128,256 x 4,096 bf16 = 1.05 GB, yet training only ever reads B*T rows
of it (a gather; a LoRA run never updates it). Keeping it in host RAM frees that much GPU memory -- 7% of a T4 -- at
the cost of one device->host copy of the token ids and one host->device copy of B*T*H values per forward (16 MB at
8,192 tokens in bf16), staged through pinned memory so the copy is asynchronous.

Only safe when nothing else needs the weight on the GPU, so :func:`offload_input_embeddings` refuses (and says why)
when the embedding is trainable (``modules_to_save``, full fine-tuning), tied to the LM head (the head multiplies by
it), sharded (FSDP2 DTensor) or partitioned (DeepSpeed ZeRO-3).

The weight is held outside the module tree's parameters (so ``model.device``, ``model.to(...)``, DDP/accelerate
parameter walks and optimizers never see a CPU parameter) but stays in ``state_dict()`` under its usual key, so
saving and loading are unchanged. It is a :class:`~fastft.patches.base.Patch`: ``fastft.unpatch()`` puts the original
module back, with its weight on the device it came from.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from fastft._log import logger
from fastft.distributed import is_dtensor, is_zero3_param
from fastft.patches.base import Patch


class HostEmbedding(nn.Module):
    """Wraps an embedding module whose weight has been moved to host memory.

    ``forward(input_ids [..] long on any device) -> [.., H]`` in the weight's dtype, on ``input_ids``' device; the
    wrapped module's own forward runs on the host (so scaled embeddings, padding_idx etc. behave as upstream wrote).
    """

    def __init__(self, original: nn.Module, host: torch.device | str = "cpu") -> None:
        super().__init__()
        self._device = original.weight.device  # where to put it back on revert
        # A list hides the module from registration: its weight must not be a parameter of the model.
        self._inner = [original.to(host)]

    @property
    def inner(self) -> nn.Module:
        return self._inner[0]

    @property
    def weight(self) -> torch.Tensor:
        return self.inner.weight

    def __getattr__(self, name: str) -> Any:
        # num_embeddings, embedding_dim, padding_idx, embed_scale ... read through to the wrapped module.
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "_inner":
                raise
            return getattr(self._inner[0], name)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        host = self.inner.weight.device
        out = self.inner(input_ids.to(host))
        if out.device == input_ids.device:
            return out
        # Pinned staging buffer -> asynchronous copy (the caching host allocator keeps it alive until it lands). The
        # weight is frozen, so nothing flows back to the host: the copy is detached and only the requires_grad flag
        # (set by enable_input_require_grads' hook for checkpointing) is carried over.
        staged = out.detach()
        if input_ids.device.type == "cuda":
            staged = staged.pin_memory()
        return staged.to(input_ids.device, non_blocking=True).requires_grad_(out.requires_grad)

    def restore(self) -> nn.Module:
        """The wrapped module, its weight moved back to the device it came from."""
        return self.inner.to(self._device)

    # state_dict / load_state_dict see the wrapped module's tensors under this module's prefix, as before.
    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        for key, value in self.inner.state_dict(keep_vars=keep_vars).items():
            destination[prefix + key] = value

    def _load_from_state_dict(
        self,
        state_dict: dict,
        prefix: str,
        local_metadata: dict,
        strict: bool,
        missing_keys: list,
        unexpected_keys: list,
        error_msgs: list,
    ) -> None:
        own = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
        result = self.inner.load_state_dict(own, strict=False)
        missing_keys.extend(prefix + k for k in result.missing_keys)

    def extra_repr(self) -> str:
        w = self.inner.weight
        return f"{type(self.inner).__name__}({w.shape[0]}, {w.shape[1]}) in host memory ({w.device}, {w.dtype})"


class _EmbeddingOffload(Patch):
    def revert(self) -> None:
        if self.applied and isinstance(self._installed, HostEmbedding):
            self._installed.restore()
        super().revert()


def _refusal(model: nn.Module, embedding: nn.Module | None) -> str | None:
    if embedding is None or not isinstance(getattr(embedding, "weight", None), torch.Tensor):
        return "the model has no input embedding with a weight"
    if isinstance(embedding, HostEmbedding):
        return None
    weight = embedding.weight
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    tied = getattr(getattr(model, "config", None), "tie_word_embeddings", False) and head is not None
    if tied or getattr(head, "weight", None) is weight:
        return "the embedding is tied to the LM head, which needs it on the GPU"
    if weight.requires_grad:
        return "the embedding is trainable (modules_to_save or full fine-tuning): its gradient belongs on the GPU"
    if is_dtensor(weight):
        return "the embedding is sharded (FSDP2): each rank holds only a shard"
    if weight.numel() == 0 or is_zero3_param(weight):  # gathered or not: ZeRO-3 owns where it lives
        return "the embedding is partitioned by DeepSpeed ZeRO-3"
    return None


def offload_input_embeddings(model: nn.Module, host: torch.device | str = "cpu") -> str | None:
    """Move ``model``'s frozen input embedding to host memory (see the module doc).

    ``model``: a transformers causal LM or a PEFT model around one. Returns None when the embedding is (now) in host
    memory, else the reason it was left where it was (also logged). Idempotent; reverted by ``fastft.unpatch()``.
    ``host``: where the weight goes ("cpu"; the meta-tensor memory model passes "meta").
    """
    base = model.get_base_model() if callable(getattr(model, "get_base_model", None)) else model
    embedding = base.get_input_embeddings() if hasattr(base, "get_input_embeddings") else None
    reason = _refusal(base, embedding)
    if reason is not None:
        logger.warning(
            "fastft: input embedding stays on %s: %s",
            getattr(getattr(embedding, "weight", None), "device", "its device"),
            reason,
        )
        return reason
    if isinstance(embedding, HostEmbedding):
        return None
    owner, attribute = _parent_of(base, embedding)
    nbytes = embedding.weight.numel() * embedding.weight.element_size()
    patch = _EmbeddingOffload(
        f"input embedding -> host memory ({type(base).__name__})",
        owner,
        attribute,
        replacement=lambda original: HostEmbedding(original, host),
        wrap=True,
    )
    if not patch.apply():
        return "the patch could not be applied (see the warning above)"
    logger.info(
        "fastft: input embedding (%.2f GB) kept in host memory; rows gathered on the host and copied to the GPU each step",
        nbytes / 1e9,
    )
    return None


def _parent_of(root: nn.Module, target: nn.Module) -> tuple[nn.Module, str]:
    for module in root.modules():
        for child_name, child in module.named_children():
            if child is target:
                return module, child_name
    raise ValueError("the input embedding is not a submodule of the model")
