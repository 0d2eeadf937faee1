"""SwiGLU (fastft.kernels.glu, activation silu) vs ``F.silu(g) * u``, forward and backward, both paths.

The helpers (underscore names) are shared with test_geglu.py, which runs the same checks for the gelu activations.
"""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from fastft.kernels import force_path, path_counts, swiglu, swiglu_reference
from fastft.kernels.glu import swiglu_backward, swiglu_forward
from fastft.memory import LiveBytesTracker
from tests.tolerances import BACKWARD, FORWARD, assert_close

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SHAPES = [(3, 7, 2816), (5, 1000), (1, 1, 11008), (2, 3, 17), (13, 1025)]


def _inputs(shape, dtype, scale=3.0):
    gate = (torch.randn(shape) * scale).to(dtype)
    up = torch.randn(shape).to(dtype)
    return gate, up


def _run(fn, gate, up, dh, **kwargs):
    gate = gate.detach().requires_grad_()
    up = up.detach().requires_grad_()
    h = fn(gate, up, **kwargs)
    dgate, dup = torch.autograd.grad(h, (gate, up), dh)
    return h, dgate, dup


def _check_against_reference(fn, ref, gate, up, dtype, **kwargs):
    """fn vs ref evaluated in the input dtype (what eager HF computes), and vs ref in fp32 on the same inputs."""
    dh = torch.randn(gate.shape).to(dtype)
    h, dg, du = _run(fn, gate, up, dh, **kwargs)
    h_ref, dg_ref, du_ref = _run(ref, gate, up, dh, **kwargs)
    assert h.dtype == dtype and dg.dtype == dtype and du.dtype == dtype
    assert h.shape == gate.shape and dg.shape == gate.shape and du.shape == up.shape
    assert_close(h, h_ref, FORWARD, dtype, "forward vs eager")
    assert_close(dg, dg_ref, BACKWARD, dtype, "dgate vs eager")
    assert_close(du, du_ref, BACKWARD, dtype, "dup vs eager")
    # fp32 oracle on the same (rounded) inputs: our kernels compute in fp32 and round once, so they should sit
    # within one rounding of the output dtype of it -- tighter than the eager comparison above.
    h32, dg32, du32 = _run(ref, gate.float(), up.float(), dh.float(), **kwargs)
    assert_close(h, h32, FORWARD, dtype, "forward vs fp32")
    assert_close(dg, dg32, FORWARD, dtype, "dgate vs fp32")
    assert_close(du, du32, BACKWARD, dtype, "dup vs fp32")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_triton_matches_reference(shape, dtype):
    gate, up = _inputs(shape, dtype)
    before_f = path_counts[("swiglu", "triton")]
    before_b = path_counts[("swiglu_backward", "triton")]
    _check_against_reference(swiglu, swiglu_reference, gate, up, dtype)
    assert path_counts[("swiglu", "triton")] == before_f + 1, "the Triton forward did not run"
    assert path_counts[("swiglu_backward", "triton")] == before_b + 1, "the Triton backward did not run"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_torch_path_matches_reference(dtype):
    gate, up = _inputs((6, 7, 1000), dtype)
    with force_path("torch"):
        before = path_counts[("swiglu", "torch")], path_counts[("swiglu_backward", "torch")]
        _check_against_reference(swiglu, swiglu_reference, gate, up, dtype)
        assert (path_counts[("swiglu", "torch")], path_counts[("swiglu_backward", "torch")]) == (
            before[0] + 1,
            before[1] + 1,
        )


def test_torch_path_chunks_rows(monkeypatch):
    """The torch path walks row chunks (bounded fp32 temporaries); a tiny chunk forces several, incl. a ragged one."""
    from fastft.kernels import glu

    monkeypatch.setattr(glu, "_CHUNK_ELEMENTS", 300)
    gate, up = _inputs((11, 100), torch.float32)
    with force_path("torch"):
        _check_against_reference(swiglu, swiglu_reference, gate, up, torch.float32)


