"""Rotary position embedding, fused: q and k rotated in one launch, forward and backward.

Shapes (Hugging Face layouts)
    q: [batch, q_heads, seq, head_dim], k: [batch, kv_heads, seq, head_dim] (grouped-query attention: any head
    counts); either may be a strided view, e.g. ``x.view(b, s, h, d).transpose(1, 2)``: the kernel walks the
    batch/head/seq strides (only a non-unit head_dim stride forces a copy).
    cos, sin: [batch or 1, seq, head_dim] (or [seq, head_dim]) exactly as the model's rotary embedding returns them
    for the given position_ids, so position offsets and packed sequences with restarting positions just work:
    row s of cos/sin is applied to position s of q and k.

Math (identical to transformers' ``apply_rotary_pos_emb``, the rotate_half convention)
    out = x * cos + rotate_half(x) * sin,   rotate_half(x) = cat(-x2, x1),  x1/x2 the two halves of head_dim:
        out1 = x1 * cos1 - x2 * sin1,   out2 = x2 * cos2 + x1 * sin2.
    Computed in fp32 (cos/sin upcast, whatever their dtype: fp32, or x.dtype as transformers returns them) and
    rounded once to q's dtype. Eager HF in bf16 rounds three times (two products and the sum), so the two differ by
    at most about one bf16 ulp.

Backward: the adjoint of that linear map, again from cos/sin only (nothing else is saved):
    dx1 = dy1 * cos1 + dy2 * sin2,   dx2 = dy2 * cos2 - dy1 * sin1,
    which for the usual cos/sin (both halves equal) is the rotation by -angle. No gradient flows to cos/sin (they
    come from a no-grad buffer in every HF model); passing cos/sin that require grad is an error, not a silent zero.

Launch: one program per (batch, position); it loads that position's cos/sin once and rotates every q head, then
every k head, in [heads, head_dim / 2] tiles.
"""

from __future__ import annotations

import torch

from fastft.kernels._launch import (
    TRITON_AVAILABLE,
    call_op,
    check_floating,
    direct_call_ok,
    launch,
    needs_grad,
    next_power_of_2,
    use_triton,
)

