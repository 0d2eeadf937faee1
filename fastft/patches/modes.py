"""Training and inference modes: the one switch ``FastModel.for_inference`` / ``for_training`` expose and PatchFastRL's
GRPO generation hook calls around generation.

It lives under patches/ (below :mod:`fastft.model`) so the trainer hooks reach it without importing the model module:
imports point one way, model -> patches, never back.
"""

from __future__ import annotations

from torch import nn

from fastft.patches.checkpointing import enable_checkpointing


def base_model(model: nn.Module) -> nn.Module:
    """The transformers model under a PEFT wrapper (``get_base_model()``), or ``model`` itself when it has none."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def for_inference(model: nn.Module) -> nn.Module:
    """Eval mode, KV cache on, checkpointing off (remembered for :func:`for_training`); returns ``model``."""
    base = base_model(model)
    if not hasattr(model, "_fastft_checkpointing"):
        model._fastft_checkpointing = bool(getattr(base, "is_gradient_checkpointing", False))
    if getattr(base, "is_gradient_checkpointing", False):
        base._set_gradient_checkpointing(False)
    model.eval()
    base.config.use_cache = True
    if getattr(base, "generation_config", None) is not None:
        base.generation_config.use_cache = True
    return model


def for_training(model: nn.Module, use_gradient_checkpointing: bool | str | None = None) -> nn.Module:
    """Train mode (dropout back on), checkpointing restored as get_peft_model set it (or ``use_gradient_checkpointing``
    when given: True/"standard", "fastft", False), KV cache off; returns ``model``."""
    mode = use_gradient_checkpointing
    if mode is None:
        mode = getattr(model, "_fastft_checkpointing", False)
    enable_checkpointing(model, mode)
    model.train()
    base_model(model).config.use_cache = False
    return model


__all__ = ["base_model", "for_inference", "for_training"]
