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

Loss options (see cross_entropy_math for the algebra): ``label_smoothing`` (torch's), ``class_weight`` (torch's
``weight``) and the z-loss ``lse_square_scale * lse^2``. The kernels only ever see three per-row gradient coefficients
computed on the host, so the options cost one extra per-row accumulator (smoothing's sum_j w_j f_j) and nothing else.

Kernels (shared with linear_cross_entropy and selective_log_softmax, which call them on chunks of logits)
    stats: per row lse = logsumexp(f), tgt = f[label] (0 for ignored rows) and, each behind a constexpr, E_p[f]
           (ENTROPY: the entropy is lse - E_p[f]), sum_j w_j f_j (SMOOTH, w_j from CLASS_WEIGHT or 1) and
           argmax(f) == label (ARGMAX, argmax's first-maximum rule: TRL's ``mean_token_accuracy``). Online: a running
           max and a rescaled running sum, one pass over the vocab.
    grad:  per row, with coefficients a, b, c (cross_entropy_math.grad_coefficients; without options a = b =
           dL/dloss_row, c = 0) and e = dL/dentropy_row (ENTROPY only):
           df_j = a p_j - b [j == label] - c w_j - e p_j (f_j - E_p[f]),  dx_j = df_j * df/dx_j,
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

from typing import TYPE_CHECKING, Any, NamedTuple

import torch

from fastft.kernels._launch import (
    TRITON_AVAILABLE,
    call_op,
    check_floating,
    launch,
    next_power_of_2,
    option_schema,
    use_triton,
)
from fastft.kernels.cross_entropy_math import (  # noqa: F401  (cross_entropy_reference: re-exported, the op's oracle)
    CrossEntropyOptions,
    GradCoefficients,
    LossOptions,
    check_class_weight,
    check_labels,
    cross_entropy_reference,
    grad_coefficients,
    reduce_rows,
    resolve_loss_options,
    row_losses,
    row_weights,
)

if TYPE_CHECKING:
    from typing_extensions import Unpack  # typing.Unpack from Python 3.11

if TRITON_AVAILABLE:
    import triton
    import triton.language as tl

    # The gradient's fp32 -> bf16 store rounds to nearest even under the interpreter too (a plain .to() truncates
    # there), so interpreter parity with the torch path means GPU parity.
    from fastft.kernels._tl_utils import cast_rne

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
        LSE,
        TGT,
        EF,
        SUMF,
        TOP1,
        X,
        LABELS,
        CW,
        stride_x,
        n_cols,
        ignore_index,
        scale,
        cap,
        SCALE: tl.constexpr,
        SOFTCAP: tl.constexpr,
        ENTROPY: tl.constexpr,
        SMOOTH: tl.constexpr,
        CLASS_WEIGHT: tl.constexpr,
        ARGMAX: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        label = tl.load(LABELS + row)
        cols = tl.arange(0, BLOCK)
        x_ptr = X + row * stride_x
        # 0-d accumulators made by reductions, so the loop-carried types never change.
        m = tl.max(tl.full([BLOCK], float("-inf"), tl.float32), axis=0)
        s = tl.sum(tl.zeros([BLOCK], tl.float32), axis=0)
        t_acc = tl.sum(tl.zeros([BLOCK], tl.float32), axis=0)
        tgt = tl.sum(tl.zeros([BLOCK], tl.float32), axis=0)
        sf = tl.sum(tl.zeros([BLOCK], tl.float32), axis=0)
        best = tl.sum(tl.zeros([BLOCK], tl.int32), axis=0)  # first column holding the running max
        for start in range(0, n_cols, BLOCK):
            idx = start + cols
            mask = idx < n_cols
            x = tl.load(x_ptr + cols, mask=mask, other=0.0).to(tl.float32)
            f, _ = _transform(x, scale, cap, SCALE, SOFTCAP)
            if SMOOTH:  # sum_j w_j f_j for label smoothing (w_j = 1 without class weights)
                if CLASS_WEIGHT:
                    w = tl.load(CW + idx, mask=mask, other=0.0)
                    sf += tl.sum(tl.where(mask, f * w, 0.0), axis=0)
                else:
                    sf += tl.sum(tl.where(mask, f, 0.0), axis=0)
            f = tl.where(mask, f, float("-inf"))  # after the transform: tanh would map -inf to a finite -cap
            b_max = tl.max(f, axis=0)
            if ARGMAX:
                # argmax's first-index tie rule: a later block takes over only with a strictly larger maximum.
                first = tl.min(tl.where(f == b_max, idx, n_cols), axis=0)
                best = tl.where(b_max > m, first, best)
            m_new = tl.maximum(m, b_max)
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
        if SMOOTH:
            tl.store(SUMF + row, sf)
        if ARGMAX:
            tl.store(TOP1 + row, ((best == label) & (label != ignore_index)).to(tl.int8))

    @triton.jit
    def _ce_grad_kernel(
        DX,
        X,
        LABELS,
        LSE,
        DP,
        DTGT,
        DSMOOTH,
        CW,
        DENT,
        EF,
        stride_dx,
        stride_x,
        n_cols,
        ignore_index,
        scale,
        cap,
        SCALE: tl.constexpr,
        SOFTCAP: tl.constexpr,
        ENTROPY: tl.constexpr,
        SMOOTH: tl.constexpr,
        CLASS_WEIGHT: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        label = tl.load(LABELS + row)
        lse = tl.load(LSE + row)
        ignored = label == ignore_index
        # df_j = a p_j - b [j == label] - c w_j (see cross_entropy_math); ignored rows get no loss gradient.
        a = tl.where(ignored, 0.0, tl.load(DP + row))
        b = tl.where(ignored, 0.0, tl.load(DTGT + row))
        if SMOOTH:
            c = tl.where(ignored, 0.0, tl.load(DSMOOTH + row))
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
            g = a * p - tl.where(idx == label, b, 0.0)
            if SMOOTH:
                if CLASS_WEIGHT:
                    g -= c * tl.load(CW + idx, mask=mask, other=0.0)
                else:
                    g -= c
            if ENTROPY:
                g -= g_ent * p * (f - ef)
            tl.store(dx_ptr + cols, cast_rne(g * d, DX.dtype.element_ty), mask=mask)
            x_ptr += BLOCK
            dx_ptr += BLOCK


# The torch reference (the test oracle) is the family's: cross_entropy_math.cross_entropy_reference, imported above.


def vocab_block(n_cols: int) -> tuple[int, int]:
    """Vocab block and warps: at most 4,096 columns per step (16 fp32 per thread at 8 warps, no spills)."""
    block = min(next_power_of_2(n_cols), 4096)
    return max(block, 16), (8 if block >= 2048 else 4)


class RowStats(NamedTuple):
    """What the stats pass returns per row, fp32 [N] unless noted; each is empty when not asked for."""

    lse: torch.Tensor  #: logsumexp f
    tgt: torch.Tensor  #: f[label] (0 at ignored rows)
    ef: torch.Tensor  #: E_p[f] (entropy = lse - ef)
    sumf: torch.Tensor  #: sum_j w_j f_j (label smoothing)
    top1: torch.Tensor  #: bool: argmax f == label (first maximum; False at ignored rows)


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


def empty_row_stats(n: int, device: torch.device, entropy: bool, smooth: bool, top1: bool) -> RowStats:
    """Buffers for the statistics of n rows: lse and tgt always, the others empty unless asked for."""
    f32 = dict(dtype=torch.float32, device=device)
    return RowStats(
        torch.empty(n, **f32),
        torch.empty(n, **f32),
        torch.empty(n if entropy else 0, **f32),
        torch.empty(n if smooth else 0, **f32),
        torch.empty(n if top1 else 0, dtype=torch.bool, device=device),
    )


def _stats_torch(x2, labels, options, class_weight, entropy, top1) -> RowStats:
    softcap_on, scale_on, scale, cap = options.fold
    out = empty_row_stats(x2.shape[0], x2.device, entropy, options.smoothing, top1)
    step = _rows_per_piece(x2.shape[1])
    for r0 in range(0, x2.shape[0], step):
        r1 = min(r0 + step, x2.shape[0])
        f, _ = _transform_torch(x2[r0:r1], scale, cap, scale_on, softcap_on)
        out.lse[r0:r1] = torch.logsumexp(f, dim=-1)
        lab = labels[r0:r1]
        valid = lab != options.ignore_index
        picked = f.gather(1, torch.where(valid, lab, 0)[:, None])[:, 0]
        out.tgt[r0:r1] = torch.where(valid, picked, 0.0)
        if entropy:
            out.ef[r0:r1] = (torch.softmax(f, dim=-1) * f).sum(-1)
        if options.smoothing:
            out.sumf[r0:r1] = (f if class_weight is None else f * class_weight).sum(-1)
        if top1:
            out.top1[r0:r1] = (f.argmax(-1) == lab) & valid  # argmax returns the first maximum
    return out


def _grad_torch(dx, x2, labels, lse, coef, options, class_weight, dent, ef):
    softcap_on, scale_on, scale, cap = options.fold
    step = _rows_per_piece(x2.shape[1])
    for r0 in range(0, x2.shape[0], step):
        r1 = min(r0 + step, x2.shape[0])
        f, d = _transform_torch(x2[r0:r1], scale, cap, scale_on, softcap_on)
        lab = labels[r0:r1]
        valid = lab != options.ignore_index
        p = (f - lse[r0:r1, None]).exp_()
        if dent is not None:
            ent_term = (f - ef[r0:r1, None]).mul_(p).mul_(dent[r0:r1, None])
        # the kernel's order of operations: a p - b [j == y] - c w - entropy term
        g = p.mul_(torch.where(valid, coef.p[r0:r1], 0.0)[:, None])
        g.scatter_add_(1, torch.where(valid, lab, 0)[:, None], -torch.where(valid, coef.target[r0:r1], 0.0)[:, None])
        if coef.smooth is not None:
            c = torch.where(valid, coef.smooth[r0:r1], 0.0)[:, None]
            g.sub_(c if class_weight is None else c * class_weight)
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
def _row_walk_args(x2, options, entropy: bool, smooth: bool, class_weight) -> tuple[tuple, dict]:
    """What both row kernels end with: the walk over x2's rows and the transform (positional), and the constexprs
    they share with the block size and warps (by keyword)."""
    softcap_on, scale_on, scale, cap = options.fold
    block, num_warps = vocab_block(x2.shape[1])
    args = (x2.stride(0), x2.shape[1], options.ignore_index, float(scale), float(cap))
    constexprs = dict(
        SCALE=scale_on,
        SOFTCAP=softcap_on,
        ENTROPY=entropy,
        SMOOTH=smooth,
        CLASS_WEIGHT=smooth and class_weight is not None,
        BLOCK=block,
        num_warps=num_warps,
    )
    return args, constexprs


def _stats_triton(x2, labels, options, class_weight, entropy, top1) -> RowStats:
    n = x2.shape[0]
    lse = torch.empty(n, dtype=torch.float32, device=x2.device)
    tgt = torch.empty_like(lse)
    # outputs not asked for get a 1-element stand-in (never written: their constexpr is off)
    ef = torch.empty(n if entropy else 1, dtype=torch.float32, device=x2.device)
    sumf = torch.empty(n if options.smoothing else 1, dtype=torch.float32, device=x2.device)
    top = torch.empty(n if top1 else 1, dtype=torch.int8, device=x2.device)
    cw = lse if class_weight is None else class_weight
    walk, constexprs = _row_walk_args(x2, options, entropy, options.smoothing, class_weight)
    launch(_ce_stats_kernel, (n,), lse, tgt, ef, sumf, top, x2, labels, cw, *walk, ARGMAX=top1, **constexprs)
    return RowStats(
        lse,
        tgt,
        ef if entropy else ef[:0],
        sumf if options.smoothing else sumf[:0],
        top.view(torch.bool) if top1 else top[:0].view(torch.bool),
    )


def _grad_triton(dx, x2, labels, lse, coef, options, class_weight, dent, ef):
    entropy, smooth = dent is not None, coef.smooth is not None
    # options not in use get lse as a stand-in pointer (never read: their constexpr is off)
    d_smooth = coef.smooth if smooth else lse
    cw = class_weight if smooth and class_weight is not None else lse
    dent, ef = (dent, ef) if entropy else (lse, lse)
    walk, constexprs = _row_walk_args(x2, options, entropy, smooth, class_weight)
    tensors = (dx, x2, labels, lse, coef.p, coef.target, d_smooth, cw, dent, ef)
    launch(_ce_grad_kernel, (x2.shape[0],), *tensors, dx.stride(0), *walk, **constexprs)
    return dx


def ce_stats(
    x2: torch.Tensor,
    labels: torch.Tensor,
    options: CrossEntropyOptions,
    *,
    class_weight: torch.Tensor | None = None,
    entropy: bool = False,
    top1: bool = False,
) -> RowStats:
    """Row statistics of logits x2 [N, V] (last dim contiguous), labels [N] int64, class_weight fp32 [V] or None:
    lse and f[label] always, E_p[f] with ``entropy``, sum_j w_j f_j when ``options`` smooth labels, argmax == label
    with ``top1``."""
    fn = _stats_triton if use_triton("cross_entropy", x2) else _stats_torch
    return fn(x2, labels, options, class_weight, entropy, top1)


def ce_grad(
    dx: torch.Tensor,
    x2: torch.Tensor,
    labels: torch.Tensor,
    lse: torch.Tensor,
    coef: GradCoefficients,
    options: CrossEntropyOptions,
    *,
    class_weight: torch.Tensor | None = None,
    dent: torch.Tensor | None = None,
    ef: torch.Tensor | None = None,
) -> torch.Tensor:
    """Write ``d/dx`` of ``sum_i (loss terms with coefficients coef) + dent_i * entropy_i`` into ``dx`` [N, V] (which may
    be ``x2`` itself); see cross_entropy_math for the coefficients."""
    fn = _grad_triton if use_triton("cross_entropy_backward", x2) else _grad_torch
    return fn(dx, x2, labels, lse, coef, options, class_weight, dent, ef)


# ----------------------------------------------------------------------------------------------------------------
# Custom ops (fake impls let torch.compile and the meta-tensor memory model trace them) and autograd. The ops take
# the options one by one (a schema cannot hold a dataclass: _launch.option_schema writes them from its fields);
# Python callers pass ``**options.op_kwargs()``.
# ----------------------------------------------------------------------------------------------------------------
def _rows(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


#: The ops' keyword-only arguments: the CrossEntropyOptions fields (their body rebuilds the dataclass).
_OPTIONS_SCHEMA = option_schema(CrossEntropyOptions)


@torch.library.custom_op(
    "fastft::cross_entropy_forward",
    mutates_args=(),
    schema=f"(Tensor logits, Tensor labels, Tensor? class_weight, *, {_OPTIONS_SCHEMA}) -> (Tensor, Tensor, Tensor)",
)
def cross_entropy_forward(
    logits: torch.Tensor, labels: torch.Tensor, class_weight: torch.Tensor | None, **options: Any
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(lse [N], f[label] [N] (0 at ignored rows), sum_j w_j f_j [N] or empty without smoothing), fp32, for logits
    [N, V], int64 labels [N] and fp32 class weights [V] or None."""
    stats = ce_stats(_rows(logits), labels, CrossEntropyOptions(**options), class_weight=class_weight)
    return stats.lse, stats.tgt, stats.sumf


@cross_entropy_forward.register_fake
def _(logits, labels, class_weight, **options):
    stats = empty_row_stats(logits.shape[0], logits.device, False, options["label_smoothing"] > 0.0, False)
    return stats.lse, stats.tgt, stats.sumf


@torch.library.custom_op(
    "fastft::cross_entropy_backward",
    mutates_args=(),
    schema="(Tensor logits, Tensor labels, Tensor lse, Tensor d_p, Tensor d_target, Tensor? d_smooth, "
    f"Tensor? class_weight, *, {_OPTIONS_SCHEMA}) -> Tensor",
)
def cross_entropy_backward(
    logits: torch.Tensor,
    labels: torch.Tensor,
    lse: torch.Tensor,
    d_p: torch.Tensor,
    d_target: torch.Tensor,
    d_smooth: torch.Tensor | None,
    class_weight: torch.Tensor | None,
    **options: Any,
) -> torch.Tensor:
    """dlogits [N, V] in logits.dtype from the gradient coefficients (cross_entropy_math.grad_coefficients), a fresh
    buffer (never the logits: the caller may still hold them)."""
    x2 = _rows(logits)
    coef = GradCoefficients(d_p, d_target, d_smooth)
    return ce_grad(torch.empty_like(x2), x2, labels, lse, coef, CrossEntropyOptions(**options), class_weight=class_weight)


@cross_entropy_backward.register_fake
def _(logits, *tensors, **options):
    return torch.empty_like(logits)


class CrossEntropyFunction(torch.autograd.Function):
    """Saves logits, labels, lse and the per-row weights; the backward recomputes p from lse."""

    @staticmethod
    def forward(ctx, logits, labels, class_weight, options, reduction, n_items):
        lse, tgt, sumf = call_op(cross_entropy_forward, logits, labels, class_weight, **options.op_kwargs())
        ce, z = row_losses(lse, tgt, sumf, labels, options, class_weight, logits.shape[1])
        weights = row_weights(labels, options.ignore_index, reduction, n_items, class_weight)
        loss = reduce_rows(ce, z, weights)
        ctx.save_for_backward(logits, labels, lse, class_weight, *(() if weights is None else weights[1:]))
        ctx.args = (options, reduction)
        return loss

    @staticmethod
    def backward(ctx, dloss):
        logits, labels, lse, class_weight, *weights = ctx.saved_tensors
        options, reduction = ctx.args
        d_ce = dloss.float() * weights[0] if weights else dloss.float()
        d_z = dloss.float() * weights[1] if weights else dloss.float()
        coef = grad_coefficients(lse, labels, d_ce, d_z, options, class_weight, logits.shape[1])
        dlogits = call_op(cross_entropy_backward, logits, labels, lse, *coef, class_weight, **options.op_kwargs())
        return dlogits, None, None, None, None, None


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor, **options: Unpack[LossOptions]) -> torch.Tensor:
    """Fused cross-entropy on precomputed logits, vocab-chunked inside the kernel.

    Args:
        logits: [N, V] fp32/bf16/fp16 (already shifted: row i predicts labels[i]).
        labels: [N] integer; values in [0, V) or ``ignore_index``.
        **options: :class:`~fastft.kernels.cross_entropy_math.LossOptions`: ignore_index, softcap, logit_scale,
            reduction, n_items, class_weight, label_smoothing, lse_square_scale.
    Returns:
        fp32 scalar, or fp32 [N] for "none" (0 at ignored rows). "mean" with every label ignored is 0.0 (zero grads).
    """
    check_floating("logits", logits)
    call = resolve_loss_options("cross_entropy", options)
    if logits.dim() != 2 or labels.dim() != 1 or labels.shape[0] != logits.shape[0]:
        raise ValueError(
            f"cross_entropy: logits must be [N, V] and labels [N]; got {tuple(logits.shape)} and {tuple(labels.shape)}"
        )
    if logits.device != labels.device:
        raise ValueError(f"cross_entropy: logits on {logits.device} but labels on {labels.device}")
    if logits.shape[1] == 0:
        raise ValueError("cross_entropy: vocab size is 0")
    labels = check_labels("labels", labels, logits.shape[1], call.options.ignore_index)
    class_weight = check_class_weight(call.class_weight, logits.shape[1], logits.device)
    if logits.shape[0] == 0:
        # nothing to launch; keep the graph connected so .backward() still works
        return logits.new_zeros(0, dtype=torch.float32) if call.reduction == "none" else logits.float().sum() * 0.0
    return CrossEntropyFunction.apply(logits, labels, class_weight, call.options, call.reduction, call.n_items)


def compile_cases() -> None:
    """Every launch variant the code makes: dtypes x {plain, scale, softcap, both} (small and large vocab block in
    fp32); and, per dtype, entropy (selective_log_softmax), argmax (token accuracy), label smoothing with and without
    class weights. The flags guard independent code blocks, so each is compiled in every dtype, not in every
    combination."""
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for softcap, scale in ((None, None), (None, 0.5), (30.0, None), (30.0, 0.5)):
            # the 1,024-column block (vocab < 4,096) only in fp32: it differs from the 4,096 block in size alone
            for vocab in (1000, 32001) if dtype == torch.float32 else (32001,):
                x = torch.empty(3, vocab, dtype=dtype)
                labels = torch.zeros(3, dtype=torch.long)
                ones = torch.ones(3)
                opts = CrossEntropyOptions(softcap=softcap, logit_scale=scale)
                lse, _, _ = cross_entropy_forward(x, labels, None, **opts.op_kwargs())
                cross_entropy_backward(x, labels, lse, ones, ones, None, None, **opts.op_kwargs())
        x = torch.empty(3, 32001, dtype=dtype)
        labels = torch.zeros(3, dtype=torch.long)
        ones = torch.ones(3)
        cw = torch.ones(32001)
        plain = CrossEntropyOptions()
        stats = ce_stats(x, labels, plain, entropy=True, top1=True)  # entropy + argmax
        ce_grad(x, x, labels, stats.lse, GradCoefficients(ones, ones, None), plain, dent=ones, ef=stats.ef)
        for softcap in (None, 30.0):
            smooth = CrossEntropyOptions(softcap=softcap, label_smoothing=0.1, lse_square_scale=1e-4)
            for weight in (None, cw):
                lse, _, _ = cross_entropy_forward(x, labels, weight, **smooth.op_kwargs())
                cross_entropy_backward(x, labels, lse, ones, ones, ones, weight, **smooth.op_kwargs())
