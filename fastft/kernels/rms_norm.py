"""RMSNorm, fused: one pass over each row forward, one pass backward, for Llama-style and Gemma-style norms.

Shapes and dtypes
    x: [..., hidden] in fp32/bf16/fp16 (any leading shape, any hidden size up to 65,536); weight: [hidden].
    Output: Llama casting -> dtype of ``weight * x`` (torch promotion, usually x.dtype); Gemma -> x.dtype.

Numerics (matching Hugging Face bit-for-bit in the forward where the arithmetic allows it)
    Llama:  y = weight * to_input_dtype(x_f32 * rstd)   -- normalize in fp32, cast down, then multiply
    Gemma:  y = to_input_dtype(x_f32 * rstd * (1 + weight_f32))   -- all in fp32, one cast at the end
    with rstd = 1 / sqrt(mean(x_f32 ** 2) + eps). The product of two bf16 (or two fp16) values is exact in fp32, so
    doing the Llama multiply in fp32 and rounding once equals torch's bf16 multiply.

Saved for backward: x (the residual stream, which the model keeps alive anyway) and rstd, one fp32 per row. The
normalized activations are recomputed in the backward instead of being stored, which saves a [..., hidden] tensor per
norm.

Backward: with xn = x * rstd and g = dL/dxn (= dy * w, or dy * (1 + w) for Gemma),
    dx = rstd * (g - xn * mean(g * xn)),   dw = sum_rows(dy * xn)   (dw only when weight requires grad).
dw is reduced in two stages: each program accumulates its rows in fp32 into its own row of a small
[programs, hidden] buffer (no atomics, deterministic), then torch sums those rows.
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
    row_block,
    use_triton,
)

if TRITON_AVAILABLE:
    import triton
    import triton.language as tl

    # Every fp32 -> bf16 rounding goes through cast_rne: the interpreter truncates a plain ``.to(tl.bfloat16)``
    # while a GPU rounds to nearest even, so with it an interpreter bit-parity test also means GPU bit parity.
    from fastft.kernels._tl_utils import cast_rne

    @triton.jit
    def _rms_norm_forward_kernel(
        Y,
        X,
        W,
        RSTD,
        stride_y,
        stride_x,
        n_rows,
        n_cols,
        eps,
        GEMMA: tl.constexpr,
        BLOCK: tl.constexpr,
        ROWS: tl.constexpr,
    ):
        # A [ROWS, BLOCK] tile: several short rows per program keeps small hidden sizes from leaving most lanes idle
        # (and is what makes the interpreter fast enough for model-level tests).
        rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
        cols = tl.arange(0, BLOCK)
        row_mask = rows < n_rows
        mask = row_mask[:, None] & (cols < n_cols)[None, :]
        x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0)
        x32 = x.to(tl.float32)
        w = tl.load(W + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
        mean_sq = tl.sum(x32 * x32, axis=1) / n_cols
        rstd = 1.0 / tl.sqrt(mean_sq + eps)
        xn = x32 * rstd[:, None]
        if GEMMA:
            y = xn * (1.0 + w[None, :])
        else:
            # Llama: round the normalized value to the input dtype before the weight multiply, as HF does.
            y = cast_rne(xn, x.dtype).to(tl.float32) * w[None, :]
        tl.store(Y + rows[:, None] * stride_y + cols[None, :], cast_rne(y, Y.dtype.element_ty), mask=mask)
        tl.store(RSTD + rows, rstd, mask=row_mask)

    @triton.jit
    def _rms_norm_backward_kernel(
        DX,
        DW_PARTIAL,
        DY,
        X,
        W,
        RSTD,
        stride_dx,
        stride_dy,
        stride_x,
        n_rows,
        n_cols,
        rows_per_program,
        GEMMA: tl.constexpr,
        COMPUTE_DW: tl.constexpr,
        BLOCK: tl.constexpr,
        ROWS: tl.constexpr,
    ):
        pid = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        col_mask = cols < n_cols
        w = tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32)
        if GEMMA:
            w = w + 1.0
        dw_acc = tl.zeros((BLOCK,), dtype=tl.float32)
        row_start = pid * rows_per_program
        row_end = tl.minimum(row_start + rows_per_program, n_rows)
        # The row indices live in a tensor advanced by ROWS per iteration rather than being derived from the loop
        # variable: offsets stay int64, and the interpreter hands loop variables over as plain Python ints.
        rows = row_start.to(tl.int64) + tl.arange(0, ROWS)
        for _ in range(row_start, row_end, ROWS):
            row_mask = rows < row_end
            mask = row_mask[:, None] & col_mask[None, :]
            x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0)
            dy = tl.load(DY + rows[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            rstd = tl.load(RSTD + rows, mask=row_mask, other=0.0)
            xn = x.to(tl.float32) * rstd[:, None]
            g = dy * w[None, :]
            dx = rstd[:, None] * (g - xn * (tl.sum(g * xn, axis=1) / n_cols)[:, None])
            tl.store(DX + rows[:, None] * stride_dx + cols[None, :], cast_rne(dx, DX.dtype.element_ty), mask=mask)
            if COMPUTE_DW:
                if GEMMA:
                    dw_acc += tl.sum(dy * xn, axis=0)
                else:
                    dw_acc += tl.sum(dy * cast_rne(xn, x.dtype).to(tl.float32), axis=0)
            rows += ROWS
        if COMPUTE_DW:
            tl.store(DW_PARTIAL + pid * n_cols + cols, dw_acc, mask=col_mask)


# ----------------------------------------------------------------------------------------------------------------
# Reference: the plain math, differentiable by autograd. The test oracle and (via the functions below) the CPU path.
# ----------------------------------------------------------------------------------------------------------------
def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, gemma: bool = False) -> torch.Tensor:
    """Hugging Face's LlamaRMSNorm (``gemma=False``) or GemmaRMSNorm (``gemma=True``) forward, verbatim math."""
    x32 = x.to(torch.float32)
    xn = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    if gemma:
        return (xn * (1.0 + weight.float())).type_as(x)
    return weight * xn.to(x.dtype)


