"""Grouped GEMM for mixture-of-experts: rows sorted by expert, one launch multiplies every group by its own expert.

Math
    x: [M, K] rows grouped by expert (group e is rows offsets[e]:offsets[e+1]); w: [E, N, K] stacked expert weights
    (the layout of transformers' ``gate_up_proj`` / ``down_proj`` in qwen3_moe and mixtral). ``transpose_w=True``
    takes w as [E, K, N] (gpt_oss's layout) through its strides, no copy.
        y[rows of e] = x[rows of e] @ w[e]^T                       (y: [M, N] in x.dtype)
    Backward:
        dx[rows of e] = dy[rows of e] @ w[e]                       (the same kernel, w's strides swapped)
        dw[e]         = dy[rows of e]^T @ x[rows of e]             (one program per (e, N tile, K tile); experts
                                                                    with zero rows get a zero gradient)

Shapes and dtypes
    x and w share a dtype (fp32/bf16/fp16); offsets is int64 [E + 1], offsets[0] = 0, non-decreasing, offsets[E] = M.
    Products accumulate in fp32 (``tl.dot``; ``allow_tf32=False`` so fp32 matches the torch reference), the output is
    rounded once to x.dtype.

Saved for backward: x and w (which the caller keeps anyway: x is the gathered input, w a parameter), and offsets.

Forward tiling: the host splits each group into BLOCK_M row tiles and writes a tile -> (expert, first row) table,
so a program never straddles two experts and empty experts cost nothing; grid = (tiles, N tiles).
"""

from __future__ import annotations

import torch

from fastft.kernels import _launch
from fastft.kernels._launch import INTERPRETER, TRITON_AVAILABLE, call_op, check_floating, launch, use_triton

