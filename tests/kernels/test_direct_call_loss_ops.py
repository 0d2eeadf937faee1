"""The loss-head and MoE ops (cross_entropy, linear_cross_entropy / selective_log_softmax's chunk op, grouped_gemm)
take ``call_op``'s eager route like rms_norm: plain eager tensors run the op's body without the torch.library
dispatcher, with the same bits (loss and gradients) as the dispatched op; a dispatch mode still sees the custom op."""

from __future__ import annotations

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from fastft.kernels import cross_entropy, linear_cross_entropy, selective_log_softmax
from fastft.kernels._launch import force_path
from fastft.kernels.grouped_gemm import grouped_gemm
from tests.op_recorder import OpRecorder


def _cases():
    g = torch.Generator().manual_seed(0)
    h, w = torch.randn(12, 16, generator=g), torch.randn(40, 16, generator=g)
    labels = torch.randint(0, 40, (12,), generator=g)
    labels[3] = -100
    xg, wg = torch.randn(9, 8, generator=g), torch.randn(3, 6, 8, generator=g)
    offsets = torch.tensor([0, 4, 4, 9])
    return {
        "cross_entropy": ("fastft.cross_entropy_", (h @ w.T,), lambda z: cross_entropy(z, labels, label_smoothing=0.1)),
        "linear_cross_entropy": (
            "fastft.linear_cross_entropy_chunks",
            (h, w),
            lambda a, b: linear_cross_entropy(a, b, labels, softcap=5.0),
        ),
        "selective_log_softmax": (
            "fastft.linear_cross_entropy_chunks",
            (h.view(3, 4, 16), w),
            lambda a, b: selective_log_softmax(a, b, labels.clamp(min=0).view(3, 4)).sum(),
        ),
        "grouped_gemm": ("fastft.grouped_gemm_", (xg, wg), lambda a, b: grouped_gemm(a, b, offsets).square().sum()),
    }


def _run(fn, inputs):
    leaves = [t.clone().requires_grad_(True) for t in inputs]
    loss = fn(*leaves)
    loss.backward()
    return loss.detach(), [t.grad for t in leaves]


@pytest.mark.parametrize("path", ["torch", "triton"])
@pytest.mark.parametrize("case", ["cross_entropy", "linear_cross_entropy", "selective_log_softmax", "grouped_gemm"])
def test_eager_route_skips_the_dispatcher_with_the_same_bits(case, path):
    op_name, inputs, fn = _cases()[case]
    with force_path(path):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            loss, grads = _run(fn, inputs)
        with OpRecorder() as mode:  # while it is active call_op must take the dispatcher
            ref_loss, ref_grads = _run(fn, inputs)
    dispatched = [e.key for e in prof.key_averages() if "fastft::" in e.key]
    assert dispatched == [], f"eager call went through the dispatcher: {dispatched}"
    assert any(op_name in op for op in mode.ops), mode.ops  # the dispatch mode still sees the custom op
    assert torch.equal(loss, ref_loss)
    for got, ref in zip(grads, ref_grads, strict=True):
        assert torch.equal(got, ref)