def _output_dtype(x: torch.Tensor, weight: torch.Tensor, gemma: bool) -> torch.dtype:
    return x.dtype if gemma else torch.promote_types(x.dtype, weight.dtype)


def _forward_torch(x2: torch.Tensor, weight: torch.Tensor, eps: float, gemma: bool) -> tuple[torch.Tensor, torch.Tensor]:
    x32 = x2.to(torch.float32)
    rstd = torch.rsqrt(x32.pow(2).mean(-1) + eps)
    return _scaled(x32 * rstd[:, None], x2.dtype, weight, gemma), rstd


def _scaled(xn: torch.Tensor, dtype: torch.dtype, weight: torch.Tensor, gemma: bool) -> torch.Tensor:
    """The normalized fp32 rows times the weight, cast as the module casts (x's dtype ``dtype``)."""
    if gemma:
        return (xn * (1.0 + weight.float())).to(dtype)
    if dtype == torch.float32 and weight.dtype == torch.float32:
        return xn * weight  # the line below with its casts all no-ops: the same product, fewer calls
    return (xn.to(dtype).float() * weight.float()).to(torch.promote_types(dtype, weight.dtype))  # _output_dtype's


def _normed_torch(x: torch.Tensor, weight: torch.Tensor, eps: float, gemma: bool) -> torch.Tensor:
    """``_forward_torch``'s y on x as it is shaped (no row view, no rstd): the no-grad eager path, same ops, same
    bits (each row's mean is the same reduction of the same values)."""
    x32 = x.to(torch.float32)
    return _scaled(x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps), x.dtype, weight, gemma)


