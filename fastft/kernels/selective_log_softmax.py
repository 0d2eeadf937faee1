"""Per-token log-probabilities (and entropy) of chosen tokens straight from hidden states, chunked over tokens: what
GRPO, DPO and PPO need, without the [batch, seq, vocab] logits.

Shapes and dtypes
    hidden [B, T, H] fp32/bf16/fp16, weight [V, H] (same dtype), optional bias [V], token_ids [B, T] integer in
    [0, V). Returns log p(token) as fp32 [B, T], and with ``return_entropy`` the entropy (nats) fp32 [B, T].

Semantics (TRL 1.16 ``selective_log_softmax(logits / temperature, ids)`` and ``entropy_from_logits``): with
    f = softcap * tanh(logit_scale * (hidden @ W.T + bias) / softcap) / temperature   (each factor only when given)
computed in fp32 after the matmul (TRL's fp32 path; its bf16 path is a less precise log_softmax in bf16),
    logp = f[token] - logsumexp(f),   entropy = logsumexp(f) - sum_j p_j f_j.

Algorithm: linear_cross_entropy's chunk op (torch matmul per chunk of tokens, cross_entropy's vocab-chunked stats
kernel, which also accumulates E_p[f] for the entropy). The backward RECOMPUTES each chunk (matmul + stats + in-place
grad kernel): the incoming per-token gradients are unknown in the forward and do not factor out of the weight
gradient, and GRPO/DPO call this op under no_grad for the old/reference policy, where precomputed gradients would be
wasted work and memory. Entropy is differentiable at no extra pass: d entropy / d f_j = -p_j (f_j - E_p[f]), added
inside the same grad kernel (constexpr ENTROPY).

Saved for backward: hidden, weight, bias, token_ids (inputs that exist anyway).
"""

from __future__ import annotations

import dataclasses

import torch

from fastft.kernels.cross_entropy_math import CrossEntropyOptions, check_labels, transform_reference
from fastft.kernels.linear_cross_entropy import (
    ChunkPlan,
    _run_chunks,
    autocast_inputs,
    check_linear_inputs,
    chunk_plan,
)

_NO_IGNORE = -(2**62)  # an ignore_index no token id can equal: every row counts