if TRITON_AVAILABLE:
    import triton
    import triton.language as tl

    from fastft.kernels._tl_utils import cast_rne  # the interpreter truncates fp32 -> bf16; GPUs round to nearest

    @triton.jit
    def _grouped_gemm_kernel(
        X, W, Y, TileExpert, TileRow, Offsets,
        N, K,
        stride_xm, stride_we, stride_wn, stride_wk, stride_ym,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, UPCAST: tl.constexpr,
    ):  # fmt: skip
        tile = tl.program_id(0)
        pid_n = tl.program_id(1)
        expert = tl.load(TileExpert + tile)
        row0 = tl.load(TileRow + tile)
        row_end = tl.load(Offsets + expert + 1)
        rows = row0 + tl.arange(0, BLOCK_M)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        ks = tl.arange(0, BLOCK_K)
        row_mask = rows < row_end
        col_mask = cols < N
        x_ptrs = X + rows[:, None] * stride_xm + ks[None, :]
        w_ptrs = W + expert * stride_we + cols[None, :] * stride_wn + ks[:, None] * stride_wk
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k_mask = (k0 + ks) < K
            xt = tl.load(x_ptrs, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
            wt = tl.load(w_ptrs, mask=k_mask[:, None] & col_mask[None, :], other=0.0)
            if UPCAST:
                xt = xt.to(tl.float32)
                wt = wt.to(tl.float32)
            acc += tl.dot(xt, wt, allow_tf32=False)
            x_ptrs += BLOCK_K
            w_ptrs += BLOCK_K * stride_wk
        y_ptrs = Y + rows[:, None] * stride_ym + cols[None, :]
        tl.store(y_ptrs, cast_rne(acc, Y.dtype.element_ty), mask=row_mask[:, None] & col_mask[None, :])

    @triton.jit
    def _grouped_gemm_dw_kernel(
        DY, X, DW, Offsets,
        N, K,
        stride_dym, stride_xm, stride_dwe, stride_dwn,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, UPCAST: tl.constexpr,
    ):  # fmt: skip
        expert = tl.program_id(0)
        pid_n = tl.program_id(1)
        pid_k = tl.program_id(2)
        start = tl.load(Offsets + expert)
        end = tl.load(Offsets + expert + 1)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        ks = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
        ms = tl.arange(0, BLOCK_M)
        col_mask = cols < N
        k_mask = ks < K
        dy_ptrs = DY + (start + ms)[None, :] * stride_dym + cols[:, None]
        x_ptrs = X + (start + ms)[:, None] * stride_xm + ks[None, :]
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        for m0 in range(0, end - start, BLOCK_M):
            m_mask = (start + m0 + ms) < end
            dyt = tl.load(dy_ptrs, mask=col_mask[:, None] & m_mask[None, :], other=0.0)
            xt = tl.load(x_ptrs, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
            if UPCAST:
                dyt = dyt.to(tl.float32)
                xt = xt.to(tl.float32)
            acc += tl.dot(dyt, xt, allow_tf32=False)
            dy_ptrs += BLOCK_M * stride_dym
            x_ptrs += BLOCK_M * stride_xm
        dw_ptrs = DW + expert * stride_dwe + cols[:, None] * stride_dwn + ks[None, :]
        tl.store(dw_ptrs, cast_rne(acc, DW.dtype.element_ty), mask=col_mask[:, None] & k_mask[None, :])


# ----------------------------------------------------------------------------------------------------------------
# Torch reference (the oracle) and the torch path
# ----------------------------------------------------------------------------------------------------------------
def grouped_gemm_reference(
    x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor, transpose_w: bool = False
) -> torch.Tensor:
    """Plain loop over experts, differentiable: y[rows of e] = x[rows of e] @ w[e]^T ([E,K,N] w when transposed)."""
    outs = []
    bounds = offsets.tolist()
    for e in range(w.shape[0]):
        we = w[e] if transpose_w else w[e].t()
        outs.append(x[bounds[e] : bounds[e + 1]] @ we)
    return torch.cat(outs, dim=0)


def _forward_torch(x, w, offsets, transpose_w, y):
    bounds = offsets.tolist()
    for e in range(w.shape[0]):
        s, t = bounds[e], bounds[e + 1]
        if t > s:
            we = w[e] if transpose_w else w[e].t()
            y[s:t] = (x[s:t].float() @ we.float()).to(y.dtype)


def _dw_torch(dy, x, offsets, transpose_w, dw):
    bounds = offsets.tolist()
    for e in range(dw.shape[0]):
        s, t = bounds[e], bounds[e + 1]
        g = dy[s:t].float().t() @ x[s:t].float()  # [N, K]
        dw[e] = (g.t() if transpose_w else g).to(dw.dtype)


# ----------------------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------------------
def _blocks(m: int, n: int, k: int) -> tuple[int, int, int]:
    # tl.dot needs every block >= 16. BLOCK_K stays <= 32: a 64x64x64 tile on 4 warps spilled (sm_75 bf16: 8.7 KB,
    # sm_80 fp32: 1.8 KB, measured by the compile gate); 64x64x32 on 8 warps (see _warps) compiles without spills.
    def pick(size: int, cap: int) -> int:
        return 16 if size <= 16 else 32 if size <= 32 or cap == 32 else 64

    return pick(m, 64), pick(n, 64), pick(k, 32)


def _warps(block_a: int, block_b: int) -> int:
    return 8 if block_a * block_b >= 4096 else 4


def _upcast(t: torch.Tensor) -> bool:
    """bf16 tiles go to tl.dot as fp32 only when the interpreter really runs the launch: its numpy dot returns
    garbage for bf16 (measured: 3e10 error), while bf16 products are exact in fp32, so the upcast changes nothing but
    speed. The compile gate (a launch hook) and GPUs get the native bf16 dot."""
    return INTERPRETER and _launch._launch_hook is None and t.dtype == torch.bfloat16 and not t.is_cuda


def _tile_table(offsets: torch.Tensor, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """tile -> (expert, first row): each group split into block_m row tiles, empty groups get none."""
    counts = (offsets[1:] - offsets[:-1]).cpu()
    tiles = (counts + block_m - 1) // block_m
    expert = torch.repeat_interleave(torch.arange(counts.numel()), tiles)
    first_tile = torch.cumsum(tiles, 0) - tiles
    local = torch.arange(expert.numel()) - first_tile[expert]
    row = offsets.cpu()[:-1][expert] + local * block_m
    return expert.to(offsets.device), row.to(offsets.device)


def _w_strides(w: torch.Tensor, transpose_w: bool) -> tuple[int, int, int]:
    """(expert, n, k) strides of w read as [E, N, K]."""
    if transpose_w:
        return w.stride(0), w.stride(2), w.stride(1)
    return w.stride(0), w.stride(1), w.stride(2)


def _forward_triton(x, w, offsets, transpose_w, y, w_strides=None):
    m, k = x.shape
    n = y.shape[1]
    bm, bn, bk = _blocks(m, n, k)
    tile_expert, tile_row = _tile_table(offsets, bm)
    if tile_expert.numel() == 0:
        return
    swe, swn, swk = w_strides if w_strides is not None else _w_strides(w, transpose_w)
    grid = (tile_expert.numel(), triton.cdiv(n, bn))
    launch(
        _grouped_gemm_kernel, grid, x, w, y, tile_expert, tile_row, offsets, n, k,
        x.stride(0), swe, swn, swk, y.stride(0),
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, UPCAST=_upcast(x), num_warps=_warps(bm, bn),
    )  # fmt: skip


def _dw_triton(dy, x, offsets, transpose_w, dw):
    n, k = dy.shape[1], x.shape[1]
    bm, bn, bk = 32, *_blocks(1, n, k)[1:]
    if transpose_w:  # the kernel writes [E, N, K] tiles: stage them, then transpose once into gpt_oss's [E, K, N]
        stage = torch.empty(dw.shape[0], n, k, dtype=dw.dtype, device=dw.device)
        _dw_launch(dy, x, offsets, stage, n, k, bm, bn, bk)
        dw.copy_(stage.transpose(1, 2))
        return
    _dw_launch(dy, x, offsets, dw, n, k, bm, bn, bk)


def _dw_launch(dy, x, offsets, dw, n, k, bm, bn, bk):
    grid = (dw.shape[0], triton.cdiv(n, bn), triton.cdiv(k, bk))
    launch(
        _grouped_gemm_dw_kernel, grid, dy, x, dw, offsets, n, k,
        dy.stride(0), x.stride(0), dw.stride(0), dw.stride(1),
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, UPCAST=_upcast(x), num_warps=_warps(bn, bk),
    )  # fmt: skip


# ----------------------------------------------------------------------------------------------------------------
# Custom ops
# ----------------------------------------------------------------------------------------------------------------
def _check(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor, transpose_w: bool) -> tuple[int, int]:
    check_floating("grouped_gemm x", x)
    check_floating("grouped_gemm w", w)
    if x.dim() != 2 or w.dim() != 3:
        raise ValueError(f"grouped_gemm: x must be [M, K] and w [E, N, K], got x {tuple(x.shape)}, w {tuple(w.shape)}")
    if x.dtype != w.dtype:
        raise TypeError(f"grouped_gemm: x and w must share a dtype, got {x.dtype} and {w.dtype}")
    n, k = (w.shape[2], w.shape[1]) if transpose_w else (w.shape[1], w.shape[2])
    if x.shape[1] != k:
        layout = "[E, K, N]" if transpose_w else "[E, N, K]"
        raise ValueError(f"grouped_gemm: x has K={x.shape[1]} but w {tuple(w.shape)} read as {layout} has K={k}")
    if offsets.dtype != torch.int64 or offsets.shape != (w.shape[0] + 1,):
        raise ValueError(f"grouped_gemm: offsets must be int64 [E + 1] = [{w.shape[0] + 1}], got "
                         f"{offsets.dtype} {tuple(offsets.shape)}")  # fmt: skip
    return n, k


@torch.library.custom_op("fastft::grouped_gemm_forward", mutates_args=())
def grouped_gemm_forward(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor, transpose_w: bool) -> torch.Tensor:
    """y [M, N] in x.dtype: each row group times its expert's weight (see the module docstring)."""
    n, _ = _check(x, w, offsets, transpose_w)
    x = x.contiguous()
    y = torch.zeros(x.shape[0], n, dtype=x.dtype, device=x.device)
    if x.shape[0] == 0:
        return y
    if use_triton("grouped_gemm", x, w):
        _forward_triton(x, w, offsets, transpose_w, y)
    else:
        _forward_torch(x, w, offsets, transpose_w, y)
    return y


@grouped_gemm_forward.register_fake
def _(x, w, offsets, transpose_w):
    n = w.shape[2] if transpose_w else w.shape[1]
    return x.new_empty(x.shape[0], n)


@torch.library.custom_op("fastft::grouped_gemm_backward", mutates_args=())
def grouped_gemm_backward(
    dy: torch.Tensor, x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor, transpose_w: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """(dx [M, K] in x.dtype, dw shaped like w in w.dtype)."""
    _check(x, w, offsets, transpose_w)
    dy, x = dy.contiguous(), x.contiguous()
    dx = torch.zeros_like(x)
    dw = torch.zeros(w.shape, dtype=w.dtype, device=w.device)
    if x.shape[0] == 0:
        return dx, dw
    if use_triton("grouped_gemm_backward", dy, x, w):
        # dx = dy @ w[e]: w read as [E, K, N] is w (as [E, N, K]) with its n/k strides swapped.
        swe, swn, swk = _w_strides(w, transpose_w)
        _forward_triton(dy, w, offsets, False, dx, w_strides=(swe, swk, swn))
        _dw_triton(dy, x, offsets, transpose_w, dw)
    else:
        _forward_torch(dy, w.transpose(1, 2), offsets, transpose_w, dx)
        _dw_torch(dy, x, offsets, transpose_w, dw)
    return dx, dw


@grouped_gemm_backward.register_fake
def _(dy, x, w, offsets, transpose_w):
    return x.new_empty(x.shape), w.new_empty(w.shape)


# ----------------------------------------------------------------------------------------------------------------
# Autograd and the public function
# ----------------------------------------------------------------------------------------------------------------
class GroupedGemmFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, offsets, transpose_w):
        ctx.save_for_backward(x, w, offsets)
        ctx.transpose_w = transpose_w
        return call_op(grouped_gemm_forward, x, w, offsets, transpose_w)

    @staticmethod
    def backward(ctx, dy):
        x, w, offsets = ctx.saved_tensors
        dx, dw = call_op(grouped_gemm_backward, dy, x, w, offsets, ctx.transpose_w)
        return (dx if ctx.needs_input_grad[0] else None), (dw if ctx.needs_input_grad[1] else None), None, None


def grouped_gemm(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor, *, transpose_w: bool = False) -> torch.Tensor:
    """Grouped GEMM over experts: ``y[offsets[e]:offsets[e+1]] = x[offsets[e]:offsets[e+1]] @ w[e]^T``.

    Args:
        x: [M, K] rows sorted by expert, fp32/bf16/fp16.
        w: [E, N, K] (``transpose_w=False``, qwen3_moe/mixtral) or [E, K, N] (``transpose_w=True``, gpt_oss),
            same dtype as x.
        offsets: int64 [E + 1], group boundaries (offsets[0] = 0, offsets[E] = M).
    Returns:
        y: [M, N] in x.dtype. Differentiable in x and w.
    """
    _check(x, w, offsets, transpose_w)
    if offsets.device.type != "meta" and (int(offsets[-1]) != x.shape[0] or int(offsets[0]) != 0):
        raise ValueError(f"grouped_gemm: offsets must run from 0 to M={x.shape[0]}, got {offsets.tolist()}")
    return GroupedGemmFunction.apply(x, w, offsets, bool(transpose_w))


def compile_cases() -> None:
    """Every launch variant: 3 dtypes x both weight layouts, forward and backward, small and large block sizes."""
    offsets = torch.tensor([0, 5, 5, 40], dtype=torch.int64)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for m, n, k in ((40, 24, 20), (40, 96, 80)):
            x = torch.empty(m, k, dtype=dtype)
            for transpose_w in (False, True):
                w = torch.empty((3, k, n) if transpose_w else (3, n, k), dtype=dtype)
                y = grouped_gemm_forward(x, w, offsets, transpose_w)
                grouped_gemm_backward(y, x, w, offsets, transpose_w)
