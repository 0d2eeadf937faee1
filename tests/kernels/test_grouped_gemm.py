"""Grouped GEMM (triton under the interpreter, and the torch path) vs the per-expert loop reference."""

import pytest
import torch

from fastft.kernels._launch import force_path, path_counts
from fastft.kernels.grouped_gemm import grouped_gemm, grouped_gemm_reference
from tests.tolerances import BACKWARD, FORWARD, assert_close

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (tokens per expert, N, K): uneven counts, experts with zero tokens (first, middle, last), odd sizes, > one tile
CASES = [([7, 0, 23, 3], 37, 20), ([0, 1, 0], 16, 16), ([40, 5, 0, 0, 71], 70, 90), ([1], 5, 3), ([17, 0], 64, 33)]


def _inputs(counts, n, k, dtype, transpose_w, seed=0):
    g = torch.Generator().manual_seed(seed)
    offsets = torch.zeros(len(counts) + 1, dtype=torch.int64)
    offsets[1:] = torch.cumsum(torch.tensor(counts), 0)
    x = torch.randn(int(offsets[-1]), k, generator=g).to(dtype)
    shape = (len(counts), k, n) if transpose_w else (len(counts), n, k)
    w = (torch.randn(shape, generator=g) / k**0.5).to(dtype)
    dy = torch.randn(int(offsets[-1]), n, generator=g).to(dtype)
    return x, w, offsets, dy


def _grads(fn, x, w, offsets, dy, transpose_w):
    x = x.clone().requires_grad_()
    w = w.clone().requires_grad_()
    y = fn(x, w, offsets, transpose_w)
    y.backward(dy)
    return y.detach(), x.grad, w.grad


@pytest.mark.parametrize("path", ["triton", "torch"])
@pytest.mark.parametrize("transpose_w", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("counts,n,k", CASES)
def test_matches_reference(counts, n, k, dtype, transpose_w, path):
    x, w, offsets, dy = _inputs(counts, n, k, dtype, transpose_w)
    path_counts.clear()
    with force_path(path):
        y, dx, dw = _grads(lambda *a: grouped_gemm(*a[:3], transpose_w=a[3]), x, w, offsets, dy, transpose_w)
    assert path_counts[("grouped_gemm", path)] == 1 and path_counts[("grouped_gemm_backward", path)] == 1
    # oracle in fp32 (the kernel accumulates in fp32 and rounds once)
    ry, rdx, rdw = _grads(grouped_gemm_reference, x.float(), w.float(), offsets, dy.float(), transpose_w)
    assert_close(y, ry, FORWARD, dtype, "y")
    assert_close(dx, rdx, BACKWARD, dtype, "dx")
    assert_close(dw, rdw, BACKWARD, dtype, "dw")
    empty = [e for e, c in enumerate(counts) if c == 0]
    if empty:
        assert dw[empty].abs().max() == 0
    assert dw.abs().max() > 0 and y.abs().max() > 0


def test_fake_impl_on_meta():
    x = torch.empty(10, 8, device="meta")
    w = torch.empty(3, 8, 6, device="meta")
    y = torch.ops.fastft.grouped_gemm_forward(x, w, torch.empty(4, dtype=torch.int64, device="meta"), True)
    assert y.shape == (10, 6) and y.device.type == "meta"


def test_bad_input_is_clear():
    x, w, offsets, _ = _inputs([3, 2], 4, 5, torch.float32, False)
    with pytest.raises(ValueError, match="K=5"):
        grouped_gemm(x, w, offsets, transpose_w=True)
    with pytest.raises(ValueError, match="offsets must be int64"):
        grouped_gemm(x, w, offsets.int())
    with pytest.raises(ValueError, match="run from 0 to M=5"):
        grouped_gemm(x, w, torch.tensor([0, 3, 4]))
    with pytest.raises(TypeError, match="share a dtype"):
        grouped_gemm(x, w.half(), offsets)
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        grouped_gemm(x.long(), w, offsets)
