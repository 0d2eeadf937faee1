"""Cross-entropy over a large vocabulary, fused: one program per row walks the vocab in blocks (online log-sum-exp).

Shapes and dtypes
    logits: [N, V] fp32/bf16/fp16 (last dim contiguous, any row stride), V up to 262,144 and beyond: the kernel loops
    over vocab blocks of at most 4,096 columns, so registers never hold a whole row. labels: [N] integer (the caller
    shifts them), ``ignore_index`` rows contribute nothing. Loss: fp32 scalar ("mean"/"sum") or fp32 [N] ("none").

Logit transform (each factor only when given), applied in fp32 after the upcast, as Hugging Face upcasts logits to
fp32 before the loss:
    f = softcap * tanh(logit_scale * x / softcap) / temperature
Gemma-2 uses the softcap, Cohere/Granite the scale; ``temperature`` is used by selective_log_softmax (GRPO/PPO). The
host folds the factors into two numbers so the kernel does at most one multiply, one tanh and one multiply:
    softcap on:  f = cap * tanh(scale * x)   with scale = logit_scale / softcap, cap = softcap / temperature
    softcap off: f = scale * x               with scale = logit_scale / temperature (SCALE=False when that is 1)
tanh is written with tl.exp (libdevice tanh is a stub under the interpreter).

Kernels (shared with linear_cross_entropy and selective_log_softmax, which call them on chunks of logits)
    stats: per row lse = logsumexp(f), tgt = f[label] (0 for ignored rows) and, with ENTROPY, E_p[f] (the entropy is
           lse - E_p[f]). Online: a running max and a rescaled running sum, one pass over the vocab.
    grad:  per row, with a = dL/dloss_row (loss_row = lse - f[label]) and e = dL/dentropy_row (ENTROPY only):
           df_j = a * (p_j - [j == label]) - e * p_j * (f_j - E_p[f]),  dx_j = df_j * df/dx_j,
           df/dx = scale (or cap * scale * (1 - tanh^2) with softcap). p is recomputed from lse, not stored.

Saved for backward: the logits (they already exist: the caller made them) and lse, one fp32 per row. This file's
public ``cross_entropy`` never writes the gradient into the logits buffer: the caller may still hold the logits
(Hugging Face returns ``outputs.logits``), and overwriting them would silently corrupt that tensor. The grad kernel
CAN run in place (DX == X: each program reads a block before writing the same block, rows are disjoint), and
linear_cross_entropy/selective_log_softmax do exactly that on their private chunk of logits, which no one else
references -- that is the case where in place is safe.

Reduction "mean" divides the summed loss by the number of non-ignored labels, or by ``n_items`` when given
(transformers' ``num_items_in_batch``: the target-token count across all gradient-accumulation micro-batches, so that
the accumulated gradient equals the large-batch one). "sum" with ``n_items`` also divides (transformers' semantics).
All labels ignored under "mean": we return 0.0 with zero gradients (torch returns NaN); the denominator is clamped to
at least 1.
"""

from __future__ import annotations

import torch

from fastft.kernels._launch import (
    TRITON_AVAILABLE,
    check_floating,
    launch,
    next_power_of_2,
    use_triton,
)

