"""Linear + cross-entropy, fused over token chunks: ``hidden @ weight.T (+ bias)`` and the loss without ever holding the
full [tokens, vocab] logits, in the forward or the backward.

Shapes and dtypes
    hidden [..., H] fp32/bf16/fp16 (any leading shape), weight [V, H] (the lm_head, or the tied embedding matrix) and
    bias [V] of the same dtype, labels [...] integer with hidden's leading shape (already shifted by the caller).
    Loss: fp32 scalar ("mean"/"sum") or fp32 [...] ("none").

Algorithm, per chunk of C tokens (C from the problem, see :func:`choose_chunk_size`):
    logits_c = hidden_c @ weight.T (+ bias)           torch matmul (cuBLAS on GPU), [C, V] in hidden.dtype
    lse, target logit (+ options, metrics)            cross_entropy's stats kernel (vocab-chunked, online lse)
    dlogits_c, IN PLACE in logits_c                    cross_entropy's grad kernel: safe, logits_c is private
    dhidden_c = dlogits_c @ weight                    written into its rows of dhidden
    dweight += dlogits_c.T @ hidden_c                 only when weight requires grad
    dbias += dlogits_c.sum(0)                         only when bias requires grad
Live memory: one [C, V] chunk, dhidden [N, H], and dweight [V, H] (accumulated in weight.dtype: each chunk's GEMM
accumulates in fp32 and rounds once per chunk) only when the weight trains. A frozen lm_head (LoRA) costs no
weight-gradient work or memory at all.

Why gradients are computed in the forward (as Liger and cut-cross-entropy do) for "mean"/"sum": the incoming
gradient of a scalar loss is one number, so the forward can produce d(loss)/d(hidden, weight) for a unit incoming
gradient and the backward only multiplies by it (in place). Recomputing instead would repeat the [C, H] x [H, V]
matmul for every chunk in the backward (+1/3 of the lm_head FLOPs) for no memory gain, since the loss is the last
op of the forward. For reduction "none" the per-row incoming gradients are unknown in the forward and do not factor
out of dweight, so that case recomputes the chunks in the backward (the same op, called again with the gradients).
The same chunk op serves selective_log_softmax (with the entropy terms).

Loss options (cross_entropy_math): ``label_smoothing``, ``class_weight`` (F.cross_entropy's ``weight``) and the z-loss
``lse_square_scale``; they change the per-row statistics and gradient coefficients, never the GEMMs. Token metrics
(``return_token_stats``: entropy and argmax == label, TRL's ``entropy`` / ``mean_token_accuracy``) come out of the same
stats kernel on the same logits chunk, so they cost no second LM-head GEMM (a test counts the GEMMs).

Non-tensor options travel as two frozen dataclasses, :class:`~fastft.kernels.cross_entropy_math.CrossEntropyOptions`
(the loss) and :class:`ChunkPlan` (what to compute); the custom op takes their fields as keyword-only arguments.

Saved for backward: mean/sum -> dhidden, dweight, dbias (what the backward returns); none -> hidden, weight, bias,
labels (the recompute inputs).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections import Counter
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, NamedTuple

import torch

from fastft.kernels._launch import (
    TRITON_AVAILABLE,
    call_op,
    check_floating,
    launch_hook,
    next_power_of_2,
    option_kwargs,
    option_schema,
    options_from_kwargs,
)
from fastft.kernels.cross_entropy import ce_grad, ce_stats, empty_row_stats
from fastft.kernels.cross_entropy_math import (
    CrossEntropyOptions,
    LossOptions,
    check_class_weight,
    check_labels,
    cross_entropy_reference,
    grad_coefficients,
    reduce_rows,
    resolve_loss_options,
    row_losses,
    row_weights,
    transform_reference,
)

if TYPE_CHECKING:
    from typing_extensions import Unpack  # typing.Unpack from Python 3.11

#: What the chunk loop did: "chunks" (one logits GEMM each), "dweight_chunks", "dbias_chunks". Tests read it to prove
#: a frozen weight costs no weight-gradient work.
chunk_counts: Counter[str] = Counter()


# ----------------------------------------------------------------------------------------------------------------
# Reference: full logits, plain autograd. The test oracle (and the memory baseline).
# ----------------------------------------------------------------------------------------------------------------
def linear_cross_entropy_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    **options: Unpack[LossOptions],
) -> torch.Tensor:
    """``F.cross_entropy`` (+ z-loss) on the full fp32-upcast logits ``hidden @ weight.T + bias`` (the family's
    :func:`~fastft.kernels.cross_entropy_math.cross_entropy_reference` on them)."""
    logits = torch.nn.functional.linear(hidden, weight, bias)
    loss = cross_entropy_reference(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), **options)
    return loss.reshape(labels.shape) if loss.dim() == 1 else loss  # "none": per token, in labels' shape


def token_stats_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    softcap: float | None = None,
    logit_scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(entropy fp32 [...], is_top1 bool [...]) from the full logits, 0 / False at ignored rows: what
    ``return_token_stats`` computes without them."""
    z = transform_reference(torch.nn.functional.linear(hidden, weight, bias), softcap, logit_scale)
    log_p = z.log_softmax(-1)
    valid = labels != ignore_index
    entropy = torch.where(valid, -(log_p.exp() * log_p).sum(-1), 0.0)
    return entropy, (z.argmax(-1) == labels) & valid