def selective_log_softmax_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    token_ids: torch.Tensor,
    *,
    temperature: float = 1.0,
    logit_scale: float | None = None,
    softcap: float | None = None,
    bias: torch.Tensor | None = None,
    return_entropy: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``log_softmax(f).gather(ids)`` (and ``-(p * log p).sum``) on the full fp32 logits."""
    z = transform_reference(torch.nn.functional.linear(hidden, weight, bias), softcap, logit_scale, temperature)
    logp_all = z.log_softmax(-1)
    logp = logp_all.gather(-1, token_ids.long().unsqueeze(-1)).squeeze(-1)
    if not return_entropy:
        return logp
    return logp, -(logp_all.exp() * logp_all).sum(-1)


class SelectiveLogSoftmaxFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, ids, options, plan):
        r = _run_chunks(
            hidden,
            weight,
            bias,
            ids,
            options=options,
            plan=dataclasses.replace(plan, compute_dh=False, compute_dw=False, compute_db=False),
        )
        ctx.save_for_backward(hidden, weight, bias, ids)
        ctx.args = (options, plan)
        logp = r.tgt - r.lse
        if plan.entropy:
            return logp, r.lse - r.ef
        return logp

    @staticmethod
    def backward(ctx, *grads):
        hidden, weight, bias, ids = ctx.saved_tensors
        options, plan = ctx.args
        g_logp = grads[0]
        g_ent = grads[1] if len(grads) > 1 else None
        # loss_row = lse - tgt = -logp, so d/d loss_row = -d/d logp.
        d_ce = torch.zeros(ids.shape[0], device=ids.device) if g_logp is None else -g_logp.float()
        d_entropy = None if g_ent is None else g_ent.float().contiguous()
        r = _run_chunks(
            hidden,
            weight,
            bias,
            ids,
            options=options,
            d_ce=d_ce.contiguous(),
            d_entropy=d_entropy,
            plan=dataclasses.replace(plan, entropy=d_entropy is not None),
        )
        return (
            r.dh if plan.compute_dh else None,
            r.dw if plan.compute_dw else None,
            r.db if plan.compute_db else None,
            None,
            None,
            None,
        )


def selective_log_softmax(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    token_ids: torch.Tensor,
    *,
    temperature: float = 1.0,
    logit_scale: float | None = None,
    softcap: float | None = None,
    bias: torch.Tensor | None = None,
    return_entropy: bool = False,
    chunk_size: int | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """log p(token_ids) under ``softmax(f)`` with f the transformed ``hidden @ weight.T + bias``, chunked over tokens.

    Args:
        hidden: [B, T, H] fp32/bf16/fp16.
        weight: [V, H], same dtype (lm_head or tied embedding; autocast casts both, as F.linear does); its gradient
            is computed only if it requires grad.
        token_ids: [B, T] integer in [0, V) (pad tokens are fine: mask the result, as TRL does).
        temperature: logits are divided by it after softcap (TRL's GRPO/PPO sampling temperature).
        logit_scale, softcap: Cohere/Granite scale and Gemma-2 softcap.
        bias: optional [V].
        return_entropy: also return the entropy of softmax(f), differentiable.
        chunk_size: tokens per chunk (default: linear_cross_entropy.choose_chunk_size).
    Returns:
        fp32 [B, T] log-probs, or (log-probs, entropy), both fp32 [B, T].
    """
    hidden, weight, bias = autocast_inputs(hidden, weight, bias)
    check_linear_inputs("selective_log_softmax", hidden, weight, bias)
    if hidden.dim() != 3 or tuple(token_ids.shape) != tuple(hidden.shape[:2]):
        raise ValueError(
            f"selective_log_softmax: need hidden [B, T, H] and token_ids [B, T]; got "
            f"{tuple(hidden.shape)} and {tuple(token_ids.shape)}"
        )
    if token_ids.device != hidden.device:
        raise ValueError(f"selective_log_softmax: token_ids on {token_ids.device} but hidden on {hidden.device}")
    options = CrossEntropyOptions(ignore_index=_NO_IGNORE, softcap=softcap, logit_scale=logit_scale, temperature=temperature)
    ids = check_labels("token_ids", token_ids.reshape(-1), weight.shape[0], None)
    h2 = hidden.reshape(-1, hidden.shape[-1])
    n = h2.shape[0]
    if n == 0:
        zero = hidden.new_zeros(token_ids.shape, dtype=torch.float32)
        return (zero, zero.clone()) if return_entropy else zero
    h2 = h2.contiguous()
    plan = chunk_plan(chunk_size, h2, hidden, weight, bias, entropy=bool(return_entropy))
    out = SelectiveLogSoftmaxFunction.apply(h2, weight, bias, ids, options, plan)
    if return_entropy:
        return out[0].view(token_ids.shape), out[1].view(token_ids.shape)
    return out.view(token_ids.shape)


def compile_cases() -> None:
    """Entropy on and off, temperature (SCALE), softcap, all dtypes: forward stats and recomputed grads."""
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for softcap, scale, temperature in ((None, None, 1.0), (None, None, 0.7), (30.0, 1.5, 0.7)):
            options = CrossEntropyOptions(
                ignore_index=_NO_IGNORE, softcap=softcap, logit_scale=scale, temperature=temperature
            )
            for entropy in (False, True):
                h = torch.empty(5, 64, dtype=dtype)
                w = torch.empty(32001, 64, dtype=dtype)
                ids = torch.zeros(5, dtype=torch.long)
                g = torch.ones(5)
                plan = ChunkPlan(chunk_size=4, entropy=entropy)
                _run_chunks(h, w, None, ids, options=options, plan=plan)
                _run_chunks(
                    h,
                    w,
                    None,
                    ids,
                    options=options,
                    d_ce=g,
                    d_entropy=g if entropy else None,
                    plan=dataclasses.replace(plan, compute_dh=True, compute_dw=True),
                )