#: ops that only make views (no pass over the data)
_VIEW_OPS = {"aten.slice.Tensor", "aten.view.default", "aten.alias.default", "aten.as_strided.default"}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_torch_path_passes_over_the_data(dtype):
    """What the CPU torch path costs on small tensors is its number of passes: forward act(g) * u is two; backward
    is at most seven (fp32 dh * u, the rounded activation, dup, the fp32 gate, act' in one aten op, dgate's store)
    for every activation. The path that upcast every input and wrote act' out term by term made ~15 (the fused
    LoRA MLP was then ~30% slower than PEFT's under CPU bf16 autocast)."""
    from fastft.kernels import glu
    from fastft.kernels.activation import Activation
    from tests.op_recorder import OpRecorder

    gate, up = _inputs((8, 100), dtype)
    dh = torch.randn(8, 100).to(dtype)
    for act in Activation:
        with OpRecorder() as forward:
            glu._forward_torch(gate, up, act)
        dg, du = gate.clone(), up.clone()
        with OpRecorder() as backward:
            glu._backward_torch(dh, gate, up, act, dg, du)
        passes = [op for op in backward.ops if op not in _VIEW_OPS]
        limit = 9 if dtype == torch.float16 else 7  # fp16 computes the activation from an fp32 copy (2 more)
        assert len([op for op in forward.ops if op not in _VIEW_OPS]) <= (4 if dtype == torch.float16 else 2), forward.ops
        assert len(passes) <= limit, (act, passes)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_torch_path_in_place_over_chunks_matches_out_of_place(monkeypatch, dtype):
    """dgate/dup written over gate/up chunk by chunk (the in-place backward) equal the out-of-place ones."""
    from fastft.kernels import glu
    from fastft.kernels.activation import Activation

    monkeypatch.setattr(glu, "_CHUNK_ELEMENTS", 300)
    gate, up = _inputs((11, 100), dtype)
    dh = torch.randn(11, 100).to(dtype)
    for act in Activation:
        dg, du = torch.empty_like(gate), torch.empty_like(up)
        glu._backward_torch(dh, gate, up, act, dg, du)
        g, u = gate.clone(), up.clone()
        glu._backward_torch(dh, g, u, act, g, u)
        assert torch.equal(g, dg) and torch.equal(u, du), act


def test_forward_rounds_like_eager_in_bf16():
    """silu rounded to bf16 before the multiply, as eager does: agreement is within one bf16 ulp everywhere and
    exact for nearly all elements (a difference only where fp32 silu lands on a bf16 rounding boundary)."""
    gate, up = _inputs((64, 1000), torch.bfloat16)
    h = swiglu(gate, up).float()
    h_ref = swiglu_reference(gate, up).float()
    exact = (h == h_ref).float().mean().item()
    assert exact > 0.999, exact
    assert_close(h, h_ref, FORWARD, torch.bfloat16)


def test_halves_of_a_fused_projection_need_no_copy():
    """gate/up as the two halves of one [rows, 2n] tensor (row stride 2n), as with a fused gate_up projection."""
    fused = torch.randn(2, 9, 2 * 700)
    gate, up = fused.chunk(2, dim=-1)
    assert not gate.is_contiguous()
    _check_against_reference(swiglu, swiglu_reference, gate, up, torch.float32)


def test_ops_do_not_modify_inputs():
    gate, up = _inputs((4, 300), torch.float32)
    g0, u0 = gate.clone(), up.clone()
    h = torch.ops.fastft.swiglu_forward(gate, up)
    dg, du = torch.ops.fastft.swiglu_backward(torch.ones_like(h), gate, up)
    assert torch.equal(gate, g0) and torch.equal(up, u0)
    assert dg.data_ptr() != gate.data_ptr() and du.data_ptr() != up.data_ptr()
    # the Python names are the same ops
    assert torch.equal(swiglu_forward(gate, up), h)
    torch.testing.assert_close(swiglu_backward(torch.ones_like(h), gate, up)[0], dg)


def _inplace_case(fn, ref, dtype=torch.float32, **kwargs):
    """gate/up produced by matmuls (non-leaf temporaries, as in an MLP); returns grads of x and the gate buffer."""
    x = torch.randn(3, 5, 64).to(dtype)
    wg = (torch.randn(64, 301) * 0.3).to(dtype)
    wu = (torch.randn(64, 301) * 0.3).to(dtype)
    results = []
    for f, inplace in ((fn, True), (fn, False), (ref, None)):
        xx = x.clone().requires_grad_()
        gate, up = xx @ wg, xx @ wu
        h = f(gate, up, inplace_backward=inplace, **kwargs) if inplace is not None else f(gate, up, **kwargs)
        g_before = gate.detach().clone()
        h.backward(torch.ones_like(h))
        results.append((xx.grad, torch.equal(gate.detach(), g_before)))
    return results


def test_inplace_backward_writes_into_gate_and_up_and_matches():
    (dx_in, unchanged_in), (dx_out, unchanged_out), (dx_ref, _) = _inplace_case(swiglu, swiglu_reference)
    assert not unchanged_in, "in-place backward should have overwritten gate's buffer with dgate"
    assert unchanged_out, "the default backward must leave gate alone"
    torch.testing.assert_close(dx_in, dx_out, rtol=0, atol=0)
    assert_close(dx_in, dx_ref, BACKWARD, torch.float32)