# ----------------------------------------------------------------------------------------------------------------
# The chunk loop: the one memory algorithm, shared by the Triton and torch paths (only the per-chunk softmax part
# differs, and that is cross_entropy's ce_stats/ce_grad, which dispatch themselves).
# ----------------------------------------------------------------------------------------------------------------
def choose_chunk_size(n_rows: int, hidden_size: int, vocab: int, dtype: torch.dtype, device: torch.device) -> int:
    """Tokens per chunk: the [C, V] logits chunk about as large as hidden itself (C ~ N * H / V, a power of 2, at
    least 64 rows so the GEMMs stay efficient), and on CUDA no more than 1/8 of the free memory (chunk + fp32
    temporaries)."""
    rows = next_power_of_2(max(1, math.ceil(n_rows * hidden_size / max(vocab, 1))))
    rows = max(rows, 64)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        per_row = vocab * (torch.finfo(dtype).bits // 8 + 4)
        rows = min(rows, max(1, (free // 8) // per_row))
    return max(1, min(rows, n_rows))


@dataclasses.dataclass(frozen=True)
class ChunkPlan:
    """What the chunk loop computes besides lse and f[label]: E_p[f] (``entropy``), argmax == label (``top1``), and
    which gradients (when it is given per-row loss gradients); ``chunk_size`` tokens per chunk."""

    chunk_size: int
    entropy: bool = False
    top1: bool = False
    compute_dh: bool = False
    compute_dw: bool = False
    compute_db: bool = False


class ChunkResult(NamedTuple):
    """fp32 [N] row statistics (each empty unless asked for: ef with entropy, sumf with label smoothing, top1 bool
    with top1) and the gradients dhidden [N, H], dweight [V, H], dbias [V] (empty unless computed)."""

    lse: torch.Tensor
    tgt: torch.Tensor
    ef: torch.Tensor
    sumf: torch.Tensor
    top1: torch.Tensor
    dh: torch.Tensor
    dw: torch.Tensor
    db: torch.Tensor


def _chunk_loop(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    *,
    options: CrossEntropyOptions,
    plan: ChunkPlan,
    class_weight: torch.Tensor | None = None,
    d_ce: torch.Tensor | None = None,
    d_z: torch.Tensor | None = None,
    d_entropy: torch.Tensor | None = None,
) -> ChunkResult:
    n, vocab = hidden.shape[0], weight.shape[0]
    grads = d_ce is not None
    f32 = dict(dtype=torch.float32, device=hidden.device)
    lse, tgt, ef, sumf, top1 = empty_row_stats(n, hidden.device, plan.entropy, options.smoothing, plan.top1)
    dh = torch.empty_like(hidden) if grads and plan.compute_dh else hidden.new_empty(0)
    dw = torch.zeros_like(weight) if grads and plan.compute_dw else weight.new_empty(0)
    compute_db = grads and plan.compute_db
    db = torch.zeros(vocab, **f32) if compute_db else hidden.new_empty(0, dtype=torch.float32)
    wt = weight.t()
    for r0 in range(0, n, plan.chunk_size):
        r1 = min(r0 + plan.chunk_size, n)
        h_c = hidden[r0:r1]
        # The one forward GEMM of the LM head for these tokens: loss, gradients and token metrics all come from it.
        logits = torch.addmm(bias, h_c, wt) if bias is not None else torch.mm(h_c, wt)
        lab = labels[r0:r1]
        st = ce_stats(logits, lab, options, class_weight=class_weight, entropy=plan.entropy, top1=plan.top1)
        lse[r0:r1], tgt[r0:r1] = st.lse, st.tgt
        for buf, part in ((ef, st.ef), (sumf, st.sumf), (top1, st.top1)):
            if buf.numel():
                buf[r0:r1] = part
        chunk_counts["chunks"] += 1
        if grads:
            coef = grad_coefficients(
                st.lse, lab, d_ce[r0:r1], None if d_z is None else d_z[r0:r1], options, class_weight, vocab
            )
            # dlogits overwrite the chunk's logits: nothing else references this private buffer.
            ce_grad(
                logits,
                logits,
                lab,
                st.lse,
                coef,
                options,
                class_weight=class_weight,
                dent=None if d_entropy is None else d_entropy[r0:r1],
                ef=st.ef if plan.entropy else None,
            )
            if plan.compute_dh:
                torch.mm(logits, weight, out=dh[r0:r1])
            if plan.compute_dw:
                dw.addmm_(logits.t(), h_c)
                chunk_counts["dweight_chunks"] += 1
            if compute_db:
                db += logits.sum(0, dtype=torch.float32)
                chunk_counts["dbias_chunks"] += 1
        del logits, st
    return ChunkResult(lse, tgt, ef, sumf, top1, dh, dw, db.to(bias.dtype) if compute_db else db)


@torch.library.custom_op(
    "fastft::linear_cross_entropy_chunks",
    mutates_args=(),
    schema="(Tensor hidden, Tensor weight, Tensor? bias, Tensor labels, Tensor? class_weight, Tensor? d_ce, Tensor? d_z, "
    f"Tensor? d_entropy, *, {option_schema(CrossEntropyOptions, ChunkPlan)}) -> ({', '.join(['Tensor'] * 8)})",
)
def linear_cross_entropy_chunks(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    class_weight: torch.Tensor | None,
    d_ce: torch.Tensor | None,
    d_z: torch.Tensor | None,
    d_entropy: torch.Tensor | None,
    **options_and_plan: Any,
) -> tuple[torch.Tensor, ...]:
    """Chunked ``hidden [N, H] @ weight.T`` + log-softmax statistics, and optionally the gradients: a
    :class:`ChunkResult` as a tuple. Options are keyword-only: the CrossEntropyOptions and ChunkPlan fields.

    With ``d_ce`` (d/d ce_row, and ``d_z`` d/d z_row under z-loss, see cross_entropy_math) the gradients of
    ``sum(d_ce * ce_row + d_z * z_row + d_entropy * entropy_row)`` are computed per chunk from the same logits.
    """
    options, plan = options_from_kwargs(options_and_plan, CrossEntropyOptions, ChunkPlan)
    tensors = dict(class_weight=class_weight, d_ce=d_ce, d_z=d_z, d_entropy=d_entropy)
    return tuple(_chunk_loop(hidden, weight, bias, labels, options=options, plan=plan, **tensors))


@linear_cross_entropy_chunks.register_fake
def _(hidden, weight, bias, labels, class_weight, d_ce, d_z, d_entropy, **options_and_plan):
    options, plan = options_from_kwargs(options_and_plan, CrossEntropyOptions, ChunkPlan)
    grads = d_ce is not None
    stats = empty_row_stats(hidden.shape[0], hidden.device, plan.entropy, options.smoothing, plan.top1)
    return (
        *stats,
        torch.empty_like(hidden) if grads and plan.compute_dh else hidden.new_empty(0),
        torch.empty_like(weight) if grads and plan.compute_dw else weight.new_empty(0),
        (bias.new_empty(weight.shape[0]) if grads and plan.compute_db else hidden.new_empty(0, dtype=torch.float32)),
    )


def _run_chunks(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    *,
    options: CrossEntropyOptions,
    plan: ChunkPlan,
    class_weight: torch.Tensor | None = None,
    d_ce: torch.Tensor | None = None,
    d_z: torch.Tensor | None = None,
    d_entropy: torch.Tensor | None = None,
) -> ChunkResult:
    """The chunk op, called by keyword (same signature as :func:`_chunk_loop`); inside :func:`chunk_loop_in_place` the
    loop itself, run directly."""
    if _in_place:
        hook = _in_place[-1]
        tensors = dict(class_weight=class_weight, d_ce=d_ce, d_z=d_z, d_entropy=d_entropy)
        with launch_hook(hook) if hook is not None and TRITON_AVAILABLE else contextlib.nullcontext():
            return _chunk_loop(hidden, weight, bias, labels, options=options, plan=plan, **tensors)
    tensors = (hidden, weight, bias, labels, class_weight, d_ce, d_z, d_entropy)
    return ChunkResult(*call_op(linear_cross_entropy_chunks, *tensors, **option_kwargs(options, plan)))


#: The launch hooks of the :func:`chunk_loop_in_place` blocks now open, innermost last (None: launches run).
_in_place: list[Callable[..., Any] | None] = []


@contextlib.contextmanager
def chunk_loop_in_place(hook: Callable[..., Any] | None = None) -> Iterator[None]:
    """Inside the block, linear_cross_entropy and selective_log_softmax run their chunk loop directly instead of
    the custom op ``fastft::linear_cross_entropy_chunks``. For memory models on meta tensors: the op's fake impl only
    models its outputs, the loop also allocates its [C, V] logits chunk and gradient buffers, as on a GPU.

    ``hook(kernel, grid, args, kwargs)``: while a loop runs (and only then), the per-chunk softmax's Triton launches
    go to it instead of running (see ``fastft.kernels.launch_hook``; the launchers still allocate their outputs).
    Without triton the loop takes its torch path and the hook is not used. Blocks nest; the innermost hook wins.
    """
    _in_place.append(hook)
    try:
        yield
    finally:
        _in_place.pop()


# ----------------------------------------------------------------------------------------------------------------
# Autograd
# ----------------------------------------------------------------------------------------------------------------
class LinearCrossEntropyFunction(torch.autograd.Function):
    """Outputs (loss, entropy [N], is_top1 [N]); the token statistics are empty unless asked for and carry no
    gradient."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, class_weight, n_items, options, reduction, plan):
        ctx.args = (options, reduction, plan)
        weights = row_weights(labels, options.ignore_index, reduction, n_items, class_weight)
        if weights is None:
            r = _run_chunks(hidden, weight, bias, labels, options=options, plan=plan, class_weight=class_weight)
            ctx.save_for_backward(hidden, weight, bias, labels, class_weight)
        else:
            any_grad = plan.compute_dh or plan.compute_dw or plan.compute_db
            r = _run_chunks(
                hidden,
                weight,
                bias,
                labels,
                options=options,
                plan=plan,
                class_weight=class_weight,
                d_ce=weights.ce if any_grad else None,
                d_z=weights.z if any_grad and options.z_loss else None,
            )
            ctx.save_for_backward(r.dh, r.dw, r.db)
        ce, z = row_losses(r.lse, r.tgt, r.sumf, labels, options, class_weight, weight.shape[0])
        loss = reduce_rows(ce, z, weights)
        entropy = torch.where(labels != options.ignore_index, r.lse - r.ef, 0.0) if plan.entropy else r.ef
        ctx.mark_non_differentiable(entropy, r.top1)
        return loss, entropy, r.top1

    @staticmethod
    def backward(ctx, dloss, _dentropy, _dtop1):
        options, reduction, plan = ctx.args
        if reduction == "none":
            hidden, weight, bias, labels, class_weight = ctx.saved_tensors
            drows = torch.where(labels != options.ignore_index, dloss.float(), 0.0)
            r = _run_chunks(
                hidden,
                weight,
                bias,
                labels,
                options=options,
                class_weight=class_weight,
                d_ce=drows,
                d_z=drows if options.z_loss else None,
                plan=dataclasses.replace(plan, entropy=False, top1=False),
            )
            dh, dw, db = r.dh, r.dw, r.db
        else:
            dh, dw, db = ctx.saved_tensors
            # Scale in place: dweight can be 0.5+ GB and an out-of-place multiply would double it. A second
            # backward through the same graph then fails autograd's saved-tensor version check (a clear error).
            for t, need in ((dh, plan.compute_dh), (dw, plan.compute_dw), (db, plan.compute_db)):
                if need:
                    t.mul_(dloss.to(t.dtype))
        return (
            dh if plan.compute_dh else None,
            dw if plan.compute_dw else None,
            db if plan.compute_db else None,
            None,
            None,
            None,
            None,
            None,
            None,
        )


class TokenStats(NamedTuple):
    """``linear_cross_entropy(..., return_token_stats=True)``: the loss and, per token (labels' shape, no gradient),
    the entropy of softmax(f) in nats (fp32) and whether argmax f is the label (bool); 0 / False at ignored tokens."""

    loss: torch.Tensor
    entropy: torch.Tensor
    is_top1: torch.Tensor


def autocast_inputs(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Under autocast, cast to the autocast dtype as ``F.linear`` would (a differentiable cast: an fp32 lm_head
    still receives an fp32 gradient). Without autocast, mismatched dtypes are an error (see check_linear_inputs)."""
    device = hidden.device.type
    if device not in ("cuda", "cpu") or not torch.is_autocast_enabled(device):
        return hidden, weight, bias
    dtype = torch.get_autocast_dtype(device)
    return hidden.to(dtype), weight.to(dtype), (None if bias is None else bias.to(dtype))


def check_linear_inputs(op: str, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    check_floating("hidden", hidden)
    check_floating("weight", weight)
    if hidden.dim() < 1 or weight.dim() != 2 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"{op}: need hidden [..., H] and weight [V, H]; got {tuple(hidden.shape)} and {tuple(weight.shape)}"
        )
    if weight.shape[0] == 0:
        raise ValueError(f"{op}: weight has 0 rows (vocab size 0)")
    if hidden.dtype != weight.dtype:
        raise TypeError(f"{op}: hidden is {hidden.dtype} but weight is {weight.dtype}; cast one (autocast does)")
    if bias is not None:
        check_floating("bias", bias)
        if bias.shape != (weight.shape[0],) or bias.dtype != weight.dtype:
            raise ValueError(f"{op}: bias must be [{weight.shape[0]}] {weight.dtype}; got {tuple(bias.shape)} {bias.dtype}")
    devices = {t.device for t in (hidden, weight, bias) if t is not None}
    if len(devices) > 1:
        raise ValueError(f"{op}: tensors on different devices: {sorted(map(str, devices))}")


def chunk_plan(
    chunk_size: int | None,
    h2: torch.Tensor,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    entropy: bool = False,
    top1: bool = False,
) -> ChunkPlan:
    """The plan for one call on ``h2`` [N, H] (``hidden`` reshaped): ``chunk_size`` checked (None: choose_chunk_size)
    and the gradient of each of hidden, weight, bias computed only when grad mode is on and it requires grad."""
    n = h2.shape[0]
    if chunk_size is not None:
        if chunk_size <= 0:
            raise ValueError(f"chunk_size must be positive, got {chunk_size}")
        rows = min(int(chunk_size), n)
    else:
        rows = choose_chunk_size(n, h2.shape[-1], weight.shape[0], h2.dtype, h2.device)
    dh, dw, db = (torch.is_grad_enabled() and t is not None and t.requires_grad for t in (hidden, weight, bias))
    return ChunkPlan(chunk_size=rows, entropy=entropy, top1=top1, compute_dh=dh, compute_dw=dw, compute_db=db)


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    return_token_stats: bool = False,
    chunk_size: int | None = None,
    **options: Unpack[LossOptions],
) -> torch.Tensor | TokenStats:
    """Cross-entropy of ``hidden @ weight.T + bias`` without materializing the logits.

    Args:
        hidden: [..., H] fp32/bf16/fp16, the final hidden states (already aligned with ``labels``: the caller shifts).
        weight: [V, H], same dtype (lm_head weight or the tied embedding); under autocast both are cast to the
            autocast dtype, as F.linear does. Its gradient is computed only when it requires grad.
        labels: [...] integer, hidden's leading shape; values in [0, V) or ``ignore_index``.
        bias: optional [V].
        return_token_stats: also return per-token entropy and top-1 correctness (TRL's ``entropy`` and
            ``mean_token_accuracy``), computed from the same chunk logits as the loss: no second LM-head GEMM.
        chunk_size: tokens per chunk (default: :func:`choose_chunk_size`).
        **options: :class:`~fastft.kernels.cross_entropy_math.LossOptions`, as for ``cross_entropy``: ignore_index,
            softcap, logit_scale, reduction, n_items, class_weight, label_smoothing, lse_square_scale.
    Returns:
        fp32 scalar, or fp32 [...] for "none"; with ``return_token_stats`` a :class:`TokenStats`. "mean" with every
        label ignored is 0.0 with zero gradients.
    """
    hidden, weight, bias = autocast_inputs(hidden, weight, bias)
    check_linear_inputs("linear_cross_entropy", hidden, weight, bias)
    call = resolve_loss_options("linear_cross_entropy", options)
    if tuple(labels.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(
            f"linear_cross_entropy: labels {tuple(labels.shape)} must have hidden's leading shape {tuple(hidden.shape[:-1])}"
        )
    if labels.device != hidden.device:
        raise ValueError(f"linear_cross_entropy: labels on {labels.device} but hidden on {hidden.device}")
    class_weight = check_class_weight(call.class_weight, weight.shape[0], hidden.device)
    flat = check_labels("labels", labels.reshape(-1), weight.shape[0], call.options.ignore_index)
    h2 = hidden.reshape(-1, hidden.shape[-1])
    if h2.shape[0] == 0:
        zero = hidden.float().sum() * 0.0 + weight.float().sum() * 0.0
        loss = hidden.new_zeros(labels.shape, dtype=torch.float32) if call.reduction == "none" else zero
        if return_token_stats:
            return TokenStats(
                loss,
                hidden.new_zeros(labels.shape, dtype=torch.float32),
                torch.zeros(labels.shape, dtype=torch.bool, device=hidden.device),
            )
        return loss
    h2 = h2.contiguous()
    plan = chunk_plan(chunk_size, h2, hidden, weight, bias, entropy=return_token_stats, top1=return_token_stats)
    loss, entropy, top1 = LinearCrossEntropyFunction.apply(
        h2, weight, bias, flat, class_weight, call.n_items, call.options, call.reduction, plan
    )
    if call.reduction == "none":
        loss = loss.reshape(labels.shape)
    if return_token_stats:
        return TokenStats(loss, entropy.reshape(labels.shape), top1.reshape(labels.shape))
    return loss


def compile_cases() -> None:
    """The kernels this op launches are cross_entropy's (stats + in-place grad) on contiguous chunk buffers: every
    dtype and transform, then per dtype the loss options (smoothing, z-loss, class weights) and the token metrics
    (entropy + argmax in the stats kernel, entropy off in the grad kernel)."""
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        h = torch.empty(5, 64, dtype=dtype)
        w = torch.empty(32001, 64, dtype=dtype)
        b = torch.empty(32001, dtype=dtype)
        labels = torch.zeros(5, dtype=torch.long)
        ones = torch.ones(5)
        grads = ChunkPlan(chunk_size=4, compute_dh=True, compute_dw=True, compute_db=True)
        for softcap, scale in ((None, None), (None, 0.5), (30.0, None)):
            options = CrossEntropyOptions(softcap=softcap, logit_scale=scale)
            _run_chunks(h, w, b, labels, options=options, plan=grads, d_ce=ones)
        metrics = dataclasses.replace(grads, entropy=True, top1=True)
        _run_chunks(h, w, b, labels, options=CrossEntropyOptions(), plan=metrics, d_ce=ones)
        for cw in (None, torch.ones(32001)):
            options = CrossEntropyOptions(label_smoothing=0.1, lse_square_scale=1e-4)
            _run_chunks(h, w, b, labels, options=options, plan=metrics, class_weight=cw, d_ce=ones, d_z=ones)
