"""rms_norm and apply_rope without grad on plain eager tensors (generation, eval) skip the custom op and compute the
op's torch-path values in place: the result must be the dispatched op's, bit for bit, for every dtype, Gemma
scaling, a non-contiguous input and 2-D cos/sin, and each call counted once on the path it took."""

from __future__ import annotations

import pytest
import torch

from fastft.kernels import apply_rope, rms_norm
from fastft.kernels._launch import force_path, path_counts

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fp32_weight", [False, True])
@pytest.mark.parametrize("gemma", [False, True])
def test_rms_norm_no_grad_equals_the_op(dtype, fp32_weight, gemma):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(5, 3, 200, generator=g).to(dtype)
    w = torch.randn(200, generator=g).to(torch.float32 if fp32_weight else dtype)
    for xx in (x, x.transpose(0, 1), x[:, :1]):  # contiguous, transposed, one decoding position
        with force_path("torch"), torch.no_grad():
            before = path_counts.copy()
            got = rms_norm(xx, w, 1e-6, gemma=gemma)
            assert (path_counts - before)[("rms_norm", "torch")] == 1
            ref = torch.ops.fastft.rms_norm_forward(xx, w, 1e-6, gemma)[0]  # the dispatcher's route, same path
        assert got.dtype == ref.dtype and got.shape == ref.shape
        assert torch.equal(got, ref)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cos_fp32", [False, True])
@pytest.mark.parametrize("cos_2d", [False, True])
def test_rope_no_grad_equals_the_op(dtype, cos_fp32, cos_2d):
    g = torch.Generator().manual_seed(2)
    q = torch.randn(2, 7, 4, 32, generator=g).to(dtype).transpose(1, 2)  # [b, h, s, d] view of a [b, s, h, d] buffer
    k = torch.randn(2, 2, 7, 32, generator=g).to(dtype)
    cdt = torch.float32 if cos_fp32 else dtype
    cos, sin = (torch.randn(1 if cos_2d else 2, 7, 32, generator=g).to(cdt) for _ in range(2))
    if cos_2d:
        cos, sin = cos[0], sin[0]
    with force_path("torch"), torch.no_grad():
        before = path_counts.copy()
        got = apply_rope(q, k, cos, sin)
        assert (path_counts - before)[("rope", "torch")] == 1
        ref = torch.ops.fastft.rope_forward(q, k, cos, sin)  # the dispatcher's route, same path
    for a, b in zip(got, ref, strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert torch.equal(a, b)
