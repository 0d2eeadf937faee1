"""Linear + cross-entropy, fused over token chunks: ``hidden @ weight.T (+ bias)`` and the loss without ever holding the
full [tokens, vocab] logits, in the forward or the backward.

Shapes and dtypes
    hidden [..., H] fp32/bf16/fp16 (any leading shape), weight [V, H] (the lm_head, or the tied embedding matrix) and
    bias [V] of the same dtype, labels [...] integer with hidden's leading shape (already shifted by the caller).
    Loss: fp32 scalar ("mean"/"sum") or fp32 [...] ("none").

Algorithm, per chunk of C tokens (C from the problem, see :func:`choose_chunk_size`):
    logits_c = hidden_c @ weight.T (+ bias)           torch matmul (cuBLAS on GPU), [C, V] in hidden.dtype
    lse, target logit                                 cross_entropy's stats kernel (vocab-chunked, online lse)
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

Saved for backward: mean/sum -> dhidden, dweight, dbias (what the backward returns); none -> hidden, weight, bias,
labels (the recompute inputs).
"""

from __future__ import annotations

import math
from collections import Counter

import torch

from fastft.kernels._launch import check_floating, next_power_of_2
from fastft.kernels.cross_entropy import (
    ce_grad,
    ce_stats,
    check_labels,
    check_reduction,
    fold_transform,
    row_weights,
    transform_reference,
)

#: What the chunk loop did: "chunks", "dweight_chunks", "dbias_chunks". Tests read it to prove a frozen weight
#: costs no weight-gradient work.
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
    ignore_index: int = -100,
    softcap: float | None = None,
    logit_scale: float | None = None,
    reduction: str = "mean",
    n_items: int | torch.Tensor | None = None,
) -> torch.Tensor:
    """``F.cross_entropy`` on the full fp32-upcast logits ``hidden @ weight.T + bias`` (transformers' semantics)."""
    logits = torch.nn.functional.linear(hidden, weight, bias)
    z = transform_reference(logits.reshape(-1, logits.shape[-1]), softcap, logit_scale)
    flat = labels.reshape(-1)
    if n_items is not None:
        return torch.nn.functional.cross_entropy(z, flat, ignore_index=ignore_index, reduction="sum") / n_items
    loss = torch.nn.functional.cross_entropy(z, flat, ignore_index=ignore_index, reduction=reduction)
    return loss.reshape(labels.shape) if reduction == "none" else loss


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


