"""One fused LM head: the model's own training loss and the TRL trainers' heads both go through this module.

The entry points are modeled on Apple's cut-cross-entropy ``linear_cross_entropy(e, c, targets, ...)``: hidden states
and the head go in, the loss (or the per-token log-probs) comes out, and the ``[tokens, vocab]`` logits never exist.

* :func:`head_fallback_reason` -- why a model's (or a head module's) LM head cannot be handed to the kernels: not a
  plain ``nn.Linear`` (e.g. LoRA on ``lm_head``), a weight of another tensor type, a DeepSpeed ZeRO-3 placeholder
  (FSDP2 DTensor heads are fine: :func:`head_weights` gathers them with ``fastft.distributed.full_weight``).
* :func:`head_transform` -- the logit scaling / softcap the model's forward applies, read once, from the config
  fields transformers' forwards (and TRL 1.16's ``add_fused_lm_head``) read.
* :func:`head_weights` -- the gathered weight and bias plus that transform, read once per call.
* :func:`lm_head_loss` -- ``fastft.kernels.linear_cross_entropy`` on the head (shifting the labels by default).
* :func:`lm_head_log_probs` -- ``fastft.kernels.selective_log_softmax`` on compacted tokens (GRPO/DPO/... log-probs).
* :func:`token_stats` -- exact no-grad per-token metrics (entropy, top-1, mean logit, ...) in row chunks.
* :func:`router_aux_modeling` / :func:`router_aux_loss` -- the MoE load-balancing loss as the model computes it.

Callers: ``fastft.patches.causal_lm_loss`` (the causal-LM forward's loss), ``fastft.patches.trl_heads`` (TRL's
fused-head seam) and ``fastft.patches.trl_preference`` (the lean preference heads).
"""

from __future__ import annotations

import importlib
from typing import Any, NamedTuple

import torch
from torch import nn

from fastft.distributed import direct_read_problem, full_bias, full_weight, is_dtensor, is_plain_linear
from fastft.kernels.cross_entropy_math import transform_reference

#: Logits alive at once in the no-grad metrics pass (fp32 elements): 2**21 = 8 MiB per temporary.
STATS_CHUNK_ELEMENTS = 1 << 21


