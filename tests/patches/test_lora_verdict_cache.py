"""The fused LoRA projection's cached verdict and adapter parts (``fastft.patches.peft_lora``): a repeated call reuses
them (no ``can_fuse``), and every change PEFT or the user can make between two calls is seen -- the next fused output
equals PEFT's own forward on the changed layer, bit for bit, or the call falls back (None)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import fastft.patches.peft_lora as peft_lora
from fastft.patches.peft_lora import fused_linear_forward
from tests.model.test_inference_path import _lora_layer


def _model():
    from peft import LoraConfig

    model, layer = _lora_layer()  # one q_proj, adapter "default" with a non-zero B
    model.add_adapter("other", LoraConfig(r=2, lora_alpha=6, target_modules=["q_proj"], lora_dropout=0.0))
    nn.init.normal_(layer.lora_B["other"].weight)  # each adapter changes the output
    return model, layer


def _same_as_peft(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    fused = fused_linear_forward(layer, x)
    assert fused is not None
    ref = layer(x)  # PEFT's own forward (this layer is not patched)
    assert fused.dtype == ref.dtype and torch.equal(fused, ref)
    return fused


@pytest.fixture
def can_fuse_calls(monkeypatch):
    calls = []
    original = peft_lora.can_fuse

    def counting(layer):
        calls.append(layer)
        return original(layer)

    monkeypatch.setattr(peft_lora, "can_fuse", counting)
    return calls


def test_repeated_calls_reuse_the_verdict_and_parts(can_fuse_calls):
    _, layer = _model()
    x = torch.randn(4, 1, 32)
    with torch.no_grad():
        _same_as_peft(layer, x)
        assert len(can_fuse_calls) == 1
        parts = layer.__dict__["_fastft_fusable"].parts
        for _ in range(3):
            _same_as_peft(layer, x)
        assert len(can_fuse_calls) == 1 and layer.__dict__["_fastft_fusable"].parts is parts
        layer.set_adapter("other")  # a changed state: checked again, once
        _same_as_peft(layer, x)
        _same_as_peft(layer, x)
        assert len(can_fuse_calls) == 2


def test_adapter_switch_merge_and_disable_between_calls():
    model, layer = _model()
    x = torch.randn(3, 2, 32)
    with torch.no_grad():
        first = _same_as_peft(layer, x)
        model.set_adapter("other")
        other = _same_as_peft(layer, x)
        assert not torch.equal(first, other)
        model.set_adapter("default")
        assert torch.equal(_same_as_peft(layer, x), first)
        layer.merge()
        assert fused_linear_forward(layer, x) is None
        layer.unmerge()
        _same_as_peft(layer, x)
        with model.disable_adapter():
            assert fused_linear_forward(layer, x) is None
        _same_as_peft(layer, x)  # (merge + unmerge rounded the base weight: PEFT's own output moved too)


def test_new_weights_and_scaling_between_calls():
    _, layer = _model()
    x = torch.randn(5, 32)
    with torch.no_grad():
        _same_as_peft(layer, x)
        layer.lora_B["default"].weight = nn.Parameter(torch.randn(24, 4))  # a new Parameter
        _same_as_peft(layer, x)
        layer.lora_A["default"].weight.data = torch.randn(4, 32)  # same Parameter, new tensor
        _same_as_peft(layer, x)
        layer.lora_B["default"].weight.mul_(3.0)  # in place
        _same_as_peft(layer, x)
        layer.base_layer.weight.data = torch.randn(24, 32)  # the frozen base's tensor replaced
        _same_as_peft(layer, x)
        layer.base_layer.weight = nn.Parameter(torch.randn(24, 32), requires_grad=False)
        _same_as_peft(layer, x)
        layer.scale_layer(0.5)  # PEFT's scaling changes in place in its dict
        _same_as_peft(layer, x)
        layer.set_scale("default", 3.0)
        _same_as_peft(layer, x)
        layer.unscale_layer()
        _same_as_peft(layer, x)


def test_requires_grad_changes_between_calls():
    _, layer = _model()
    x = torch.randn(4, 32)
    out = fused_linear_forward(layer, x)
    assert out.grad_fn is not None  # trainable adapter: the autograd Function
    for p in (layer.lora_A["default"].weight, layer.lora_B["default"].weight):
        p.requires_grad_(False)
    frozen = fused_linear_forward(layer, x)
    assert frozen.grad_fn is None and torch.equal(frozen, out.detach())
    layer.lora_B["default"].weight.requires_grad_(True)
    out = fused_linear_forward(layer, x)
    out.sum().backward()
    ref_grad = layer.lora_B["default"].weight.grad.clone()
    layer.lora_B["default"].weight.grad = None
    layer(x).sum().backward()  # PEFT's own graph: the same dB up to rounding of the folded scaling
    torch.testing.assert_close(ref_grad, layer.lora_B["default"].weight.grad)
    layer.base_layer.weight.requires_grad_(True)
    assert fused_linear_forward(layer, x) is None  # never computes a base-weight gradient
    layer.base_layer.weight.requires_grad_(False)
    assert fused_linear_forward(layer, x) is not None


@pytest.mark.parametrize("swap", [False, True])
def test_dtype_and_device_changes_between_calls(swap):
    model, layer = _model()
    x = torch.randn(4, 1, 32)
    previous = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(swap)
    try:
        with torch.no_grad():
            _same_as_peft(layer, x)
            model.to(torch.bfloat16)
            assert fused_linear_forward(layer, x) is None  # fp32 input, bf16 base: not the same math
            _same_as_peft(layer, x.bfloat16())
            model.to(torch.float32)
            _same_as_peft(layer, x)
            model.to("meta")  # another device: the parts follow the weights, never a stale CPU copy
            out = fused_linear_forward(layer, x.to("meta"))
            assert out.device.type == "meta" and out.shape == (4, 1, 24)
    finally:
        torch.__future__.set_swap_module_params_on_conversion(previous)


def test_fused_mlp_follows_weight_and_dtype_changes_between_calls():
    from fastft.patches.peft_lora import fused_mlp_forward
    from tests.kernels.test_lora import HIDDEN, _peft_block

    _, block = _peft_block(torch.float32)
    projections = [block.gate_proj, block.up_proj, block.down_proj]
    x = torch.randn(2, 3, HIDDEN)

    def uncached() -> torch.Tensor:  # the same call with every verdict (and its parts) read afresh
        for layer in projections:
            layer.__dict__.pop("_fastft_fusable", None)
        return fused_mlp_forward(block, x, "silu")

    with torch.no_grad():
        first = fused_mlp_forward(block, x, "silu")
        assert first is not None and torch.equal(fused_mlp_forward(block, x, "silu"), first)
        block.down_proj.lora_B["default"].weight.data = torch.randn_like(block.down_proj.lora_B["default"].weight)
        block.gate_proj.scale_layer(0.5)
        changed = fused_mlp_forward(block, x, "silu")
        assert not torch.equal(changed, first) and torch.equal(changed, uncached())
        block.to(torch.bfloat16)
        assert fused_mlp_forward(block, x, "silu") is None  # fp32 input, bf16 bases: PEFT's path
        assert fused_mlp_forward(block, x.bfloat16(), "silu").dtype == torch.bfloat16