if TRITON_AVAILABLE:
    import triton
    import triton.language as tl

    # The gradient's fp32 -> bf16 store rounds to nearest even under the interpreter too (a plain .to() truncates
    # there), so interpreter parity with the torch path means GPU parity.
    from fastft.kernels.glu import cast_rne

    @triton.jit
    def _tanh(u):
        # tanh(u) = sign(u) * (1 - e^{-2|u|}) / (1 + e^{-2|u|}); e^{-2|u|} <= 1, so no overflow for any u.
        e = tl.exp(-2.0 * tl.abs(u))
        t = (1.0 - e) / (1.0 + e)
        return tl.where(u < 0.0, -t, t)

    @triton.jit
    def _transform(x, scale, cap, SCALE: tl.constexpr, SOFTCAP: tl.constexpr):
        """Logit transform and its derivative df/dx, in fp32."""
        if SOFTCAP:
            t = _tanh(x * scale)
            f = cap * t
            d = (cap * scale) * (1.0 - t * t)
        elif SCALE:
            f = x * scale
            d = tl.zeros_like(x) + scale
        else:
            f = x
            d = tl.zeros_like(x) + 1.0
        return f, d

    @triton.jit
    def _ce_stats_kernel(
        LSE, TGT, EF, X, LABELS,
        stride_x, n_cols, ignore_index, scale, cap,
        SCALE: tl.constexpr, SOFTCAP: tl.constexpr, ENTROPY: tl.constexpr, BLOCK: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        label = tl.load(LABELS + row)
        cols = tl.arange(0, BLOCK)
        x_ptr = X + row * stride_x
        # 0-d fp32 accumulators made by reductions, so the loop-carried types never change.
        m = tl.max(tl.full([BLOCK], float("-inf"), tl.float32), axis=0)
        s = tl.sum(tl.zeros([BLOCK], tl.float32), axis=0)
        t_acc = tl.sum(tl.zeros([BLOCK], tl.float32), axis=0)
        tgt = tl.sum(tl.zeros([BLOCK], tl.float32), axis=0)
        for start in range(0, n_cols, BLOCK):
            idx = start + cols
            mask = idx < n_cols
            x = tl.load(x_ptr + cols, mask=mask, other=0.0).to(tl.float32)
            f, _ = _transform(x, scale, cap, SCALE, SOFTCAP)
            f = tl.where(mask, f, float("-inf"))  # after the transform: tanh would map -inf to a finite -cap
            m_new = tl.maximum(m, tl.max(f, axis=0))
            alpha = tl.exp(m - m_new)
            e = tl.exp(f - m_new)
            s = s * alpha + tl.sum(e, axis=0)
            if ENTROPY:
                t_acc = t_acc * alpha + tl.sum(e * tl.where(mask, f, 0.0), axis=0)
            # The target logit is picked up as its block passes by: no separate (possibly out-of-bounds) gather load.
            tgt += tl.sum(tl.where(idx == label, f, 0.0), axis=0)
            m = m_new
            x_ptr += BLOCK
        tl.store(LSE + row, m + tl.log(s))
        tl.store(TGT + row, tl.where(label == ignore_index, 0.0, tgt))
        if ENTROPY:
            tl.store(EF + row, t_acc / s)

    @triton.jit
    def _ce_grad_kernel(
        DX, X, LABELS, LSE, DLOSS, DENT, EF,
        stride_dx, stride_x, n_cols, ignore_index, scale, cap,
        SCALE: tl.constexpr, SOFTCAP: tl.constexpr, ENTROPY: tl.constexpr, BLOCK: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        label = tl.load(LABELS + row)
        lse = tl.load(LSE + row)
        a = tl.load(DLOSS + row)
        a = tl.where(label == ignore_index, 0.0, a)
        if ENTROPY:
            g_ent = tl.load(DENT + row)
            ef = tl.load(EF + row)
        cols = tl.arange(0, BLOCK)
        x_ptr = X + row * stride_x
        dx_ptr = DX + row * stride_dx
        for start in range(0, n_cols, BLOCK):
            idx = start + cols
            mask = idx < n_cols
            # Read the block before writing it: safe when DX is X (in place on a private chunk).
            x = tl.load(x_ptr + cols, mask=mask, other=0.0).to(tl.float32)
            f, d = _transform(x, scale, cap, SCALE, SOFTCAP)
            p = tl.exp(f - lse)
            g = a * (p - tl.where(idx == label, 1.0, 0.0))
            if ENTROPY:
                g -= g_ent * p * (f - ef)
            tl.store(dx_ptr + cols, cast_rne(g * d, DX.dtype.element_ty), mask=mask)
            x_ptr += BLOCK
            dx_ptr += BLOCK


# ----------------------------------------------------------------------------------------------------------------
# Reference: the plain math on full fp32 logits, differentiable by autograd. The test oracle.
# ----------------------------------------------------------------------------------------------------------------
def transform_reference(
    logits: torch.Tensor, softcap: float | None = None, logit_scale: float | None = None, temperature: float = 1.0
) -> torch.Tensor:
    """Upcast to fp32, then scale, softcap and temperature in the order Hugging Face / TRL apply them."""
    z = logits.float()
    if logit_scale is not None:
        z = z * logit_scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    if temperature != 1.0:
        z = z / temperature
    return z


def cross_entropy_reference(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    ignore_index: int = -100,
    softcap: float | None = None,
    logit_scale: float | None = None,
    reduction: str = "mean",
    n_items: int | torch.Tensor | None = None,
) -> torch.Tensor:
    """``F.cross_entropy`` on the transformed fp32 logits (transformers' ForCausalLMLoss semantics for n_items).

    All-ignored "mean" gives NaN here, as in torch; the fused op returns 0 (see the module docstring).
    """
    z = transform_reference(logits, softcap, logit_scale)
    if n_items is not None:
        return torch.nn.functional.cross_entropy(z, labels, ignore_index=ignore_index, reduction="sum") / n_items
    return torch.nn.functional.cross_entropy(z, labels, ignore_index=ignore_index, reduction=reduction)


# ----------------------------------------------------------------------------------------------------------------
# Shared helpers: folding the transform, validating labels, turning a reduction into per-row weights
# ----------------------------------------------------------------------------------------------------------------
def fold_transform(
    softcap: float | None, logit_scale: float | None, temperature: float = 1.0
) -> tuple[bool, bool, float, float]:
    """(SOFTCAP, SCALE, scale, cap) for the kernels; see the module docstring."""
    if softcap is not None and not softcap > 0:
        raise ValueError(f"softcap must be positive, got {softcap}")
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    s = 1.0 if logit_scale is None else float(logit_scale)
    if softcap is not None:
        return True, False, s / float(softcap), float(softcap) / temperature
    s = s / temperature
    return False, s != 1.0, s, 1.0


def check_labels(name: str, labels: torch.Tensor, n_classes: int, ignore_index: int | None) -> torch.Tensor:
    """int64 labels; raises (before any kernel runs) if one lies outside [0, n_classes) and is not ignore_index.

    The kernels never read outside a row anyway (the target is picked up by comparison, not a gather), but a bad label
    would silently yield a wrong loss, so it is an error. This check syncs with the GPU once per call; it is skipped
    on meta tensors and while torch.compile traces (a data-dependent branch would break the graph).
    """
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor, got {labels.dtype}")
    labels = labels.long()
    if labels.device.type != "meta" and labels.numel() and not torch.compiler.is_compiling():
        bad = (labels < 0) | (labels >= n_classes)
        if ignore_index is not None:
            bad &= labels != ignore_index
        if bool(bad.any()):
            first = labels[bad][0].item()
            raise ValueError(
                f"{name} holds {int(bad.sum())} value(s) outside [0, {n_classes}) that are not ignore_index="
                f"{ignore_index} (first: {first})"
            )
    return labels


def row_weights(
    labels: torch.Tensor, ignore_index: int, reduction: str, n_items: int | float | torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(valid [N] bool, weight [N] fp32): d(reduced loss)/d(loss_row) for "mean"/"sum"; ignored rows weigh 0."""
    valid = labels != ignore_index
    weight = valid.float()
    if n_items is not None:
        if reduction == "none":
            raise ValueError("n_items divides a summed loss; it has no meaning with reduction='none'")
        if isinstance(n_items, torch.Tensor):
            denom = n_items.to(device=labels.device, dtype=torch.float32).clamp_min(1.0)
        else:
            if n_items <= 0:
                raise ValueError(f"n_items must be positive, got {n_items}")
            denom = float(n_items)
        weight = weight / denom
    elif reduction == "mean":
        weight = weight / valid.sum().clamp_min(1).float()  # all ignored -> 0 / 1 = 0, not NaN
    return valid, weight


def check_reduction(reduction: str) -> None:
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")


def vocab_block(n_cols: int) -> tuple[int, int]:
    """Vocab block and warps: at most 4,096 columns per step (16 fp32 per thread at 8 warps, no spills)."""
    block = min(next_power_of_2(n_cols), 4096)
    return max(block, 16), (8 if block >= 2048 else 4)


# ----------------------------------------------------------------------------------------------------------------
# Torch path: same algorithm (stats, then a gradient that may be written in place), over row pieces so the fp32
# temporaries stay bounded (a few 4 MiB pieces) whatever N and V are.
# ----------------------------------------------------------------------------------------------------------------
def _rows_per_piece(n_cols: int) -> int:
    return max(1, (1 << 20) // max(n_cols, 1))


def _transform_torch(x: torch.Tensor, scale: float, cap: float, scale_on: bool, softcap_on: bool):
    x = x.float()
    if softcap_on:
        t = torch.tanh(x * scale)
        return cap * t, (cap * scale) * (1.0 - t * t)
    if scale_on:
        return x * scale, None
    return x, None


def _stats_torch(x2, labels, ignore_index, scale, cap, scale_on, softcap_on, entropy):
    n = x2.shape[0]
    lse = torch.empty(n, dtype=torch.float32, device=x2.device)
    tgt = torch.empty(n, dtype=torch.float32, device=x2.device)
    ef = torch.empty(n if entropy else 0, dtype=torch.float32, device=x2.device)
    step = _rows_per_piece(x2.shape[1])
    for r0 in range(0, n, step):
        r1 = min(r0 + step, n)
        f, _ = _transform_torch(x2[r0:r1], scale, cap, scale_on, softcap_on)
        lse[r0:r1] = torch.logsumexp(f, dim=-1)
        lab = labels[r0:r1]
        valid = lab != ignore_index
        picked = f.gather(1, torch.where(valid, lab, 0)[:, None])[:, 0]
        tgt[r0:r1] = torch.where(valid, picked, 0.0)
        if entropy:
            p = torch.softmax(f, dim=-1)
            ef[r0:r1] = (p * f).sum(-1)
    return lse, tgt, ef


def _grad_torch(dx, x2, labels, lse, dloss, dent, ef, ignore_index, scale, cap, scale_on, softcap_on):
    step = _rows_per_piece(x2.shape[1])
    for r0 in range(0, x2.shape[0], step):
        r1 = min(r0 + step, x2.shape[0])
        f, d = _transform_torch(x2[r0:r1], scale, cap, scale_on, softcap_on)
        lab = labels[r0:r1]
        valid = lab != ignore_index
        p = (f - lse[r0:r1, None]).exp_()
        a = torch.where(valid, dloss[r0:r1], 0.0)[:, None]
        if dent is not None:
            ent_term = (f - ef[r0:r1, None]).mul_(p).mul_(dent[r0:r1, None])
        g = p.mul_(a)
        g.scatter_add_(1, torch.where(valid, lab, 0)[:, None], -a)
        if dent is not None:
            g.sub_(ent_term)
        if d is not None:
            g.mul_(d)
        elif scale_on:
            g.mul_(scale)
        dx[r0:r1] = g  # may be x2 itself: this piece was already read into f
    return dx


# ----------------------------------------------------------------------------------------------------------------
# Triton launchers
# ----------------------------------------------------------------------------------------------------------------
def _stats_triton(x2, labels, ignore_index, scale, cap, scale_on, softcap_on, entropy):
    n, v = x2.shape
    lse = torch.empty(n, dtype=torch.float32, device=x2.device)
    tgt = torch.empty(n, dtype=torch.float32, device=x2.device)
    ef = torch.empty(n if entropy else 1, dtype=torch.float32, device=x2.device)
    block, num_warps = vocab_block(v)
    launch(
        _ce_stats_kernel, (n,),
        lse, tgt, ef, x2, labels, x2.stride(0), v, int(ignore_index), float(scale), float(cap),
        SCALE=scale_on, SOFTCAP=softcap_on, ENTROPY=entropy, BLOCK=block, num_warps=num_warps,
    )
    return lse, tgt, (ef if entropy else ef[:0])


def _grad_triton(dx, x2, labels, lse, dloss, dent, ef, ignore_index, scale, cap, scale_on, softcap_on):
    n, v = x2.shape
    entropy = dent is not None
    block, num_warps = vocab_block(v)
    launch(
        _ce_grad_kernel, (n,),
        dx, x2, labels, lse, dloss, (dent if entropy else dloss), (ef if entropy else dloss),
        dx.stride(0), x2.stride(0), v, int(ignore_index), float(scale), float(cap),
        SCALE=scale_on, SOFTCAP=softcap_on, ENTROPY=entropy, BLOCK=block, num_warps=num_warps,
    )
    return dx


def ce_stats(
    x2: torch.Tensor, labels: torch.Tensor, ignore_index: int, fold: tuple[bool, bool, float, float], entropy: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(lse [N], tgt [N], E_p[f] [N] or empty) in fp32 for logits x2 [N, V] (last dim contiguous), labels [N] int64."""
    softcap_on, scale_on, scale, cap = fold
    fn = _stats_triton if use_triton("cross_entropy", x2) else _stats_torch
    return fn(x2, labels, ignore_index, scale, cap, scale_on, softcap_on, entropy)


def ce_grad(
    dx: torch.Tensor,
    x2: torch.Tensor,
    labels: torch.Tensor,
    lse: torch.Tensor,
    dloss: torch.Tensor,
    dent: torch.Tensor | None,
    ef: torch.Tensor | None,
    ignore_index: int,
    fold: tuple[bool, bool, float, float],
) -> torch.Tensor:
    """Write d(sum_i dloss_i * loss_i + dent_i * entropy_i)/dx into ``dx`` [N, V] (which may be ``x2`` itself)."""
    softcap_on, scale_on, scale, cap = fold
    fn = _grad_triton if use_triton("cross_entropy_backward", x2) else _grad_torch
    return fn(dx, x2, labels, lse, dloss, dent, ef, ignore_index, scale, cap, scale_on, softcap_on)


# ----------------------------------------------------------------------------------------------------------------
# Custom ops (fake impls let torch.compile and the meta-tensor memory model trace them) and autograd
# ----------------------------------------------------------------------------------------------------------------
def _rows(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


@torch.library.custom_op("fastft::cross_entropy_forward", mutates_args=())
def cross_entropy_forward(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int, softcap: float | None, logit_scale: float | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row loss [N] fp32 (0 at ignored rows) and lse [N] fp32, for logits [N, V] and int64 labels [N]."""
    x2 = _rows(logits)
    lse, tgt, _ = ce_stats(x2, labels, ignore_index, fold_transform(softcap, logit_scale), False)
    loss = torch.where(labels != ignore_index, lse - tgt, 0.0)
    return loss, lse


@cross_entropy_forward.register_fake
def _(logits, labels, ignore_index, softcap, logit_scale):
    n = logits.shape[0]
    return logits.new_empty(n, dtype=torch.float32), logits.new_empty(n, dtype=torch.float32)


@torch.library.custom_op("fastft::cross_entropy_backward", mutates_args=())
def cross_entropy_backward(
    dloss: torch.Tensor,
    logits: torch.Tensor,
    labels: torch.Tensor,
    lse: torch.Tensor,
    ignore_index: int,
    softcap: float | None,
    logit_scale: float | None,
) -> torch.Tensor:
    """dlogits [N, V] in logits.dtype, a fresh buffer (never the logits: the caller may still hold them)."""
    x2 = _rows(logits)
    dx = torch.empty_like(x2)
    return ce_grad(dx, x2, labels, lse, dloss.float().contiguous(), None, None, ignore_index,
                   fold_transform(softcap, logit_scale))


@cross_entropy_backward.register_fake
def _(dloss, logits, labels, lse, ignore_index, softcap, logit_scale):
    return torch.empty_like(logits)


class CrossEntropyFunction(torch.autograd.Function):
    """Saves logits, labels, lse and the per-row weights; the backward recomputes p from lse."""

    @staticmethod
    def forward(ctx, logits, labels, ignore_index, softcap, logit_scale, reduction, n_items):
        loss_rows, lse = torch.ops.fastft.cross_entropy_forward(logits, labels, ignore_index, softcap, logit_scale)
        weight = None
        if reduction != "none":
            _, weight = row_weights(labels, ignore_index, reduction, n_items)
            loss = (loss_rows * weight).sum()
        else:
            loss = loss_rows
        ctx.save_for_backward(logits, labels, lse, weight)
        ctx.args = (ignore_index, softcap, logit_scale, reduction)
        return loss

    @staticmethod
    def backward(ctx, dloss):
        logits, labels, lse, weight = ctx.saved_tensors
        ignore_index, softcap, logit_scale, reduction = ctx.args
        drows = dloss * weight if reduction != "none" else dloss
        dlogits = torch.ops.fastft.cross_entropy_backward(
            drows, logits, labels, lse, ignore_index, softcap, logit_scale
        )
        return dlogits, None, None, None, None, None, None


def cross_entropy(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    ignore_index: int = -100,
    softcap: float | None = None,
    logit_scale: float | None = None,
    reduction: str = "mean",
    n_items: int | torch.Tensor | None = None,
) -> torch.Tensor:
    """Fused cross-entropy on precomputed logits, vocab-chunked inside the kernel.

    Args:
        logits: [N, V] fp32/bf16/fp16 (already shifted: row i predicts labels[i]).
        labels: [N] integer; values in [0, V) or ``ignore_index``.
        softcap: Gemma-2 final-logit softcap (``softcap * tanh(logits / softcap)``), applied after ``logit_scale``.
        logit_scale: Cohere/Granite multiplier on the logits.
        reduction: "mean" (over non-ignored labels, or ``/ n_items``), "sum" (``/ n_items`` if given) or "none".
        n_items: the target-token count across gradient-accumulation steps (transformers' ``num_items_in_batch``).
    Returns:
        fp32 scalar, or fp32 [N] for "none" (0 at ignored rows). "mean" with every label ignored is 0.0 (zero grads).
    """
    check_floating("logits", logits)
    check_reduction(reduction)
    if logits.dim() != 2 or labels.dim() != 1 or labels.shape[0] != logits.shape[0]:
        raise ValueError(
            f"cross_entropy: logits must be [N, V] and labels [N]; got {tuple(logits.shape)} and {tuple(labels.shape)}"
        )
    if logits.device != labels.device:
        raise ValueError(f"cross_entropy: logits on {logits.device} but labels on {labels.device}")
    if logits.shape[1] == 0:
        raise ValueError("cross_entropy: vocab size is 0")
    labels = check_labels("labels", labels, logits.shape[1], ignore_index)
    fold_transform(softcap, logit_scale)  # validate now, not inside the op
    if n_items is not None and reduction == "none":
        raise ValueError("n_items divides a summed loss; it has no meaning with reduction='none'")
    if logits.shape[0] == 0:
        # nothing to launch; keep the graph connected so .backward() still works
        return logits.new_zeros(0, dtype=torch.float32) if reduction == "none" else logits.float().sum() * 0.0
    return CrossEntropyFunction.apply(
        logits, labels, int(ignore_index), softcap, logit_scale, reduction, n_items
    )


def compile_cases() -> None:
    """Every launch variant: dtypes x {plain, scale, softcap} x entropy or not x small/large vocab block."""
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for softcap, scale in ((None, None), (None, 0.5), (30.0, None), (30.0, 0.5)):
            fold = fold_transform(softcap, scale)
            # the 1,024-column block (vocab < 4,096) only in fp32: it differs from the 4,096 block in size alone
            for vocab in ((1000, 32001) if dtype == torch.float32 else (32001,)):
                x = torch.empty(3, vocab, dtype=dtype)
                labels = torch.zeros(3, dtype=torch.long)
                loss, lse = cross_entropy_forward(x, labels, -100, softcap, scale)
                cross_entropy_backward(loss, x, labels, lse, -100, softcap, scale)
                # the entropy variants that selective_log_softmax launches
                lse, _, ef = ce_stats(x, labels, -100, fold, True)
                ce_grad(x, x, labels, lse, lse, lse, ef, -100, fold)