class HeadWeights(NamedTuple):
    """An LM head as the kernels take it: full weight ``[V, H]``, bias ``[V]`` or None, and the logit transform."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    softcap: float | None
    scale: float | None


def _head_module(model_or_head: Any) -> Any:
    """The head module: ``model_or_head`` itself when it is a Linear, else its ``get_output_embeddings()``."""
    if isinstance(model_or_head, nn.Linear) or not callable(getattr(model_or_head, "get_output_embeddings", None)):
        return model_or_head
    return model_or_head.get_output_embeddings()


def head_fallback_reason(model_or_head: Any) -> str | None:
    """Why this LM head cannot be read directly by the fused kernels (None when it can).

    ``model_or_head``: a transformers causal LM (its ``get_output_embeddings()``) or the head module itself."""
    head = _head_module(model_or_head)
    if not is_plain_linear(head):  # FSDP2's FSDPLinear counts as plain
        return f"the LM head is a {type(head).__name__}, not a plain nn.Linear"
    weight_type = type(head.weight)
    if weight_type is not torch.nn.Parameter and weight_type is not torch.Tensor and not is_dtensor(head.weight):
        return f"the LM head weight is a {weight_type.__name__}"
    return direct_read_problem(head.weight)  # a ZeRO-3 placeholder; DTensors are gathered by full_weight


def head_transform(config: Any) -> tuple[float | None, float | None]:
    """``(final_logit_softcapping, logit_scale)`` as the model's own forward applies them (None = not applied).

    ``config``: the model's config (its text config is read). Reads the fields TRL 1.16's ``add_fused_lm_head``
    reads, so the model's loss and TRL's heads scale logits identically: Gemma-2/3's ``final_logit_softcapping``,
    Cohere's ``logit_scale``, ``output_multiplier`` / ``lm_head_multiplier``, Granite's ``logits_scaling`` (a divisor;
    ``x * (1 / d)`` and ``x / d`` differ by at most one fp32 rounding of the logits)."""
    get_text_config = getattr(config, "get_text_config", None)
    text_config = get_text_config() if callable(get_text_config) else config
    softcap = getattr(text_config, "final_logit_softcapping", None)
    scale = getattr(text_config, "logit_scale", None)
    if scale is None:
        scale = getattr(text_config, "output_multiplier", None)
    if scale is None:
        scale = getattr(text_config, "lm_head_multiplier", None)
    if scale is None and getattr(text_config, "logits_scaling", None) is not None:
        scaling = text_config.logits_scaling
        scale = scaling if getattr(text_config, "model_type", None) == "hyperclovax" else 1.0 / scaling
    return softcap, (None if scale is None or scale == 1.0 else float(scale))


def head_weights(model_or_head: Any, config: Any = None) -> HeadWeights:
    """The head's full weight and bias (sharded FSDP2 heads gathered, gradient reduce-scattered) and its transform.

    ``config`` defaults to ``model_or_head.config``; a bare head module without one gets no transform."""
    head = _head_module(model_or_head)
    config = getattr(model_or_head, "config", None) if config is None else config
    softcap, scale = (None, None) if config is None else head_transform(config)
    return HeadWeights(full_weight(head.weight), full_bias(head.bias), softcap, scale)


def _as_head(head: Any) -> HeadWeights:
    return head if isinstance(head, HeadWeights) else head_weights(head)


def next_token_labels(labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """``labels [..., T]`` shifted left by one (position t scores token t + 1), the last position ``ignore_index``."""
    return nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:]


def lm_head_loss(
    head: Any,
    hidden: torch.Tensor,
    labels: torch.Tensor,
    *,
    shift: bool = True,
    ignore_index: int = -100,
    reduction: str = "mean",
    n_items: int | torch.Tensor | None = None,
    label_smoothing: float = 0.0,
    return_token_stats: bool = False,
) -> Any:
    """Cross-entropy of ``head(hidden)`` against ``labels`` without building the logits.

    Args:
        head: a causal LM, its head module, or :class:`HeadWeights` (already gathered).
        hidden: ``[..., H]`` final hidden states (fp32/bf16/fp16, the head weight's dtype).
        labels: ``[...]`` int64 token ids or ``ignore_index``; with ``shift`` (the model's own loss) they are the
            input-aligned labels and are shifted here, without it they are already aligned with ``hidden``.
        reduction, n_items, label_smoothing, return_token_stats: as ``fastft.kernels.linear_cross_entropy``.
    Returns:
        fp32 scalar (or ``[...]`` for "none"), or the kernel's ``TokenStats`` with ``return_token_stats``.
    """
    from fastft.kernels import linear_cross_entropy

    head = _as_head(head)
    if shift:
        labels = next_token_labels(labels, ignore_index)
    return linear_cross_entropy(
        hidden,
        head.weight,
        labels.to(hidden.device),
        bias=head.bias,
        ignore_index=ignore_index,
        softcap=head.softcap,
        logit_scale=head.scale,
        reduction=reduction,
        n_items=n_items,
        label_smoothing=label_smoothing,
        return_token_stats=return_token_stats,
    )


def lm_head_log_probs(
    head: Any, hidden: torch.Tensor, targets: torch.Tensor, *, temperature: float = 1.0, return_entropy: bool = False
) -> Any:
    """log p(targets) (and the entropy) fp32 ``[N]`` for compacted hidden ``[N, H]`` (scored tokens only).

    One chunked ``selective_log_softmax`` call; gradient flows to ``hidden`` and the head. ``hidden`` is cast to
    the head's dtype (under autocast the backbone can hand back bf16 states for an fp32 head). With no tokens the
    result is an empty tensor still connected to ``hidden``, so an all-masked batch backpropagates a zero."""
    from fastft import kernels

    head = _as_head(head)
    if hidden.shape[0] == 0:
        lp = hidden.new_zeros(0, dtype=torch.float32) + hidden.float().sum() * 0.0
        return (lp, lp) if return_entropy else lp
    if hidden.dtype != head.weight.dtype:
        hidden = hidden.to(head.weight.dtype)
    # The op takes [B, T, H]; the compacted valid tokens are one "sequence" of length N.
    result = kernels.selective_log_softmax(
        hidden.unsqueeze(0),
        head.weight,
        targets.unsqueeze(0),
        bias=head.bias,
        temperature=temperature,
        logit_scale=head.scale,
        softcap=head.softcap,
        return_entropy=return_entropy,
    )
    if return_entropy:
        lp, ent = result
        return lp.squeeze(0).float(), ent.squeeze(0).float()
    return result.squeeze(0).float()


@torch.no_grad()
def token_stats(
    hidden: torch.Tensor, head: HeadWeights, targets: torch.Tensor, wanted: tuple[str, ...], temperature: float = 1.0
) -> dict[str, torch.Tensor]:
    """Per-token metrics of the transformed ``hidden [N, H] @ weight[V, H].T`` in row chunks, without gradient.

    Returns the fields of ``wanted`` among ``entropy``, ``is_top1``, ``mean_logits``, ``log_sum_sq_probs``, each
    ``[N]`` (fp32; bool for ``is_top1``), defined as in TRL's ``FusedCausalLMOutput``.
    """
    weight = head.weight.detach()
    bias = None if head.bias is None else head.bias.detach()
    n, vocab = hidden.shape[0], weight.shape[0]
    rows = max(1, STATS_CHUNK_ELEMENTS // vocab)
    parts: dict[str, list[torch.Tensor]] = {name: [] for name in wanted}
    for start in range(0, n, rows):
        z = nn.functional.linear(hidden[start : start + rows].to(weight.dtype), weight, bias)
        z = transform_reference(z, head.softcap, head.scale, temperature)
        log_p = z.log_softmax(-1)
        if "entropy" in parts:
            parts["entropy"].append(-(log_p.exp() * log_p).sum(-1))
        if "is_top1" in parts:
            # argmax returns the first maximum, like TRL's "target beats every earlier token, ties every later one"
            parts["is_top1"].append(z.argmax(-1) == targets[start : start + rows])
        if "mean_logits" in parts:
            parts["mean_logits"].append(z.mean(-1))
        if "log_sum_sq_probs" in parts:
            parts["log_sum_sq_probs"].append(torch.logsumexp(2 * log_p, dim=-1))
        del z, log_p
    return {
        name: torch.cat(chunks) if chunks else hidden.new_zeros(0, dtype=torch.float32) for name, chunks in parts.items()
    }


# --------------------------------------------------------------------------------------------------------------------
# MoE rows: the router's load-balancing loss, as the model's forward computes it
# --------------------------------------------------------------------------------------------------------------------
def router_aux_modeling(config: Any) -> Any:
    """The modeling module of an MoE row of fastft's table (its ``load_balancing_loss_func``), else None."""
    from fastft.patches.architectures import ARCHITECTURES

    row = ARCHITECTURES.get(getattr(config, "model_type", None))
    if row is None or not row.experts_class:
        return None
    return importlib.import_module(row.module)


def router_aux_loss(lm: Any, modeling: Any, router_logits: Any, attention_mask: Any) -> torch.Tensor:
    """The model's own ``load_balancing_loss_func(router_logits, num_experts, num_experts_per_tok, attention_mask)``
    (unweighted: the model adds ``router_aux_loss_coef *`` it, TRL weights it itself)."""
    return modeling.load_balancing_loss_func(router_logits, lm.num_experts, lm.num_experts_per_tok, attention_mask)
