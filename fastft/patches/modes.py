"""Training and inference modes: the one switch ``FastModel.for_inference`` / ``for_training`` expose and PatchFastRL's
GRPO generation hook calls around generation.

It lives under patches/ (below :mod:`fastft.model`) so the trainer hooks reach it without importing the model module:
imports point one way, model -> patches, never back.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn

from fastft.patches.checkpointing import enable_checkpointing


def base_model(model: nn.Module) -> nn.Module:
    """The transformers model under a PEFT wrapper (``get_base_model()``), or ``model`` itself when it has none."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def for_inference(model: nn.Module) -> nn.Module:
    """Eval mode, KV cache on, checkpointing off (remembered for :func:`for_training`); returns ``model``."""
    _inference(model)
    return model


def _inference(model: nn.Module) -> list[nn.Module]:
    """:func:`for_inference`'s work; returns the modules whose checkpointing switch it turned off."""
    base = base_model(model)
    switched = checkpointed_modules(base)
    if not hasattr(model, "_fastft_checkpointing"):
        model._fastft_checkpointing = bool(switched)
    for module in switched:  # off is off: the checkpoint function stays, unused, until it is switched back on
        module.gradient_checkpointing = False
    model.eval()
    base.config.use_cache = True
    if getattr(base, "generation_config", None) is not None:
        base.generation_config.use_cache = True
    return switched


@contextlib.contextmanager
def generating(model: nn.Module) -> Iterator[nn.Module]:
    """:func:`for_inference` inside the block (PatchFastRL's GRPO/RLOO generation); after it, the train/eval mode the
    block found, KV cache off, and checkpointing back exactly as found: the same switches on, their checkpoint
    function untouched (:func:`for_training` would rebuild it from the remembered mode, a walk over every module and
    parameter per generation, and would replace a checkpoint function that fastft's rule did not choose)."""
    was_training = model.training
    switched = _inference(model)
    try:
        yield model
    finally:
        if was_training:
            model.train()
        base_model(model).config.use_cache = False
        for module in switched:
            module.gradient_checkpointing = True


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


def checkpointed_modules(model: nn.Module) -> list[nn.Module]:
    """The modules of ``model`` (itself included) whose transformers checkpointing switch
    (``gradient_checkpointing``) is on.

    The same modules ``is_gradient_checkpointing`` / ``_set_gradient_checkpointing`` look at, found without their
    ``hasattr(module, ...)`` on every module (an AttributeError raised and caught per module that lacks the switch): the
    switch is an instance attribute once set, else the class's default."""
    return [
        m
        for m in model.modules()
        if m.__dict__.get("gradient_checkpointing", getattr(type(m), "gradient_checkpointing", False))
    ]


@contextlib.contextmanager
def checkpointing_paused(model: nn.Module) -> Iterator[nn.Module]:
    """Checkpointing off inside the block, then every switch that was on turned back on, its checkpoint function as
    it was (untouched); yields ``model``.

    What TRL's ``disable_gradient_checkpointing`` means to do around its no-grad passes (GRPO's old/reference
    log-probs, DPO/KTO's reference pass), without its ``gradient_checkpointing_enable`` on exit: that installs
    transformers' own checkpoint function, replacing the one fastft's rule chose (offloaded, on CUDA) for the rest of
    training. Cheaper too: no module walk with ``hasattr`` on the way in or out."""
    switched = checkpointed_modules(base_model(model))
    for module in switched:
        module.gradient_checkpointing = False
    try:
        yield model
    finally:
        for module in switched:
            module.gradient_checkpointing = True


__all__ = ["base_model", "checkpointed_modules", "checkpointing_paused", "for_inference", "for_training", "generating"]
