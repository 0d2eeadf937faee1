"""GeGLU (fastft.kernels.glu, activation gelu exact or tanh) vs ``F.gelu(g, approximate) * u``, both paths."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from fastft.kernels import force_path, geglu, geglu_reference, path_counts
from fastft.kernels.glu import geglu_backward, geglu_forward
from tests.kernels.test_swiglu import DTYPES, SHAPES, _check_against_reference, _inplace_case, _inputs, _run
from tests.tolerances import BACKWARD, assert_close

APPROX = ["none", "tanh"]

# Large negative gates overflow exp() to inf on purpose (sigmoid -> 0); numpy, which runs the interpreter, warns.
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")


@pytest.mark.parametrize("approximate", APPROX)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_triton_matches_reference(shape, dtype, approximate):
    gate, up = _inputs(shape, dtype)
    before = path_counts[("geglu", "triton")], path_counts[("geglu_backward", "triton")]
    _check_against_reference(geglu, geglu_reference, gate, up, dtype, approximate=approximate)
    after = path_counts[("geglu", "triton")], path_counts[("geglu_backward", "triton")]
    assert after == (before[0] + 1, before[1] + 1), "the Triton kernels did not run"


@pytest.mark.parametrize("approximate", APPROX)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_torch_path_matches_reference(dtype, approximate):
    gate, up = _inputs((6, 7, 1000), dtype)
    with force_path("torch"):
        before = path_counts[("geglu", "torch")], path_counts[("geglu_backward", "torch")]
        _check_against_reference(geglu, geglu_reference, gate, up, dtype, approximate=approximate)
        after = path_counts[("geglu", "torch")], path_counts[("geglu_backward", "torch")]
        assert after == (before[0] + 1, before[1] + 1)


@pytest.mark.parametrize("approximate", APPROX)
def test_fp32_accuracy_against_float64(approximate):
    """erf (tl.math.erf) and the sigmoid form of tanh-gelu are accurate to a few fp32 ulps over a wide range."""
    gate = torch.linspace(-12, 12, 20001).reshape(3, -1)[:, :6000].contiguous()
    up = torch.ones_like(gate)
    dh = torch.ones_like(gate)
    h, dg, _ = _run(geglu, gate, up, dh, approximate=approximate)
    h64, dg64, _ = _run(geglu_reference, gate.double(), up.double(), dh.double(), approximate=approximate)
    # absolute error relative to max(1, |value|): ~1e-7 is fp32 rounding; Abramowitz-Stegun 7.1.26 (1.5e-7
    # absolute in erf) times |g| <= 12 would exceed the bound below.
    scale = h64.abs().clamp_min(1.0)
    assert ((h.double() - h64).abs() / scale).max() < 1e-6
    assert ((dg.double() - dg64).abs() / dg64.abs().clamp_min(1.0)).max() < 2e-6


def test_approximate_variants_differ_and_bad_value_raises():
    gate, up = _inputs((2, 300), torch.float32)
    assert not torch.allclose(geglu(gate, up, "none"), geglu(gate, up, "tanh"), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="approximate"):
        geglu(gate, up, "fast")
    with pytest.raises(ValueError, match="approximate"):
        torch.ops.fastft.geglu_forward(gate, up, "erf")


def test_ops_do_not_modify_inputs():
    gate, up = _inputs((4, 300), torch.bfloat16)
    g0, u0 = gate.clone(), up.clone()
    for approximate in APPROX:
        h = torch.ops.fastft.geglu_forward(gate, up, approximate)
        dg, du = torch.ops.fastft.geglu_backward(torch.ones_like(h), gate, up, approximate)
        assert torch.equal(gate, g0) and torch.equal(up, u0)
        assert torch.equal(geglu_forward(gate, up, approximate), h)
        assert torch.equal(geglu_backward(torch.ones_like(h), gate, up, approximate)[1], du)


@pytest.mark.parametrize("approximate", APPROX)
def test_inplace_backward_matches(approximate):
    (dx_in, unchanged_in), (dx_out, unchanged_out), (dx_ref, _) = _inplace_case(
        geglu, geglu_reference, approximate=approximate
    )
    assert not unchanged_in and unchanged_out
    torch.testing.assert_close(dx_in, dx_out, rtol=0, atol=0)
    assert_close(dx_in, dx_ref, BACKWARD, torch.float32)


@pytest.mark.parametrize("approximate", APPROX)
def test_large_gate_values_stay_finite(approximate):
    gate = torch.tensor([[-1e4, -100.0, -30.0, -5.0, 0.0, 5.0, 30.0, 100.0, 1e4]])
    up = torch.ones_like(gate)
    h, dg, _ = _run(geglu, gate, up, torch.ones_like(gate), approximate=approximate)
    h_ref, dg_ref, _ = _run(geglu_reference, gate, up, torch.ones_like(gate), approximate=approximate)
    assert torch.isfinite(h).all() and torch.isfinite(dg).all()
    torch.testing.assert_close(h, h_ref)
    torch.testing.assert_close(dg, dg_ref)


@settings(max_examples=20, deadline=None)
@given(
    rows=st.integers(1, 6),
    n=st.integers(1, 2100),
    dtype=st.sampled_from(DTYPES),
    approximate=st.sampled_from(APPROX),
    scale=st.sampled_from([0.1, 1.0, 8.0]),
)
def test_fuzz_shapes_and_dtypes(rows, n, dtype, approximate, scale):
    gate, up = _inputs((rows, n), dtype, scale)
    _check_against_reference(geglu, geglu_reference, gate, up, dtype, approximate=approximate)


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="same shape"):
        geglu(torch.randn(2, 8), torch.randn(8))
    with pytest.raises(TypeError, match="same dtype"):
        geglu(torch.randn(2, 8, dtype=torch.float16), torch.randn(2, 8, dtype=torch.bfloat16))
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        geglu(torch.ones(2, 8, dtype=torch.int32), torch.ones(2, 8, dtype=torch.int32))


def test_empty_input_returns_empty_without_launch():
    before = sum(path_counts.values())
    assert geglu(torch.empty(0, 16), torch.empty(0, 16), "tanh").shape == (0, 16)
    assert sum(path_counts.values()) == before


def test_fake_impl_traces_on_meta_and_under_compile():
    gate = torch.empty(2, 3, 16384, device="meta", dtype=torch.bfloat16, requires_grad=True)
    up = torch.empty(2, 3, 16384, device="meta", dtype=torch.bfloat16, requires_grad=True)
    h = geglu(gate, up, "tanh")
    h.sum().backward()
    assert h.shape == gate.shape and h.device.type == "meta" and gate.grad.shape == gate.shape

    compiled = torch.compile(lambda a, b: geglu(a, b, "tanh") * 2, backend="aot_eager", fullgraph=True)
    a, b = torch.randn(3, 40), torch.randn(3, 40)
    torch.testing.assert_close(compiled(a, b), F.gelu(a, approximate="tanh") * b * 2, rtol=1e-5, atol=1e-5)
