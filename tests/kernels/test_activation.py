"""The activation vocabulary (fastft.kernels.activation): every config name means the function transformers computes
for it, every alias parses to one member, and the GLU ops take exactly what the members hand them."""

import pytest
import torch
import torch.nn.functional as F
from transformers.activations import ACT2FN

from fastft.kernels.activation import _CONFIG_NAMES, Activation
from fastft.kernels.glu import glu, glu_backward_inplace


def _torch_function(activation: Activation, x: torch.Tensor) -> torch.Tensor:
    return F.silu(x) if activation is Activation.SILU else F.gelu(x, approximate=activation.approximate)


@pytest.mark.parametrize("name", sorted(_CONFIG_NAMES))
def test_config_names_mean_what_transformers_computes(name):
    activation = Activation.from_config(name)
    x = torch.linspace(-6.0, 6.0, 241, dtype=torch.float64)
    # gelu_new is the tanh formula written out (not F.gelu's kernel): equal up to float64 rounding
    torch.testing.assert_close(_torch_function(activation, x), ACT2FN[name](x), rtol=1e-12, atol=1e-12)


def test_names_without_a_kernel_are_not_config_activations():
    for name in ("relu", "gelu_fast", "quick_gelu", "swiglu", "gelu_tanh", None, 3):
        assert Activation.from_config(name) is None, name


def test_aliases_and_errors():
    assert {Activation.parse(n) for n in ("silu", "swish", "swiglu")} == {Activation.SILU}
    assert {Activation.parse(n) for n in ("gelu", "geglu")} == {Activation.GELU}
    assert {Activation.parse(n) for n in ("gelu_tanh", "geglu_tanh", "gelu_pytorch_tanh", "gelu_new")} == {
        Activation.GELU_TANH
    }
    assert Activation.parse(Activation.GELU) is Activation.GELU
    for member in Activation:
        assert Activation.from_op_name(member.op_name) is member
        assert member.kernel == ("swiglu" if member is Activation.SILU else "geglu")
    assert Activation.from_approximate("none") is Activation.GELU
    assert Activation.from_approximate("tanh") is Activation.GELU_TANH
    with pytest.raises(ValueError, match="activation must be one of"):
        Activation.parse("relu")
    with pytest.raises(ValueError, match="activation must be one of"):
        Activation.from_op_name("swiglu")  # the custom op takes the strict spelling only
    with pytest.raises(ValueError, match="approximate must be 'none' or 'tanh'"):
        Activation.from_approximate("erf")


@pytest.mark.parametrize("activation", list(Activation))
def test_glu_by_member_matches_the_torch_function(activation):
    torch.manual_seed(0)
    gate = torch.randn(3, 37, requires_grad=True)
    up = torch.randn(3, 37, requires_grad=True)
    h = glu(gate, up, activation)
    want = _torch_function(activation, gate) * up
    torch.testing.assert_close(h, want, rtol=1e-5, atol=1e-6)
    dh = torch.randn_like(h)
    got = torch.autograd.grad(h, (gate, up), dh)
    ref = torch.autograd.grad(want, (gate, up), dh)
    for g, r in zip(got, ref, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5)
    # the in-place backward op takes the member's op_name and writes what the out-of-place backward returns
    g2, u2 = gate.detach().clone(), up.detach().clone()
    glu_backward_inplace(dh, g2, u2, activation.op_name)
    torch.testing.assert_close((g2, u2), got, rtol=1e-5, atol=1e-5)