def _chunk_loop(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    dloss: torch.Tensor | None,
    dent: torch.Tensor | None,
    ignore_index: int,
    softcap: float | None,
    logit_scale: float | None,
    temperature: float,
    entropy: bool,
    compute_dh: bool,
    compute_dw: bool,
    compute_db: bool,
    chunk_size: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    n, _ = hidden.shape
    fold = fold_transform(softcap, logit_scale, temperature)
    grads = dloss is not None
    f32 = dict(dtype=torch.float32, device=hidden.device)
    lse = torch.empty(n, **f32)
    tgt = torch.empty(n, **f32)
    ef = torch.empty(n if entropy else 0, **f32)
    dh = torch.empty_like(hidden) if grads and compute_dh else hidden.new_empty(0)
    dw = torch.zeros_like(weight) if grads and compute_dw else weight.new_empty(0)
    db = torch.zeros(weight.shape[0], **f32) if grads and compute_db else hidden.new_empty(0, dtype=torch.float32)
    wt = weight.t()
    for r0 in range(0, n, chunk_size):
        r1 = min(r0 + chunk_size, n)
        h_c = hidden[r0:r1]
        logits = torch.addmm(bias, h_c, wt) if bias is not None else torch.mm(h_c, wt)
        lab = labels[r0:r1]
        lse_c, tgt_c, ef_c = ce_stats(logits, lab, ignore_index, fold, entropy)
        lse[r0:r1] = lse_c
        tgt[r0:r1] = tgt_c
        if entropy:
            ef[r0:r1] = ef_c
        chunk_counts["chunks"] += 1
        if grads:
            # dlogits overwrite the chunk's logits: nothing else references this private buffer.
            ce_grad(logits, logits, lab, lse_c, dloss[r0:r1], None if dent is None else dent[r0:r1], ef_c,
                    ignore_index, fold)
            if compute_dh:
                torch.mm(logits, weight, out=dh[r0:r1])
            if compute_dw:
                dw.addmm_(logits.t(), h_c)
                chunk_counts["dweight_chunks"] += 1
            if compute_db:
                db += logits.sum(0, dtype=torch.float32)
                chunk_counts["dbias_chunks"] += 1
        del logits, lse_c, tgt_c, ef_c
    return lse, tgt, ef, dh, dw, db.to(bias.dtype) if (grads and compute_db) else db


@torch.library.custom_op("fastft::linear_cross_entropy_chunks", mutates_args=())
def linear_cross_entropy_chunks(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    dloss: torch.Tensor | None,
    dent: torch.Tensor | None,
    ignore_index: int,
    softcap: float | None,
    logit_scale: float | None,
    temperature: float,
    entropy: bool,
    compute_dh: bool,
    compute_dw: bool,
    compute_db: bool,
    chunk_size: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Chunked ``hidden [N, H] @ weight.T`` + log-softmax statistics, and optionally the gradients.

    Returns (lse [N], tgt [N], E_p[f] [N] or empty) in fp32 and, when ``dloss`` (d/d loss_row, loss_row =
    lse - tgt) is given, (dhidden [N, H], dweight [V, H], dbias [V]) of ``sum(dloss * loss_row + dent * entropy_row)``,
    each empty unless its ``compute_*`` flag is set.
    """
    return _chunk_loop(hidden, weight, bias, labels, dloss, dent, ignore_index, softcap, logit_scale, temperature,
                       entropy, compute_dh, compute_dw, compute_db, chunk_size)


@linear_cross_entropy_chunks.register_fake
def _(hidden, weight, bias, labels, dloss, dent, ignore_index, softcap, logit_scale, temperature, entropy,
      compute_dh, compute_dw, compute_db, chunk_size):
    n = hidden.shape[0]
    grads = dloss is not None
    f32 = dict(dtype=torch.float32)
    return (
        hidden.new_empty(n, **f32), hidden.new_empty(n, **f32), hidden.new_empty(n if entropy else 0, **f32),
        torch.empty_like(hidden) if grads and compute_dh else hidden.new_empty(0),
        torch.empty_like(weight) if grads and compute_dw else weight.new_empty(0),
        (bias.new_empty(weight.shape[0]) if grads and compute_db else hidden.new_empty(0, **f32)),
    )


def _run_chunks(*args):
    """One indirection so the memory benchmark can run the torch-path loop itself on meta tensors (the fake impl only
    models the op's outputs, not the chunk temporaries inside)."""
    return torch.ops.fastft.linear_cross_entropy_chunks(*args)


# ----------------------------------------------------------------------------------------------------------------
# Autograd
# ----------------------------------------------------------------------------------------------------------------
class LinearCrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, n_items, ignore_index, softcap, logit_scale, reduction, chunk,
                need_dh, need_dw, need_db):
        ctx.args = (ignore_index, softcap, logit_scale, reduction, chunk, need_dh, need_dw, need_db)
        if reduction == "none":
            lse, tgt, _, _, _, _ = _run_chunks(hidden, weight, bias, labels, None, None, ignore_index, softcap,
                                               logit_scale, 1.0, False, False, False, False, chunk)
            ctx.save_for_backward(hidden, weight, bias, labels)
            return torch.where(labels != ignore_index, lse - tgt, 0.0)
        valid, w = row_weights(labels, ignore_index, reduction, n_items)
        any_grad = need_dh or need_dw or need_db
        lse, tgt, _, dh, dw, db = _run_chunks(hidden, weight, bias, labels, w if any_grad else None, None,
                                              ignore_index, softcap, logit_scale, 1.0, False,
                                              need_dh, need_dw, need_db, chunk)
        ctx.save_for_backward(dh, dw, db)
        return (torch.where(valid, lse - tgt, 0.0) * w).sum()

    @staticmethod
    def backward(ctx, dloss):
        ignore_index, softcap, logit_scale, reduction, chunk, need_dh, need_dw, need_db = ctx.args
        if reduction == "none":
            hidden, weight, bias, labels = ctx.saved_tensors
            drows = torch.where(labels != ignore_index, dloss.float(), 0.0)
            _, _, _, dh, dw, db = _run_chunks(hidden, weight, bias, labels, drows, None, ignore_index, softcap,
                                              logit_scale, 1.0, False, need_dh, need_dw, need_db, chunk)
        else:
            dh, dw, db = ctx.saved_tensors
            # Scale in place: dweight can be 0.5+ GB and an out-of-place multiply would double it. A second
            # backward through the same graph then fails autograd's saved-tensor version check (a clear error).
            for t, need in ((dh, need_dh), (dw, need_dw), (db, need_db)):
                if need:
                    t.mul_(dloss.to(t.dtype))
        return (dh if need_dh else None, dw if need_dw else None, db if need_db else None,
                None, None, None, None, None, None, None, None, None, None)


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
        raise ValueError(f"{op}: need hidden [..., H] and weight [V, H]; got {tuple(hidden.shape)} and "
                         f"{tuple(weight.shape)}")
    if weight.shape[0] == 0:
        raise ValueError(f"{op}: weight has 0 rows (vocab size 0)")
    if hidden.dtype != weight.dtype:
        raise TypeError(f"{op}: hidden is {hidden.dtype} but weight is {weight.dtype}; cast one (autocast does)")
    if bias is not None:
        check_floating("bias", bias)
        if bias.shape != (weight.shape[0],) or bias.dtype != weight.dtype:
            raise ValueError(f"{op}: bias must be [{weight.shape[0]}] {weight.dtype}; got {tuple(bias.shape)} "
                             f"{bias.dtype}")
    devices = {t.device for t in (hidden, weight, bias) if t is not None}
    if len(devices) > 1:
        raise ValueError(f"{op}: tensors on different devices: {sorted(map(str, devices))}")


def resolve_chunk(chunk_size: int | None, n: int, hidden: torch.Tensor, vocab: int) -> int:
    if chunk_size is not None:
        if chunk_size <= 0:
            raise ValueError(f"chunk_size must be positive, got {chunk_size}")
        return min(int(chunk_size), n)
    return choose_chunk_size(n, hidden.shape[-1], vocab, hidden.dtype, hidden.device)


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    softcap: float | None = None,
    logit_scale: float | None = None,
    reduction: str = "mean",
    n_items: int | torch.Tensor | None = None,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Cross-entropy of ``hidden @ weight.T + bias`` without materializing the logits.

    Args:
        hidden: [..., H] fp32/bf16/fp16, the final hidden states (already aligned with ``labels``: the caller shifts).
        weight: [V, H], same dtype (lm_head weight or the tied embedding); under autocast both are cast to the
            autocast dtype, as F.linear does. Its gradient is computed only when it requires grad.
        labels: [...] integer, hidden's leading shape; values in [0, V) or ``ignore_index``.
        bias: optional [V].
        softcap, logit_scale: Gemma-2 softcap and Cohere/Granite scale (see cross_entropy).
        reduction: "mean" (non-ignored labels, or ``/ n_items``), "sum" (``/ n_items`` if given) or "none".
        n_items: target-token count across gradient-accumulation micro-batches (transformers' num_items_in_batch).
        chunk_size: tokens per chunk (default: :func:`choose_chunk_size`).
    Returns:
        fp32 scalar, or fp32 [...] for "none". "mean" with every label ignored is 0.0 with zero gradients.
    """
    hidden, weight, bias = autocast_inputs(hidden, weight, bias)
    check_linear_inputs("linear_cross_entropy", hidden, weight, bias)
    check_reduction(reduction)
    if tuple(labels.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(f"linear_cross_entropy: labels {tuple(labels.shape)} must have hidden's leading shape "
                         f"{tuple(hidden.shape[:-1])}")
    if labels.device != hidden.device:
        raise ValueError(f"linear_cross_entropy: labels on {labels.device} but hidden on {hidden.device}")
    fold_transform(softcap, logit_scale)
    if n_items is not None and reduction == "none":
        raise ValueError("n_items divides a summed loss; it has no meaning with reduction='none'")
    flat = check_labels("labels", labels.reshape(-1), weight.shape[0], ignore_index)
    h2 = hidden.reshape(-1, hidden.shape[-1])
    n = h2.shape[0]
    if n == 0:
        zero = hidden.float().sum() * 0.0 + weight.float().sum() * 0.0
        return hidden.new_zeros(labels.shape, dtype=torch.float32) if reduction == "none" else zero
    h2 = h2.contiguous()
    grad_on = torch.is_grad_enabled()
    need = [grad_on and t is not None and t.requires_grad for t in (hidden, weight, bias)]
    out = LinearCrossEntropyFunction.apply(
        h2, weight, bias, flat, n_items, int(ignore_index), softcap, logit_scale, reduction,
        resolve_chunk(chunk_size, n, h2, weight.shape[0]), *need,
    )
    return out.reshape(labels.shape) if reduction == "none" else out


def compile_cases() -> None:
    """The kernels this op launches are cross_entropy's (stats + in-place grad, entropy off), for every dtype and
    transform; run the chunk op so the gate sees the launches with contiguous chunk buffers."""
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for softcap, scale in ((None, None), (None, 0.5), (30.0, None)):
            h = torch.empty(5, 64, dtype=dtype)
            w = torch.empty(32001, 64, dtype=dtype)
            b = torch.empty(32001, dtype=dtype)
            labels = torch.zeros(5, dtype=torch.long)
            dloss = torch.ones(5)
            linear_cross_entropy_chunks(h, w, b, labels, dloss, None, -100, softcap, scale, 1.0, False,
                                        True, True, True, 4)
