"""The fused-loss causal-LM forward: with labels in training mode, the loss comes from the last hidden state through
:func:`fastft.patches.lm_head.lm_head_loss` and the logits are never built.

:func:`fastft.patches.patcher.patch_model` binds :func:`make_causal_lm_forward`'s forward on the causal-LM instance,
guarded by :func:`causal_lm_contract`; :func:`logits_required` makes it step aside for a caller that reads
``outputs.logits`` (TRL < 1.15's SFT metrics).
"""

from __future__ import annotations

import contextlib
import contextvars
import inspect
from collections.abc import Iterator
from typing import Any

from torch import nn

from fastft._log import info_once
from fastft.patches.base import parameters_guard

#: Set while a caller needs real logits from a training forward with labels (TRL < 1.15 computes its SFT metrics from
#: ``outputs.logits``): the fused-loss forward then runs the original.
_LOGITS_REQUIRED: contextvars.ContextVar[bool] = contextvars.ContextVar("fastft_logits_required", default=False)


@contextlib.contextmanager
def logits_required() -> Iterator[None]:
    """Within this block, patched causal-LM forwards return real logits (the original forward) even when training
    with labels."""
    token = _LOGITS_REQUIRED.set(True)
    try:
        yield
    finally:
        _LOGITS_REQUIRED.reset(token)


def make_causal_lm_forward(original_forward: Any, moe_modeling: Any = None) -> Any:
    """One generic training forward for every row: with labels in training mode, the loss comes from the last hidden
    state through ``linear_cross_entropy`` and the logits are never built (``logits`` is None in the output). Any
    other call (inference, evaluation, no labels, an lm_head it cannot read directly) runs the original forward.

    Arguments are bound against the original's own signature and everything but the labels and the loss options is
    handed to the backbone under the name the caller used, so a renamed pass-through parameter (transformers 5.24's
    ``past_key_values`` -> ``cache``) needs no change here. ``moe_modeling``: an MoE row's modeling module; the
    router aux loss is then added as the model adds it (``fastft.patches.moe.router_aux_output``)."""
    from transformers.modeling_outputs import CausalLMOutputWithPast

    from fastft.patches.lm_head import head_fallback_reason, lm_head_loss

    signature = inspect.signature(original_forward)
    var_keyword = next(name for name, p in signature.parameters.items() if p.kind is inspect.Parameter.VAR_KEYWORD)
    output_fields = set(CausalLMOutputWithPast.__dataclass_fields__)
    # Where a positional ``labels`` would sit (None: keyword only); ``self`` is already bound.
    names = list(signature.parameters)
    labels_at = names.index("labels") if "labels" in names else None

    def forward(self, *args, **kwargs):
        # Without labels in training mode this is the original forward: say so before binding (generation calls it
        # once per token, and Signature.bind costs ~30 us a call).
        positional_labels = labels_at is not None and len(args) > labels_at
        if not self.training or _LOGITS_REQUIRED.get() or (kwargs.get("labels") is None and not positional_labels):
            return original_forward(*args, **kwargs)
        try:
            bound = signature.bind(*args, **kwargs)
        except TypeError:  # let the original raise its own error for a call it does not accept
            return original_forward(*args, **kwargs)
        arguments = dict(bound.arguments)
        arguments.update(arguments.pop(var_keyword, {}))
        labels = arguments.get("labels")
        if labels is None or arguments.get("output_hidden_states"):  # training and _LOGITS_REQUIRED checked above
            return original_forward(*args, **kwargs)
        reason = head_fallback_reason(self)  # ZeRO-3: only calling lm_head gathers its weight
        if reason:
            info_once(f"fastft: fused loss not used: {reason}; the loss builds full logits (transformers' path)")
            return original_forward(*args, **kwargs)
        for name in ("labels", "logits_to_keep"):
            arguments.pop(name, None)
        n_items = arguments.pop("num_items_in_batch", None)
        shift_labels = arguments.pop("shift_labels", None)
        ignore_index = arguments.pop("ignore_index", -100)
        if moe_modeling is not None:  # resolved as the model's forward resolves it, and handed to the backbone
            wanted = arguments.get("output_router_logits")
            arguments["output_router_logits"] = self.config.output_router_logits if wanted is None else wanted
        outputs = getattr(self, self.base_model_prefix)(**arguments)
        hidden = outputs.last_hidden_state
        loss = lm_head_loss(
            self,
            hidden,
            labels if shift_labels is None else shift_labels,
            shift=shift_labels is None,
            ignore_index=ignore_index,
            reduction="mean",
            n_items=n_items,
        )
        info_once(
            "fastft: training loss computed from hidden states with linear_cross_entropy; logits are not "
            "materialized (outputs.logits is None in training mode with labels)"
        )
        if moe_modeling is not None:
            from fastft.patches.moe import router_aux_output

            return router_aux_output(
                self, moe_modeling, outputs, loss, arguments.get("attention_mask"), bool(arguments["output_router_logits"])
            )
        # The backbone's cache / hidden states / attentions, under whatever names this release gives them.
        passed = {name: value for name, value in outputs.items() if name in output_fields and name != "logits"}
        return CausalLMOutputWithPast(loss=loss, logits=None, **passed)

    forward._fastft_loss = True
    # The original's parameters (behind ``self``, which binding the method drops): transformers' generate() picks its
    # path from them (logits_to_keep, position_ids, attention_mask), and with ``(*args, **kwargs)`` it would take a
    # slower one than the unpatched model (full prefill logits, no position_ids, per-token mask checks).
    self_parameter = inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)
    forward.__signature__ = signature.replace(parameters=[self_parameter, *signature.parameters.values()])
    return forward


def causal_lm_contract(lm: nn.Module, original_forward: Any) -> str | None:
    """What the fused-loss forward relies on: the original takes ``input_ids``, ``labels`` and ``**kwargs`` (which it
    hands to the backbone), the backbone sits at ``base_model_prefix``, and the output class has a ``loss`` field."""
    from transformers.modeling_outputs import CausalLMOutputWithPast

    problem = parameters_guard("input_ids", "labels", var_keyword=True)(original_forward)
    if problem:
        return f"{type(lm).__name__}.forward: {problem}"
    backbone = getattr(lm, getattr(lm, "base_model_prefix", ""), None)
    if not isinstance(backbone, nn.Module):
        return f"{type(lm).__name__} has no backbone at base_model_prefix={getattr(lm, 'base_model_prefix', None)!r}"
    if not callable(getattr(lm, "get_output_embeddings", None)):
        return f"{type(lm).__name__} has no get_output_embeddings()"
    if not {"loss", "logits"} <= set(CausalLMOutputWithPast.__dataclass_fields__):
        return "CausalLMOutputWithPast has no loss/logits fields"
    return None