def test_inplace_backward_overwrite_is_detected_by_autograd():
    """The op bumps gate's version: another node that saved gate raises instead of using dgate as gate."""
    x = torch.randn(4, 32, requires_grad=True)
    gate, up = x * 2, x * 3
    other = gate * gate  # saves gate; created first, so its backward runs after swiglu's
    h = swiglu(gate, up, inplace_backward=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (h.sum() + other.sum()).backward()
    # a retained graph cannot be re-run through the overwritten buffers either
    x2 = torch.randn(4, 32, requires_grad=True)
    h2 = swiglu(x2 * 2, x2 * 3, inplace_backward=True)
    h2.sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        h2.sum().backward()


def test_inplace_backward_falls_back_for_leaves_and_aliases():
    gate, up = _inputs((4, 100), torch.float32)
    g = gate.clone().requires_grad_()
    u = up.clone().requires_grad_()
    swiglu(g, u, inplace_backward=True).sum().backward()
    assert torch.equal(g.detach(), gate) and torch.equal(u.detach(), up), "leaf tensors must never be overwritten"
    # gate and up the same tensor: the gradients add up, so they cannot share one buffer
    x = torch.randn(4, 100, requires_grad=True)
    y = x * 1.5
    swiglu(y, y, inplace_backward=True).sum().backward()
    x_ref = x.detach().clone().requires_grad_()
    y_ref = x_ref * 1.5
    swiglu_reference(y_ref, y_ref).sum().backward()
    assert_close(x.grad, x_ref.grad, BACKWARD, torch.float32)


def test_inplace_backward_on_halves_of_one_tensor():
    """Disjoint halves of one buffer may both be overwritten (same storage, no overlap)."""
    x = torch.randn(6, 40, requires_grad=True)
    w = torch.randn(40, 2 * 90)
    gate, up = (x @ w).chunk(2, dim=-1)
    swiglu(gate, up, inplace_backward=True).sum().backward()
    x_ref = x.detach().clone().requires_grad_()
    g_ref, u_ref = (x_ref @ w).chunk(2, dim=-1)
    swiglu_reference(g_ref, u_ref).sum().backward()
    assert_close(x.grad, x_ref.grad, BACKWARD, torch.float32)


def test_inplace_op_torch_path_and_staging_copy():
    """The in-place op on the torch path, and on a tensor that cannot view as rows (copied, then written back)."""
    gate, up = _inputs((3, 4, 50), torch.float32)
    dh = torch.randn(3, 4, 50)
    dg_ref, du_ref = torch.ops.fastft.swiglu_backward(dh, gate, up)
    for path in ("torch", "triton"):
        g, u = gate.clone(), up.clone()
        with force_path(path):
            torch.ops.fastft.glu_backward_inplace(dh, g, u, "silu")
        torch.testing.assert_close(g, dg_ref, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(u, du_ref, rtol=1e-6, atol=1e-6)
    base_g, base_u = gate.transpose(0, 1).contiguous(), up.transpose(0, 1).contiguous()
    g, u = base_g.transpose(0, 1), base_u.transpose(0, 1)  # [3,4,50] views that do not flatten to rows
    torch.ops.fastft.glu_backward_inplace(dh, g, u, "silu")
    torch.testing.assert_close(g, dg_ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(u, du_ref, rtol=1e-6, atol=1e-6)


@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")  # exp(1e4) = inf, by design
def test_large_gate_values_stay_finite():
    gate = torch.tensor([[-1e4, -100.0, -30.0, 0.0, 30.0, 100.0, 1e4]])
    up = torch.ones_like(gate)
    h, dg, du = _run(swiglu, gate, up, torch.ones_like(gate))
    h_ref, dg_ref, du_ref = _run(swiglu_reference, gate, up, torch.ones_like(gate))
    assert torch.isfinite(h).all() and torch.isfinite(dg).all()
    torch.testing.assert_close(h, h_ref)
    torch.testing.assert_close(dg, dg_ref)


@settings(max_examples=25, deadline=None)
@given(
    rows=st.integers(1, 6),
    n=st.integers(1, 2100),
    dtype=st.sampled_from(DTYPES),
    scale=st.sampled_from([0.1, 1.0, 8.0]),
)
def test_fuzz_shapes_and_dtypes(rows, n, dtype, scale):
    gate, up = _inputs((rows, n), dtype, scale)
    _check_against_reference(swiglu, swiglu_reference, gate, up, dtype)


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="same shape"):
        swiglu(torch.randn(2, 8), torch.randn(2, 9))
    with pytest.raises(ValueError, match="same shape"):
        swiglu(torch.tensor(1.0), torch.tensor(2.0))
    with pytest.raises(TypeError, match="same dtype"):
        swiglu(torch.randn(2, 8), torch.randn(2, 8, dtype=torch.bfloat16))
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        swiglu(torch.ones(2, 8, dtype=torch.int64), torch.ones(2, 8, dtype=torch.int64))
    with pytest.raises(ValueError, match="activation"):
        torch.ops.fastft.glu_backward_inplace(torch.ones(2, 3), torch.ones(2, 3), torch.ones(2, 3), "relu")


def test_empty_input_returns_empty_without_launch():
    before = sum(path_counts.values())
    assert swiglu(torch.empty(0, 16), torch.empty(0, 16)).shape == (0, 16)
    assert swiglu(torch.empty(3, 0), torch.empty(3, 0)).shape == (3, 0)
    h = torch.ops.fastft.swiglu_forward(torch.empty(0, 5), torch.empty(0, 5))
    dg, du = torch.ops.fastft.swiglu_backward(h, torch.empty(0, 5), torch.empty(0, 5))
    assert h.shape == dg.shape == du.shape == (0, 5)
    assert sum(path_counts.values()) == before


def test_fake_impl_traces_on_meta_and_under_compile():
    gate = torch.empty(2, 3, 11008, device="meta", dtype=torch.bfloat16, requires_grad=True)
    up = torch.empty(2, 3, 11008, device="meta", dtype=torch.bfloat16, requires_grad=True)
    h = swiglu(gate, up, inplace_backward=True)  # leaves: never overwritten, the out-of-place fake runs
    h.sum().backward()
    assert h.shape == gate.shape and h.device.type == "meta" and h.dtype == torch.bfloat16
    assert gate.grad.shape == gate.shape and up.grad.shape == up.shape

    compiled = torch.compile(lambda a, b: swiglu(a, b) * 2, backend="aot_eager", fullgraph=True)
    a, b = torch.randn(3, 40), torch.randn(3, 40)
    torch.testing.assert_close(compiled(a, b), F.silu(a) * b * 2, rtol=1e-5, atol=1e-5)


def _mlp_memory(act, tokens=4096, hidden=4096, inter=14336):
    """Llama-3-8B MLP shapes on meta tensors (frozen weights): bytes live after the forward (saved activations +
    output) and the backward's peak, from fastft's live-bytes tracker."""
    dt = torch.bfloat16
    x = torch.empty(tokens, hidden, device="meta", dtype=dt, requires_grad=True)
    wg, wu = (torch.empty(hidden, inter, device="meta", dtype=dt) for _ in range(2))
    wd = torch.empty(inter, hidden, device="meta", dtype=dt)
    with LiveBytesTracker() as tracker:
        gate, up = x @ wg, x @ wu
        y = act(gate, up) @ wd
        del gate, up
        after_forward = tracker.live_bytes
        tracker.reset_peak()
        y.backward(torch.ones_like(y))
    return after_forward, tracker.peak_bytes, tokens * inter * 2


def test_memory_no_saved_activation_and_inplace_backward():
    eager_fwd, eager_bwd, unit = _mlp_memory(lambda g, u: F.silu(g) * u)
    fused_fwd, fused_bwd, _ = _mlp_memory(swiglu)
    inplace_fwd, inplace_bwd, _ = _mlp_memory(lambda g, u: swiglu(g, u, inplace_backward=True))
    assert eager_fwd - fused_fwd == unit, "the fused op saves gate and up only, not silu(gate)"
    assert inplace_fwd == fused_fwd
    assert fused_bwd - inplace_bwd == 2 * unit, "dgate/dup written over gate/up: two [tokens, inter] fewer"
    assert eager_bwd > fused_bwd


def test_opcheck_schema_and_fake_impls():
    """torch.library.opcheck: schemas (incl. the in-place op's mutation), fake impls vs real outputs, AOT dispatch."""
    gate, up, dh = torch.randn(3, 7, 50), torch.randn(3, 7, 50), torch.randn(3, 7, 50)
    calls = [
        (torch.ops.fastft.swiglu_forward, (gate, up)),
        (torch.ops.fastft.swiglu_backward, (dh, gate, up)),
        (torch.ops.fastft.geglu_forward, (gate, up, "tanh")),
        (torch.ops.fastft.geglu_backward, (dh, gate, up, "none")),
        (torch.ops.fastft.glu_backward_inplace, (dh, gate.clone(), up.clone(), "silu")),
    ]
    with force_path("torch"):  # the op plumbing is path-independent; the torch path keeps this quick
        for op, args in calls:
            torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))