if TRITON_AVAILABLE:
    import triton
    import triton.language as tl

    from fastft.kernels._tl_utils import cast_rne  # rounds to bf16 like a GPU, also under the interpreter

    @triton.jit
    def _rotate_heads(
        OUT,
        X,
        stride_oh,
        stride_xh,
        n_heads,
        c1,
        c2,
        m12,
        m21,
        d,
        dmask,
        half,
        BLOCK_H: tl.constexpr,
    ):
        """o1 = x1 * c1 + x2 * m12, o2 = x2 * c2 + x1 * m21 for every head of one (batch, position)."""
        hs = tl.arange(0, BLOCK_H)
        for h0 in range(0, n_heads, BLOCK_H):
            heads = h0 + hs
            mask = (heads < n_heads)[:, None] & dmask[None, :]
            heads64 = heads.to(tl.int64)[:, None]  # heads * stride can pass 2**31 for long sequences
            x_ptr = X + heads64 * stride_xh + d[None, :]
            x1 = tl.load(x_ptr, mask=mask, other=0.0).to(tl.float32)
            x2 = tl.load(x_ptr + half, mask=mask, other=0.0).to(tl.float32)
            o1 = x1 * c1[None, :] + x2 * m12[None, :]
            o2 = x2 * c2[None, :] + x1 * m21[None, :]
            o_ptr = OUT + heads64 * stride_oh + d[None, :]
            tl.store(o_ptr, cast_rne(o1, OUT.dtype.element_ty), mask=mask)
            tl.store(o_ptr + half, cast_rne(o2, OUT.dtype.element_ty), mask=mask)

    @triton.jit
    def _rope_kernel(
        QO,
        KO,
        Q,
        K,
        COS,
        SIN,
        stride_qb,
        stride_qh,
        stride_qs,
        stride_kb,
        stride_kh,
        stride_ks,
        stride_qob,
        stride_qoh,
        stride_qos,
        stride_kob,
        stride_koh,
        stride_kos,
        stride_cb,
        stride_cs,
        stride_sb,
        stride_ss,
        seq_len,
        n_qh,
        n_kh,
        half,
        BACKWARD: tl.constexpr,
        BLOCK_HQ: tl.constexpr,
        BLOCK_HK: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        # The forward and the backward are the same 2x2 mixing of the halves with different coefficients, so one
        # kernel serves both (BACKWARD is a constexpr: no runtime branch).
        pid = tl.program_id(0).to(tl.int64)
        b = pid // seq_len
        s = pid % seq_len
        d = tl.arange(0, BLOCK_D)
        dmask = d < half
        cos_ptr = COS + b * stride_cb + s * stride_cs + d
        sin_ptr = SIN + b * stride_sb + s * stride_ss + d
        c1 = tl.load(cos_ptr, mask=dmask, other=0.0).to(tl.float32)
        c2 = tl.load(cos_ptr + half, mask=dmask, other=0.0).to(tl.float32)
        s1 = tl.load(sin_ptr, mask=dmask, other=0.0).to(tl.float32)
        s2 = tl.load(sin_ptr + half, mask=dmask, other=0.0).to(tl.float32)
        if BACKWARD:
            m12 = s2
            m21 = -s1
        else:
            m12 = -s1
            m21 = s2
        _rotate_heads(
            QO + b * stride_qob + s * stride_qos,
            Q + b * stride_qb + s * stride_qs,
            stride_qoh,
            stride_qh,
            n_qh,
            c1,
            c2,
            m12,
            m21,
            d,
            dmask,
            half,
            BLOCK_HQ,
        )
        _rotate_heads(
            KO + b * stride_kob + s * stride_kos,
            K + b * stride_kb + s * stride_ks,
            stride_koh,
            stride_kh,
            n_kh,
            c1,
            c2,
            m12,
            m21,
            d,
            dmask,
            half,
            BLOCK_HK,
        )


# ----------------------------------------------------------------------------------------------------------------
# Reference: the plain math, differentiable by autograd. The test oracle.
# ----------------------------------------------------------------------------------------------------------------
def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope_reference(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' ``apply_rotary_pos_emb`` (unsqueeze_dim=1), cast to q's dtype (HF would promote to fp32 when
    cos/sin are fp32 and q is half precision; fastft keeps the activation dtype)."""
    if cos.dim() == 2:
        cos, sin = cos[None], sin[None]
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    q_out = q * cos + _rotate_half(q) * sin
    k_out = k * cos + _rotate_half(k) * sin
    return q_out.to(q.dtype), k_out.to(q.dtype)


# ----------------------------------------------------------------------------------------------------------------
# Torch path (plain CPU): the same fp32 math, unfused
# ----------------------------------------------------------------------------------------------------------------
def _rotate_half_adjoint(y: torch.Tensor) -> torch.Tensor:
    y1, y2 = y.chunk(2, dim=-1)
    return torch.cat((y2, -y1), dim=-1)


def _rope_torch(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backward: bool, out: torch.Tensor) -> None:
    if x.numel() == 0:
        return
    c, s = cos.float().unsqueeze(1), sin.float().unsqueeze(1)
    x32 = x.float()
    if backward:
        out.copy_(x32 * c + _rotate_half_adjoint(x32 * s))
    else:
        out.copy_(x32 * c + _rotate_half(x32) * s)


# ----------------------------------------------------------------------------------------------------------------
# Launcher
# ----------------------------------------------------------------------------------------------------------------
#: At most this many values per [heads, head_dim/2] tile: 8 per thread at 4 warps, for each of x1, x2, o1, o2.
#: 2048 compiled to up to 126 registers per thread; 1024 stays at <= 96 on sm_75-90 with no spills (compile gate),
#: which leaves room for ~5 resident blocks per SM to hide memory latency in this bandwidth-bound kernel.
_TILE = 1024
_NUM_WARPS = 4


def _head_block(n_heads: int, block_d: int) -> int:
    return max(1, min(next_power_of_2(max(n_heads, 1)), _TILE // block_d))


def _rope_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    backward: bool,
    q_out: torch.Tensor,
    k_out: torch.Tensor,
) -> None:
    batch, n_qh, seq, head_dim = q.shape
    n_kh = k.shape[1]
    half = head_dim // 2
    block_d = next_power_of_2(half)
    # A batch-1 cos/sin broadcasts over the batch: stride 0.
    cb = 0 if cos.shape[0] == 1 else cos.stride(0)
    sb = 0 if sin.shape[0] == 1 else sin.stride(0)
    launch(
        _rope_kernel,
        (batch * seq,),
        q_out,
        k_out,
        q,
        k,
        cos,
        sin,
        q.stride(0),
        q.stride(1),
        q.stride(2),
        k.stride(0),
        k.stride(1),
        k.stride(2),
        q_out.stride(0),
        q_out.stride(1),
        q_out.stride(2),
        k_out.stride(0),
        k_out.stride(1),
        k_out.stride(2),
        cb,
        cos.stride(1),
        sb,
        sin.stride(1),
        seq,
        n_qh,
        n_kh,
        half,
        BACKWARD=backward,
        BLOCK_HQ=_head_block(n_qh, block_d),
        BLOCK_HK=_head_block(n_kh, block_d),
        BLOCK_D=block_d,
        num_warps=_NUM_WARPS,
    )


# ----------------------------------------------------------------------------------------------------------------
# Custom ops (with fake impls) and autograd
# ----------------------------------------------------------------------------------------------------------------
def _unit_last_stride(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 or t.shape[-1] <= 1 else t.contiguous()


def _out_like(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Same memory layout as t (e.g. a transposed [b, s, h, d] buffer) when that layout has a unit head_dim stride,
    else contiguous. Shared by the real and the fake impls so their strides agree."""
    out = torch.empty_like(t, dtype=dtype)
    if out.stride(-1) != 1 and out.shape[-1] > 1:
        out = torch.empty(t.shape, dtype=dtype, device=t.device)
    return out


def _as_3d(t: torch.Tensor) -> torch.Tensor:
    return t[None] if t.dim() == 2 else t


def _rope(
    op: str,
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    backward: bool,
    triton_path: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``triton_path``: the path when the caller has already chosen (and counted) it."""
    q_out, k_out = _out_like(q, q.dtype), _out_like(k, q.dtype)
    batch, _, seq, _ = q.shape
    if batch * seq == 0 or (q.numel() == 0 and k.numel() == 0):
        return q_out, k_out
    q, k = _unit_last_stride(q), _unit_last_stride(k)
    cos, sin = _unit_last_stride(_as_3d(cos)), _unit_last_stride(_as_3d(sin))
    if use_triton(op, q, k) if triton_path is None else triton_path:
        _rope_triton(q, k, cos, sin, backward, q_out, k_out)
    else:
        _rope_torch(q, cos, sin, backward, q_out)
        _rope_torch(k, cos, sin, backward, k_out)
    return q_out, k_out


@torch.library.custom_op("fastft::rope_forward", mutates_args=())
def rope_forward(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(q_out, k_out), both in q.dtype, q's/k's memory layout."""
    return _rope("rope", q, k, cos, sin, False)


@rope_forward.register_fake
def _(q, k, cos, sin):
    return _out_like(q, q.dtype), _out_like(k, q.dtype)


@torch.library.custom_op("fastft::rope_backward", mutates_args=())
def rope_backward(
    dq_out: torch.Tensor, dk_out: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(dq, dk): the adjoint rotation of the output gradients, in dq_out.dtype."""
    return _rope("rope_backward", dq_out, dk_out, cos, sin, True)


@rope_backward.register_fake
def _(dq_out, dk_out, cos, sin):
    return _out_like(dq_out, dq_out.dtype), _out_like(dk_out, dq_out.dtype)


class RopeFunction(torch.autograd.Function):
    """Saves only cos and sin; the backward is the adjoint rotation of the incoming gradients."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        q_out, k_out = call_op(rope_forward, q, k, cos, sin)
        ctx.save_for_backward(cos, sin)
        ctx.dtypes = (q.dtype, k.dtype)
        return q_out, k_out

    @staticmethod
    def backward(ctx, dq_out: torch.Tensor, dk_out: torch.Tensor):
        cos, sin = ctx.saved_tensors
        # The outputs share q's dtype; autograd hands gradients in that dtype (zeros when an output is unused).
        dq, dk = call_op(rope_backward, dq_out, dk_out.to(dq_out.dtype), cos, sin)
        return dq.to(ctx.dtypes[0]), dk.to(ctx.dtypes[1]), None, None


def _check_inputs(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    for name, t in (("q", q), ("k", k), ("cos", cos), ("sin", sin)):
        check_floating(name, t)
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(
            f"apply_rope: q and k must be [batch, heads, seq, head_dim]; got q {tuple(q.shape)}, k {tuple(k.shape)}"
        )
    if q.dtype != k.dtype:
        raise TypeError(f"apply_rope: q and k must have the same dtype, got {q.dtype} and {k.dtype}")
    batch, _, seq, head_dim = q.shape
    if k.shape[0] != batch or k.shape[2] != seq or k.shape[3] != head_dim:
        raise ValueError(f"apply_rope: k {tuple(k.shape)} must match q {tuple(q.shape)} in batch, seq and head_dim")
    if head_dim % 2:
        raise ValueError(f"apply_rope: head_dim must be even, got {head_dim}")
    if cos.shape != sin.shape or cos.dim() not in (2, 3):
        raise ValueError(
            f"apply_rope: cos and sin must both be [batch, seq, head_dim] (or [seq, head_dim]); got "
            f"cos {tuple(cos.shape)}, sin {tuple(sin.shape)}"
        )
    if cos.dtype != sin.dtype:
        raise TypeError(f"apply_rope: cos and sin must have the same dtype, got {cos.dtype} and {sin.dtype}")
    cos_batch, cos_seq, cos_dim = (1, *cos.shape) if cos.dim() == 2 else cos.shape
    if cos_dim != head_dim:
        raise ValueError(f"apply_rope: cos/sin head_dim {cos_dim} does not match q/k head_dim {head_dim}")
    if cos_seq != seq:
        what = "shorter than" if cos_seq < seq else "longer than"
        raise ValueError(
            f"apply_rope: cos/sin cover {cos_seq} positions, {what} the sequence of {seq}; pass the "
            f"cos/sin the rotary embedding returns for these position_ids"
        )
    if cos_batch not in (1, batch):
        raise ValueError(f"apply_rope: cos/sin batch {cos_batch} must be 1 or q's batch {batch}")
    if len({q.device, k.device, cos.device, sin.device}) != 1:
        raise ValueError(
            f"apply_rope: all inputs must be on one device; got q {q.device}, k {k.device}, "
            f"cos {cos.device}, sin {sin.device}"
        )
    if torch.is_grad_enabled() and (cos.requires_grad or sin.requires_grad):
        raise ValueError("apply_rope: no gradient is computed for cos/sin; pass cos.detach(), sin.detach()")


def apply_rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused rotary embedding, a drop-in for transformers' ``apply_rotary_pos_emb(q, k, cos, sin)``.

    Args:
        q: [batch, q_heads, seq, head_dim], fp32/bf16/fp16, any strides (head_dim stride 1 avoids a copy).
        k: [batch, kv_heads, seq, head_dim], same dtype as q.
        cos, sin: [batch or 1, seq, head_dim] (or [seq, head_dim]), any float dtype, from the rotary embedding.
    Returns:
        (q_out, k_out) shaped like q and k, in q.dtype. Backward: gradients for q and k only.
    """
    _check_inputs(q, k, cos, sin)
    if q.numel() == 0 and k.numel() == 0:
        return _out_like(q, q.dtype), _out_like(k, q.dtype)
    if not needs_grad(q, k):  # no graph to record (generation, eval): the forward alone, same bits
        if direct_call_ok(q, k, cos, sin):  # eager plain tensors: the op's body without the op (decoding's calls)
            if use_triton("rope", q, k):
                return _rope("rope", q, k, cos, sin, False, triton_path=True)
            c, s = (t.float().unsqueeze(1) for t in (_as_3d(cos), _as_3d(sin)))
            return _rotated(q, c, s, q.dtype), _rotated(k, c, s, q.dtype)
        return call_op(rope_forward, q, k, cos, sin)
    return RopeFunction.apply(q, k, cos, sin)


def _rotated(x: torch.Tensor, c: torch.Tensor, s: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``_rope_torch``'s forward values (fp32 math, one rounding to ``dtype``) in a fresh tensor, no copy into a
    preallocated output."""
    x32 = x.float()
    return (x32 * c + _rotate_half(x32) * s).to(dtype)


def compile_cases() -> None:
    """Launch variants: forward/backward x q dtype x cos/sin dtype (same as q, or fp32 as some callers keep them),
    at Llama-3-8B heads (32/8 of 128); plus the other head layouts in bf16: Llama-3.2-1B (32/8 of 64), Gemma (8/1 of
    256, the largest tile), a head_dim whose half is not a power of two (80: masked lanes)."""
    cases = [
        (128, 32, 8, dtype, cos_dtype)
        for dtype in (torch.float32, torch.bfloat16, torch.float16)
        for cos_dtype in dict.fromkeys((dtype, torch.float32))
    ]
    cases += [
        (64, 32, 8, torch.bfloat16, torch.bfloat16),
        (256, 8, 1, torch.bfloat16, torch.bfloat16),
        (80, 32, 32, torch.bfloat16, torch.bfloat16),
    ]
    for head_dim, n_qh, n_kh, dtype, cos_dtype in cases:
        q = torch.empty(2, n_qh, 5, head_dim, dtype=dtype)
        k = torch.empty(2, n_kh, 5, head_dim, dtype=dtype)
        cos = torch.empty(1, 5, head_dim, dtype=cos_dtype)
        rope_forward(q, k, cos, cos)
        rope_backward(q, k, cos, cos)
