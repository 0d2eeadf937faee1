"""FlashAttention-2's memory as an opaque custom op (namespace ``fastft_memmodel``): the tracker charges its outputs
only -- out and an fp32 logsumexp forward, dq/dk/dv backward, no [T, T] -- the way a single GPU kernel whose scratch
lives in registers/SRAM allocates. The real impls compute the right values, so the same step runs on CPU for
validation. Registered with transformers' ``AttentionInterface`` as ``"fastft_meta_sdpa_free"``."""

from __future__ import annotations

import torch

ATTENTION_NAME = "fastft_meta_sdpa_free"


def _attention_reference(q, k, v, scale, softcap):
    """q [B, H, T, D], k/v [B, Hkv, T, D] -> (out [B, T, H, D] in q.dtype, lse [B, H, T] fp32); causal."""
    rep = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(rep, dim=1).float()
    v = v.repeat_interleave(rep, dim=1).float()
    scores = torch.matmul(q.float(), k.transpose(-1, -2)) * scale
    if softcap:
        scores = torch.tanh(scores / softcap) * softcap
    t = q.shape[2]
    causal = torch.ones(t, t, dtype=torch.bool, device=q.device).triu(1)
    scores = scores.masked_fill(causal, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    out = torch.matmul(torch.softmax(scores, dim=-1), v)
    return out.transpose(1, 2).contiguous().to(q.dtype), lse


@torch.library.custom_op("fastft_memmodel::flash_attention_forward", mutates_args=())
def flash_attention_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, softcap: float
) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        return _attention_reference(q, k, v, scale, softcap)


@flash_attention_forward.register_fake
def _(q, k, v, scale, softcap):
    b, h, t, d = q.shape
    return q.new_empty(b, t, h, v.shape[-1]), q.new_empty(b, h, t, dtype=torch.float32)


@torch.library.custom_op("fastft_memmodel::flash_attention_backward", mutates_args=())
def flash_attention_backward(
    dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, softcap: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # Explicit gradients (autograd is off below the custom-op boundary). dout [B, T, H, D]; GQA groups summed.
    b, h, t, d = q.shape
    rep = h // k.shape[1]
    kf = k.repeat_interleave(rep, dim=1).float()
    vf = v.repeat_interleave(rep, dim=1).float()
    qf, do = q.float(), dout.transpose(1, 2).float()
    raw = torch.matmul(qf, kf.transpose(-1, -2)) * scale
    capped = torch.tanh(raw / softcap) if softcap else None
    scores = capped * softcap if softcap else raw
    scores = scores.masked_fill(torch.ones(t, t, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    p = torch.softmax(scores, dim=-1)
    dv = torch.matmul(p.transpose(-1, -2), do)
    dp = torch.matmul(do, vf.transpose(-1, -2))
    ds = p * (dp - (dp * p).sum(-1, keepdim=True))
    if softcap:
        ds = ds * (1 - capped * capped)
    dq = torch.matmul(ds, kf) * scale
    dk = torch.matmul(ds.transpose(-1, -2), qf) * scale
    fold = lambda g: g.view(b, k.shape[1], rep, t, -1).sum(2)
    return dq.to(q.dtype), fold(dk).to(k.dtype), fold(dv).to(v.dtype)


@flash_attention_backward.register_fake
def _(dout, q, k, v, scale, softcap):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


class _FlashAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, scale, softcap):
        out, lse = flash_attention_forward(q, k, v, scale, softcap)
        ctx.save_for_backward(q, k, v, out, lse)  # what FlashAttention-2 keeps: inputs, output, logsumexp
        ctx.scale, ctx.softcap = scale, softcap
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, _out, _lse = ctx.saved_tensors
        dq, dk, dv = flash_attention_backward(dout.contiguous(), q, k, v, ctx.scale, ctx.softcap)
        return dq, dk, dv, None, None


def meta_flash_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, softcap=None, **kwargs):
    """transformers AttentionInterface entry: causal attention with FlashAttention-2's memory (see module doc)."""
    if attention_mask is not None:
        raise ValueError("fastft_meta_sdpa_free models causal attention on full (padded) sequences; got a mask")
    scale = float(scaling) if scaling is not None else query.shape[-1] ** -0.5
    return _FlashAttention.apply(query, key, value, scale, float(softcap or 0.0)), None


def register_attention() -> str:
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION_NAME, meta_flash_attention)
    return ATTENTION_NAME