def _backward_torch(
    dy: torch.Tensor, x2: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor, gemma: bool, compute_dw: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    xn = x2.float() * rstd[:, None]
    w = weight.float() + 1.0 if gemma else weight.float()
    dy32 = dy.float()
    g = dy32 * w
    dx = rstd[:, None] * (g - xn * (g * xn).mean(-1, keepdim=True))
    if compute_dw:
        xn_w = xn if gemma else xn.to(x2.dtype).float()
        dw = (dy32 * xn_w).sum(0).to(weight.dtype)
    else:
        dw = weight.new_empty(0)
    return dx.to(x2.dtype), dw


# ----------------------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------------------
def _forward_triton(x2: torch.Tensor, weight: torch.Tensor, eps: float, gemma: bool) -> tuple[torch.Tensor, torch.Tensor]:
    n_rows, n_cols = x2.shape
    y = torch.empty((n_rows, n_cols), dtype=_output_dtype(x2, weight, gemma), device=x2.device)
    rstd = torch.empty(n_rows, dtype=torch.float32, device=x2.device)
    block, num_warps = row_block(n_cols)
    rows = _rows_per_tile(block)
    launch(
        _rms_norm_forward_kernel,
        (triton.cdiv(n_rows, rows),),
        y,
        x2,
        weight,
        rstd,
        y.stride(0),
        x2.stride(0),
        n_rows,
        n_cols,
        float(eps),
        GEMMA=gemma,
        BLOCK=block,
        ROWS=rows,
        num_warps=num_warps,
    )
    return y, rstd


def _rows_per_tile(block: int) -> int:
    """Rows per [ROWS, BLOCK] tile: up to 16 short rows, one row once a row alone fills 2,048 lanes."""
    return max(1, min(16, 2048 // block))


def _backward_programs(n_rows: int, device: torch.device) -> int:
    if device.type == "cuda":
        # One program per SM keeps the dw buffer small while every SM stays busy.
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        return max(1, min(n_rows, sms))
    return max(1, min(n_rows, 4))  # interpreter: few programs, few Python-level iterations


def _backward_triton(
    dy: torch.Tensor, x2: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor, gemma: bool, compute_dw: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    n_rows, n_cols = x2.shape
    dy = dy if dy.stride(-1) == 1 else dy.contiguous()
    dx = torch.empty_like(x2)
    programs = _backward_programs(n_rows, x2.device)
    rows_per_program = -(-n_rows // programs)
    dw_partial = torch.empty((programs, n_cols) if compute_dw else (1,), dtype=torch.float32, device=x2.device)
    block, num_warps = row_block(n_cols)
    launch(
        _rms_norm_backward_kernel,
        (programs,),
        dx,
        dw_partial,
        dy,
        x2,
        weight,
        rstd,
        dx.stride(0),
        dy.stride(0),
        x2.stride(0),
        n_rows,
        n_cols,
        rows_per_program,
        GEMMA=gemma,
        COMPUTE_DW=compute_dw,
        BLOCK=block,
        ROWS=_rows_per_tile(block),
        num_warps=num_warps,
    )
    dw = dw_partial.sum(0).to(weight.dtype) if compute_dw else weight.new_empty(0)
    return dx, dw


# ----------------------------------------------------------------------------------------------------------------
# Custom ops (with fake impls, so torch.compile and the meta-tensor memory model can trace them) and autograd
# ----------------------------------------------------------------------------------------------------------------
def _as_rows(x: torch.Tensor) -> torch.Tensor:
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


@torch.library.custom_op("fastft::rms_norm_forward", mutates_args=())
def rms_norm_forward(x: torch.Tensor, weight: torch.Tensor, eps: float, gemma: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """y [..., hidden] and rstd [prod(leading)] fp32."""
    x2 = _as_rows(x)
    if x2.shape[0] == 0:
        return x.new_empty(x.shape, dtype=_output_dtype(x, weight, gemma)), x.new_empty(0, dtype=torch.float32)
    if use_triton("rms_norm", x2):
        y, rstd = _forward_triton(x2, weight, eps, gemma)
    else:
        y, rstd = _forward_torch(x2, weight, eps, gemma)
    return y.view(x.shape), rstd


@rms_norm_forward.register_fake
def _(x, weight, eps, gemma):
    n_rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    return x.new_empty(x.shape, dtype=_output_dtype(x, weight, gemma)), x.new_empty(n_rows, dtype=torch.float32)


@torch.library.custom_op("fastft::rms_norm_backward", mutates_args=())
def rms_norm_backward(
    dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor, gemma: bool, compute_dw: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """dx [..., hidden] in x.dtype and dw [hidden] in weight.dtype (empty when ``compute_dw`` is False)."""
    x2 = _as_rows(x)
    if x2.shape[0] == 0:
        return torch.empty_like(x), (torch.zeros_like(weight) if compute_dw else weight.new_empty(0))
    dy2 = dy.reshape(x2.shape)
    if use_triton("rms_norm_backward", x2):
        dx, dw = _backward_triton(dy2, x2, weight, rstd, gemma, compute_dw)
    else:
        dx, dw = _backward_torch(dy2, x2, weight, rstd, gemma, compute_dw)
    return dx.view(x.shape), dw


@rms_norm_backward.register_fake
def _(dy, x, weight, rstd, gemma, compute_dw):
    return torch.empty_like(x), (torch.empty_like(weight) if compute_dw else weight.new_empty(0))


class RMSNormFunction(torch.autograd.Function):
    """Autograd glue: saves x and rstd, calls the backward op; dweight only when weight requires grad."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float, gemma: bool) -> torch.Tensor:
        y, rstd = call_op(rms_norm_forward, x, weight, eps, gemma)
        ctx.save_for_backward(x, weight, rstd)
        ctx.gemma = gemma
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x, weight, rstd = ctx.saved_tensors
        compute_dw = ctx.needs_input_grad[1]
        dx, dw = call_op(rms_norm_backward, dy, x, weight, rstd, ctx.gemma, compute_dw)
        return dx, (dw if compute_dw else None), None, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, *, gemma: bool = False) -> torch.Tensor:
    """Fused RMSNorm.

    Args:
        x: [..., hidden], fp32/bf16/fp16.
        weight: [hidden], floating.
        eps: added to the mean square before the reciprocal square root.
        gemma: Gemma's ``(1 + weight)`` scaling computed in fp32 (else Llama casting, see the module docstring).
    Returns:
        [..., hidden]; dtype as ``weight * x`` for Llama casting, x.dtype for Gemma.
    """
    check_floating("x", x)
    check_floating("weight", weight)
    if weight.dim() != 1 or x.dim() == 0 or x.shape[-1] != weight.shape[0]:
        raise ValueError(
            f"rms_norm: weight must be 1-D with x.shape[-1] elements; got x {tuple(x.shape)}, weight {tuple(weight.shape)}"
        )
    if x.device != weight.device:
        raise ValueError(f"rms_norm: x on {x.device} but weight on {weight.device}")
    if x.numel() == 0:
        return x.new_empty(x.shape, dtype=_output_dtype(x, weight, gemma))
    if not needs_grad(x, weight):  # no graph to record (generation, eval): the forward alone, same bits
        if direct_call_ok(x, weight):  # eager plain tensors: the op's body without the op (decoding's ~1-row calls)
            if use_triton("rms_norm", x):
                return _forward_triton(_as_rows(x), weight, float(eps), bool(gemma))[0].view(x.shape)
            return _normed_torch(x, weight, float(eps), bool(gemma))
        return call_op(rms_norm_forward, x, weight, float(eps), bool(gemma))[0]
    return RMSNormFunction.apply(x, weight, float(eps), bool(gemma))


def compile_cases() -> None:
    """Every launch variant the code can make (dtypes x Llama/Gemma x dweight or not), for the compile gate."""
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for gemma in (False, True):
            for hidden in (128, 1000, 4096):  # 16, 2 and 1 rows per tile
                x = torch.empty(5, hidden, dtype=dtype)
                w = torch.empty(hidden, dtype=dtype)
                y, rstd = rms_norm_forward(x, w, 1e-6, gemma)
                for compute_dw in (False, True):
                    rms_norm_backward(y, x, w, rstd, gemma, compute_dw)
    # fp32 weight with a half-precision input (mixed-precision training keeps norms in fp32)
    x = torch.empty(5, 1000, dtype=torch.bfloat16)
    w = torch.empty(1000, dtype=torch.float32)
    y, rstd = rms_norm_forward(x, w, 1e-6, False)
    rms_norm_backward(y, x, w, rstd, False, True)
