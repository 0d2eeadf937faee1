"""The eager fast path of fastft's ops (``fastft.kernels._launch.call_op`` / ``needs_grad``) and the cached fused-LoRA
verdict: same bits as the dispatched custom op, the path still counted, the custom op still seen by tracing, fake
tensors and dispatch modes, and a cached verdict that follows every state change it depends on."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from fastft.kernels import apply_rope, rms_norm, swiglu
from fastft.kernels._launch import force_path, path_counts
from fastft.patches.peft_lora import fused_linear_forward, lora_path_counts
from tests.op_recorder import OpRecorder


def _inputs():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 32, generator=g)
    w = torch.randn(32, generator=g)
    q, k = torch.randn(2, 4, 5, 16, generator=g), torch.randn(2, 2, 5, 16, generator=g)
    cos, sin = torch.randn(2, 5, 16, generator=g), torch.randn(2, 5, 16, generator=g)
    return x, w, q, k, cos, sin


@pytest.mark.parametrize("path", ["torch", "triton"])
@pytest.mark.parametrize("grad", [False, True])
def test_eager_calls_equal_the_dispatched_op_bitwise_and_are_counted(path, grad):
    x, w, q, k, cos, sin = _inputs()
    with force_path(path):
        before = path_counts.copy()
        with torch.set_grad_enabled(grad):
            xs = x.clone().requires_grad_(grad)
            y = rms_norm(xs, w, 1e-6)
            qo, ko = apply_rope(q.clone().requires_grad_(grad), k, cos, sin)
            h = swiglu(xs, x)
        assert (y.grad_fn is not None) == grad  # no graph recorded without grad, a Function node with it
        counted = path_counts - before
        assert counted[("rms_norm", path)] == 1 and counted[("rope", path)] == 1 and counted[("swiglu", path)] == 1
        # the dispatcher's route for comparison
        ref_y = torch.ops.fastft.rms_norm_forward(x, w, 1e-6, False)[0]
        ref_q, ref_k = torch.ops.fastft.rope_forward(q, k, cos, sin)
        ref_h = torch.ops.fastft.swiglu_forward(x, x)
    for got, ref in ((y, ref_y), (qo, ref_q), (ko, ref_k), (h, ref_h)):
        assert torch.equal(got.detach(), ref)


def test_dispatch_modes_and_fake_tensors_still_see_one_custom_op():
    x, w, *_ = _inputs()
    with torch.no_grad(), OpRecorder() as recorder:
        rms_norm(x, w, 1e-6)
    assert any("fastft.rms_norm_forward" in op for op in recorder.ops), recorder.ops
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        fx, fw = mode.from_tensor(x), mode.from_tensor(w)
        y = rms_norm(fx, fw, 1e-6)
    assert y.shape == x.shape and type(y).__name__ == "FakeTensor"
    y = rms_norm(x.to("meta"), w.to("meta"), 1e-6)  # the memory model's device: the fake impl answers
    assert y.device.type == "meta" and y.shape == x.shape


def test_compiled_call_keeps_the_custom_op_and_matches_eager():
    x, w, *_ = _inputs()
    with force_path("torch"):
        eager = rms_norm(x, w, 1e-6)
        compiled = torch.compile(lambda a, b: rms_norm(a, b, 1e-6), backend="aot_eager", fullgraph=True)(x, w)
    assert torch.equal(eager, compiled)


def _lora_layer():
    from peft import LoraConfig, get_peft_model

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.q_proj = nn.Linear(32, 24, bias=False)

        def forward(self, x):
            return self.q_proj(x)

    torch.manual_seed(0)
    model = get_peft_model(Block(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], lora_dropout=0.0))
    nn.init.normal_(model.base_model.model.q_proj.lora_B["default"].weight)  # non-zero B: the adapter matters
    return model, model.base_model.model.q_proj


def test_cached_lora_verdict_follows_every_state_change():
    model, layer = _lora_layer()
    x = torch.randn(6, 32)
    with torch.no_grad():
        fused = fused_linear_forward(layer, x)
        assert fused is not None and torch.equal(fused, layer(x))  # PEFT's own forward, same bits
        # base weight trainable: no fused path (it never computes a base-weight gradient)
        layer.base_layer.weight.requires_grad_(True)
        assert fused_linear_forward(layer, x) is None
        layer.base_layer.weight.requires_grad_(False)
        assert fused_linear_forward(layer, x) is not None
        # adapters disabled (PEFT's own switch), then enabled again
        with model.disable_adapter():
            assert fused_linear_forward(layer, x) is None
        assert fused_linear_forward(layer, x) is not None
        # dropout swapped in after construction
        identity = layer.lora_dropout["default"]
        layer.lora_dropout["default"] = nn.Dropout(0.1)
        assert fused_linear_forward(layer, x) is None
        layer.lora_dropout["default"] = identity
        # merged into the base weight, then unmerged
        layer.merge()
        assert fused_linear_forward(layer, x) is None
        layer.unmerge()
        # a replaced adapter weight is read, not a stale cached one
        layer.lora_B["default"].weight = nn.Parameter(torch.zeros(24, 4))
        out = fused_linear_forward(layer, x)
        assert out is not None and torch.equal(out, layer(x))
        # a second adapter made active: the verdict is recomputed for it
        from peft import LoraConfig

        model.add_adapter("other", LoraConfig(r=2, lora_alpha=2, target_modules=["q_proj"], lora_dropout=0.2))
        model.set_adapter("other")
        before = lora_path_counts[("linear", "peft")]
        assert fused_linear_forward(layer, x) is None
        assert lora_path_counts[("linear", "peft")] == before + 1


def test_fused_lora_without_grad_equals_the_autograd_function_forward():
    _, layer = _lora_layer()
    x = torch.randn(2, 7, 32)
    with torch.no_grad():
        no_graph = fused_linear_forward(layer, x)
    with_graph = fused_linear_forward(layer, x.clone().requires_grad_())
    assert with_graph.grad_fn is not None and no_graph.grad_fn is None
    assert torch.equal(no_graph, with_graph.detach())
