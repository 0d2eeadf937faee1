"""Fused LoRA (fastft.kernels.lora, entered through fastft.patches.peft_lora) vs PEFT's own eager forward/backward on
the same PEFT layers.

The nf4 cases' baseline is PEFT + bitsandbytes, run with bitsandbytes' generic CPU dequantization (the
bnb_default_cpu_kernels fixture): its native AVX-512 kernel is wrong for down_proj's rows of 176 = 2.75 blocks.
"""

import logging

import bitsandbytes as bnb
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model

from fastft._log import reset_once
from fastft.kernels import path_counts
from fastft.patches.peft_lora import can_fuse, fused_linear_forward, fused_mlp_forward, lora_mlp, lora_o, lora_qkv
from tests.bnb_reference import routed_calls
from tests.tolerances import BACKWARD, FORWARD, assert_close

pytestmark = pytest.mark.usefixtures("bnb_default_cpu_kernels")

HIDDEN, INTER, KV = 64, 176, 32
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
ACTS = {"silu": F.silu, "gelu": F.gelu, "gelu_tanh": lambda g: F.gelu(g, approximate="tanh")}


def _linear(n_in, n_out, dtype, nf4, bias=False):
    if not nf4:
        return nn.Linear(n_in, n_out, bias=bias, dtype=dtype)
    layer = bnb.nn.Linear4bit(n_in, n_out, bias=bias, quant_type="nf4", compute_dtype=dtype)
    layer.weight = bnb.nn.Params4bit(
        (torch.randn(n_out, n_in) * 0.08).to(dtype),
        requires_grad=False,
        quant_type="nf4",
        compress_statistics=True,
        blocksize=64,
    )
    return layer.to("cpu")  # quantizes


class Block(nn.Module):
    """A Llama-shaped block: attention projections (GQA: k/v narrower) and a gated MLP."""

    def __init__(self, dtype, nf4=False, bias=False, hidden=HIDDEN):
        super().__init__()
        self.q_proj = _linear(hidden, hidden, dtype, nf4, bias)
        self.k_proj = _linear(hidden, KV, dtype, nf4, bias)
        self.v_proj = _linear(hidden, KV, dtype, nf4, bias)
        self.o_proj = _linear(hidden, hidden, dtype, nf4, bias)
        self.gate_proj = _linear(hidden, INTER, dtype, nf4, bias)
        self.up_proj = _linear(hidden, INTER, dtype, nf4, bias)
        self.down_proj = _linear(INTER, hidden, dtype, nf4, bias)


TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _peft_block(dtype, nf4=False, bias=False, adapter_fp32=False, hidden=HIDDEN, **lora_kwargs):
    cfg = dict(r=8, lora_alpha=16, target_modules=TARGETS, lora_dropout=0.0, init_lora_weights=False)
    cfg.update(lora_kwargs)
    model = get_peft_model(Block(dtype, nf4, bias, hidden), LoraConfig(**cfg), autocast_adapter_dtype=adapter_fp32)
    block = model.base_model.model
    for name, p in block.named_parameters():  # PEFT's B init is zero with default init; make every grad nontrivial
        if "lora_" in name:
            p.data.normal_(0, 0.1)
    return model, block


def _lora_params(block, names):
    return [p for n, p in block.named_parameters() if "lora_" in n and n.split(".")[0] in names]


def _grads(out, inputs, douts):
    return torch.autograd.grad(out, inputs, douts)


def _check(got, expected, dtype, what):
    for i, (a, b) in enumerate(zip(got, expected, strict=True)):
        assert a.dtype == b.dtype and a.shape == b.shape, what
        # grads of A/B sum over tokens: compare relative to their scale
        scale = b.float().abs().max().clamp_min(1.0)
        assert_close(a / scale, b / scale, BACKWARD, dtype, f"{what} grad {i}")


def _peft_mlp(block, x, act):
    return block.down_proj(ACTS[act](block.gate_proj(x)) * block.up_proj(x))


def _fused_attention(block, x):
    """q, k, v, o as model patching runs them: each projection on its own through fused_linear_forward."""
    return tuple(fused_linear_forward(getattr(block, name), x) for name in ("q_proj", "k_proj", "v_proj", "o_proj"))


@pytest.mark.parametrize("recompute", ["activation", "projections"])
@pytest.mark.parametrize("nf4", [False, True], ids=["dense", "nf4"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_mlp_matches_peft(dtype, nf4, recompute):
    _, block = _peft_block(dtype, nf4)
    x = torch.randn(2, 5, HIDDEN, dtype=dtype, requires_grad=True)
    params = [x, *_lora_params(block, ["gate_proj", "up_proj", "down_proj"])]
    assert len(params) == 7
    routed_before = routed_calls["dequantize_4bit"]
    y_ref = _peft_mlp(block, x, "silu")
    dy = torch.randn_like(y_ref)
    g_ref = _grads(y_ref, params, dy)
    if nf4:  # the baseline dequantized with bitsandbytes' generic backend, forward (3) and backward (3)
        assert routed_calls["dequantize_4bit"] - routed_before == 6
    glu_before = path_counts[("swiglu", "triton")]
    nf4_before = path_counts[("dequantize_nf4", "triton")]
    y = lora_mlp(block, x, "silu", recompute=recompute)
    g = _grads(y, params, dy)
    assert path_counts[("swiglu", "triton")] > glu_before, "the fused SwiGLU op did not run"
    if nf4:  # dequantized in the forward (3) and again in the backward (3)
        assert path_counts[("dequantize_nf4", "triton")] - nf4_before >= 6
    assert y.dtype == y_ref.dtype and y.shape == y_ref.shape
    assert_close(y, y_ref, FORWARD, dtype, "forward")
    _check(g, g_ref, dtype, "mlp")


@pytest.mark.parametrize("act", ["gelu", "gelu_tanh"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_mlp_geglu_matches_peft(dtype, act):
    _, block = _peft_block(dtype)
    x = torch.randn(11, HIDDEN, dtype=dtype, requires_grad=True)
    params = [x, *_lora_params(block, ["gate_proj", "up_proj", "down_proj"])]
    y_ref = _peft_mlp(block, x, act)
    dy = torch.randn_like(y_ref)
    g_ref = _grads(y_ref, params, dy)
    before = path_counts[("geglu", "triton")]
    y = lora_mlp(block, x, act)
    g = _grads(y, params, dy)
    assert path_counts[("geglu", "triton")] > before
    assert_close(y, y_ref, FORWARD, dtype, "forward")
    _check(g, g_ref, dtype, "geglu mlp")


@pytest.mark.parametrize("nf4", [False, True], ids=["dense", "nf4"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_qkv_and_o_match_peft(dtype, nf4):
    _, block = _peft_block(dtype, nf4)
    x = torch.randn(2, 5, HIDDEN, dtype=dtype, requires_grad=True)
    params = [x, *_lora_params(block, ["q_proj", "k_proj", "v_proj"])]
    refs = (block.q_proj(x), block.k_proj(x), block.v_proj(x))
    dys = tuple(torch.randn_like(r) for r in refs)
    g_ref = _grads(refs, params, dys)
    outs = lora_qkv(block, x)
    g = _grads(outs, params, dys)
    for out, ref, name in zip(outs, refs, "qkv", strict=True):
        assert out.shape == ref.shape and out.dtype == ref.dtype
        assert_close(out, ref, FORWARD, dtype, f"{name} forward")
    _check(g, g_ref, dtype, "qkv")

    o_params = [x, *_lora_params(block, ["o_proj"])]
    ref = block.o_proj(x)
    dy = torch.randn_like(ref)
    g_ref = _grads(ref, o_params, dy)
    out = lora_o(block, x)
    assert_close(out, ref, FORWARD, dtype, "o forward")
    _check(_grads(out, o_params, dy), g_ref, dtype, "o")


@pytest.mark.parametrize("lora_alpha", [16, 8], ids=["scaling2", "scaling1"])
def test_fp32_forward_bitwise_for_projections(lora_alpha):
    # Same ops in the same order as PEFT: the forward of q/k/v/o is bit-identical in fp32. With scaling 1
    # (lora_alpha == r, FastModel's default) the multiply by 1 is left out: still the same bits, one pass fewer.
    from tests.op_recorder import OpRecorder

    _, block = _peft_block(torch.float32, lora_alpha=lora_alpha)
    x = torch.randn(10, HIDDEN)
    with torch.no_grad(), OpRecorder() as rec:
        q, k, v = lora_qkv(block, x)
    assert torch.equal(q, block.q_proj(x)) and torch.equal(k, block.k_proj(x)) and torch.equal(v, block.v_proj(x))
    assert torch.equal(lora_o(block, x), block.o_proj(x))
    assert rec.ops.count("aten.mul_.Tensor") + rec.ops.count("aten.mul_.Scalar") == (0 if lora_alpha == 8 else 3)


def test_mixed_precision_fp32_adapters_on_bf16_base():
    # PEFT's default (autocast_adapter_dtype=True) keeps adapters in fp32 on a bf16 base.
    for nf4 in (False, True):
        _, block = _peft_block(torch.bfloat16, nf4, adapter_fp32=True)
        assert block.gate_proj.lora_A["default"].weight.dtype == torch.float32
        x = torch.randn(10, HIDDEN, dtype=torch.bfloat16, requires_grad=True)
        params = [x, *_lora_params(block, ["gate_proj", "up_proj", "down_proj"])]
        y_ref = _peft_mlp(block, x, "silu")
        dy = torch.randn_like(y_ref)
        g_ref = _grads(y_ref, params, dy)
        y = lora_mlp(block, x, "silu")
        assert y.dtype == torch.bfloat16
        assert_close(y, y_ref, FORWARD, torch.bfloat16, "forward")
        _check(_grads(y, params, dy), g_ref, torch.bfloat16, "mixed")


@pytest.mark.parametrize("nf4", [False, True], ids=["dense", "nf4"])
def test_under_autocast_matches_peft_under_autocast(nf4):
    # The Trainer's bf16=True wraps the forward in autocast: PEFT then runs its fp32 adapters through bf16 casts.
    _, block = _peft_block(torch.bfloat16, nf4, adapter_fp32=True)
    x = torch.randn(2, 5, HIDDEN, dtype=torch.bfloat16, requires_grad=True)
    mlp_params = [x, *_lora_params(block, ["gate_proj", "up_proj", "down_proj"])]
    qkv_params = [x, *_lora_params(block, ["q_proj", "k_proj", "v_proj", "o_proj"])]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_ref = _peft_mlp(block, x, "silu")
        refs = (block.q_proj(x), block.k_proj(x), block.v_proj(x), block.o_proj(x))
        y = fused_mlp_forward(block, x, "silu")
        outs = _fused_attention(block, x)
    assert y is not None and y.dtype == torch.bfloat16
    dy = torch.randn_like(y_ref)
    _check(_grads(y, mlp_params, dy), _grads(y_ref, mlp_params, dy), torch.bfloat16, "mlp under autocast")
    assert_close(y, y_ref, FORWARD, torch.bfloat16, "mlp forward under autocast")
    dys = tuple(torch.randn_like(r) for r in refs)
    for out, ref in zip(outs, refs, strict=True):
        assert_close(out, ref, FORWARD, torch.bfloat16, "projection forward under autocast")
    _check(_grads(outs, qkv_params, dys), _grads(refs, qkv_params, dys), torch.bfloat16, "qkvo under autocast")
    # the fp32 master adapters get fp32 gradients, as through PEFT's autocast casts
    assert block.gate_proj.lora_A["default"].weight.dtype == torch.float32


@pytest.mark.parametrize("input_dtype", [torch.float32, torch.bfloat16], ids=["fp32_input", "bf16_input"])
def test_fp32_model_under_bf16_autocast_runs_fused_and_matches_peft(input_dtype):
    """TRL's default bf16=True on CPU: an fp32 model under bf16 autocast. The fused MLP and projections run on the
    casts autocast makes (input and base weight to bf16) and give PEFT-under-autocast's outputs and gradients. The
    input is fp32 (a norm's output) or already bf16 (attention's output under autocast, o_proj's input)."""
    _, block = _peft_block(torch.float32)
    x = torch.randn(2, 5, HIDDEN).to(input_dtype).requires_grad_(True)
    mlp_params = [x, *_lora_params(block, ["gate_proj", "up_proj", "down_proj"])]
    qkv_params = [x, *_lora_params(block, ["q_proj", "k_proj", "v_proj", "o_proj"])]
    before = path_counts[("swiglu", "triton")] + path_counts[("swiglu", "torch")]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_ref = _peft_mlp(block, x, "silu")
        refs = (block.q_proj(x), block.k_proj(x), block.v_proj(x), block.o_proj(x))
        y = fused_mlp_forward(block, x, "silu")
        outs = _fused_attention(block, x)
    assert y is not None and y.dtype == y_ref.dtype == torch.bfloat16
    assert path_counts[("swiglu", "triton")] + path_counts[("swiglu", "torch")] > before
    dy = torch.randn_like(y_ref)
    assert_close(y, y_ref, FORWARD, torch.bfloat16, "mlp forward, fp32 model under bf16 autocast")
    _check(_grads(y, mlp_params, dy), _grads(y_ref, mlp_params, dy), torch.bfloat16, "mlp, fp32 under autocast")
    dys = tuple(torch.randn_like(r) for r in refs)
    for out, ref in zip(outs, refs, strict=True):
        assert out.dtype == ref.dtype
        assert_close(out, ref, FORWARD, torch.bfloat16, "projection forward, fp32 model under bf16 autocast")
    _check(_grads(outs, qkv_params, dys), _grads(refs, qkv_params, dys), torch.bfloat16, "qkvo, fp32 under autocast")
    assert x.grad is None or x.grad.dtype == input_dtype


def test_autocast_over_a_4bit_fp32_base_falls_back_with_the_reason(caplog):
    _, block = _peft_block(torch.float32, nf4=True)
    reset_once()
    with caplog.at_level(logging.INFO, logger="fastft"), torch.autocast("cpu", dtype=torch.bfloat16):
        assert fused_mlp_forward(block, torch.randn(3, HIDDEN), "silu") is None
    assert "autocast to torch.bfloat16 with a torch.float32 input and a 4-bit base" in caplog.text


def test_rslora_and_different_rank_per_projection():
    _, block = _peft_block(
        torch.float32,
        use_rslora=True,
        lora_alpha=12,
        rank_pattern={"gate_proj": 4, "up_proj": 12, "down_proj": 6, "k_proj": 2},
    )
    assert block.up_proj.lora_A["default"].weight.shape[0] == 12
    assert block.gate_proj.scaling["default"] == pytest.approx(12 / 4**0.5)
    x = torch.randn(10, HIDDEN, requires_grad=True)
    params = [x, *_lora_params(block, ["gate_proj", "up_proj", "down_proj"])]
    y_ref = _peft_mlp(block, x, "silu")
    dy = torch.randn_like(y_ref)
    g_ref = _grads(y_ref, params, dy)
    y = lora_mlp(block, x, "silu")
    assert_close(y, y_ref, FORWARD, torch.float32, "forward")
    _check(_grads(y, params, dy), g_ref, torch.float32, "rslora mlp")
    qkv_params = [x, *_lora_params(block, ["q_proj", "k_proj", "v_proj"])]
    refs = (block.q_proj(x), block.k_proj(x), block.v_proj(x))
    dys = tuple(torch.randn_like(r) for r in refs)
    _check(_grads(lora_qkv(block, x), qkv_params, dys), _grads(refs, qkv_params, dys), torch.float32, "rslora qkv")


def test_base_weight_never_gets_a_grad():
    _, block = _peft_block(torch.float32)
    x = torch.randn(10, HIDDEN, requires_grad=True)
    (lora_mlp(block, x, "silu").sum() + sum(t.sum() for t in lora_qkv(block, x)) + lora_o(block, x).sum()).backward()
    for name in TARGETS:
        layer = getattr(block, name)
        assert layer.get_base_layer().weight.grad is None
        assert layer.lora_A["default"].weight.grad is not None and layer.lora_B["default"].weight.grad is not None
    # An unfrozen base weight would need a gradient the fused path never computes: not fusable.
    block.q_proj.get_base_layer().weight.requires_grad_(True)
    ok, reason = can_fuse(block.q_proj)
    assert not ok and "requires grad" in reason


def test_input_grad_only_when_needed_and_frozen_adapter():
    _, block = _peft_block(torch.float32)
    block.gate_proj.lora_A["default"].weight.requires_grad_(False)
    x = torch.randn(10, HIDDEN)  # no grad for x
    lora_mlp(block, x, "silu").sum().backward()
    assert block.gate_proj.lora_A["default"].weight.grad is None
    assert block.gate_proj.lora_B["default"].weight.grad is not None


def _fallback_blocks():
    yield "lora_dropout", _peft_block(torch.float32, lora_dropout=0.1)[1]
    yield "bias", _peft_block(torch.float32, bias=True)[1]
    yield "lora_bias", _peft_block(torch.float32, lora_bias=True)[1]
    yield "DoRA", _peft_block(torch.float32, use_dora=True)[1]
    model, block = _peft_block(torch.float32)
    model.add_adapter("second", LoraConfig(r=4, target_modules=TARGETS, lora_dropout=0.0))
    model.base_model.set_adapter(["default", "second"])
    yield "2 active adapters", block
    model, block = _peft_block(torch.float32)
    with model.disable_adapter():
        yield "disabled", block
    model, block = _peft_block(torch.float32)
    model.merge_adapter()
    yield "merged", block


def test_fallbacks_return_none_log_reason_and_peft_path_matches(caplog):
    expected_words = {
        "lora_dropout": "dropout",
        "bias": "bias",
        "lora_bias": "lora_bias",
        "DoRA": "DoRA",
        "2 active adapters": "2 active",
        "disabled": "disabled",
        "merged": "merged",
    }
    seen = []
    for label, block in _fallback_blocks():
        reset_once()
        block.eval()  # dropout off, so PEFT's two calls below agree
        x = torch.randn(10, HIDDEN)
        with caplog.at_level(logging.INFO, logger="fastft"):
            caplog.clear()
            assert fused_mlp_forward(block, x, "silu") is None, label
            assert _fused_attention(block, x) == (None,) * 4, label
        assert any(expected_words[label] in r.getMessage() for r in caplog.records), (label, caplog.text)
        with pytest.raises(ValueError, match="cannot be fused"):
            lora_mlp(block, x, "silu")
        # The caller's fallback is PEFT's own forward: same numbers as calling PEFT directly.
        out = fused_mlp_forward(block, x, "silu")
        out = _peft_mlp(block, x, "silu") if out is None else out
        assert torch.equal(out, _peft_mlp(block, x, "silu"))
        seen.append(label)
    assert len(seen) == 7


def test_reason_logged_once():
    _, block = _peft_block(torch.float32, lora_dropout=0.1)
    reset_once()
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("fastft")
    logger.addHandler(handler)
    old = logger.level
    logger.setLevel(logging.INFO)
    try:
        for _ in range(3):
            assert fused_mlp_forward(block, torch.randn(3, HIDDEN), "silu") is None
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old)
    assert len(records) == 1 and "dropout" in records[0].getMessage()


def test_fused_entry_points_return_results_when_fusable():
    _, block = _peft_block(torch.float32)
    x = torch.randn(10, HIDDEN)
    torch.testing.assert_close(fused_mlp_forward(block, x, "swiglu"), _peft_mlp(block, x, "silu"), **FORWARD[torch.float32])
    q, k, v, o = _fused_attention(block, x)
    assert torch.equal(q, block.q_proj(x)) and torch.equal(v, block.v_proj(x))
    assert torch.equal(o, block.o_proj(x))
    with pytest.raises(ValueError, match="activation"):
        lora_mlp(block, x, "relu")


def test_meta_tensors_trace_forward_and_backward():
    _, block = _peft_block(torch.bfloat16)
    block = block.to("meta")
    x = torch.empty(4, 7, HIDDEN, dtype=torch.bfloat16, device="meta", requires_grad=True)
    y = lora_mlp(block, x, "silu", recompute="projections")
    q, k, v = lora_qkv(block, x)
    (y.sum() + q.sum() + k.sum() + v.sum() + lora_o(block, x).sum()).backward()
    assert y.shape == x.shape and y.device.type == "meta" and k.shape == (4, 7, KV)
    assert x.grad.shape == x.shape
    assert block.down_proj.lora_A["default"].weight.grad.shape == block.down_proj.lora_A["default"].weight.shape


def test_inplace_backward_guards_a_retained_graph():
    _, block = _peft_block(torch.float32)
    x = torch.randn(10, HIDDEN, requires_grad=True)
    params = [x, *_lora_params(block, ["gate_proj", "up_proj", "down_proj"])]
    y = lora_mlp(block, x, "silu")  # inplace_backward=True: dgate/dup overwrite the saved gate/up
    dy = torch.randn_like(y)
    first = torch.autograd.grad(y, params, dy, retain_graph=True)
    with pytest.raises(RuntimeError, match="inplace"):
        torch.autograd.grad(y, params, dy)
    y = lora_mlp(block, x, "silu", inplace_backward=False)
    g1 = torch.autograd.grad(y, params, dy, retain_graph=True)
    g2 = torch.autograd.grad(y, params, dy)
    for a, b, c in zip(first, g1, g2, strict=True):
        assert torch.equal(a, b) and torch.equal(b, c)


def test_long_input_chunks_the_recomputed_activation(monkeypatch):
    import fastft.kernels.lora as lora_module

    monkeypatch.setattr(lora_module, "_H_CHUNK_ELEMENTS", 3 * INTER)  # 3 rows per chunk, last chunk partial
    _, block = _peft_block(torch.float32)
    x = torch.randn(11, HIDDEN, requires_grad=True)
    params = [x, *_lora_params(block, ["down_proj"])]
    y_ref = _peft_mlp(block, x, "silu")
    dy = torch.randn_like(y_ref)
    _check(_grads(lora_mlp(block, x, "silu"), params, dy), _grads(y_ref, params, dy), torch.float32, "chunked")


def _saved_storages(fn, x, params):
    skip = {p.untyped_storage()._cdata for p in params} | {x.untyped_storage()._cdata}
    seen = {}

    def pack(t):
        if t.untyped_storage()._cdata not in skip:
            seen[t.untyped_storage()._cdata] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(x)
    return seen


def test_saved_activations_are_at_most_half_of_peft():
    _, block = _peft_block(torch.float32)
    x = torch.randn(16, HIDDEN, requires_grad=True)
    params = list(block.parameters())
    one = 16 * INTER * 4  # one [T, I] fp32 activation
    peft = _saved_storages(lambda t: _peft_mlp(block, t, "silu"), x, params)
    fused = _saved_storages(lambda t: lora_mlp(block, t, "silu"), x, params)
    lean = _saved_storages(lambda t: lora_mlp(block, t, "silu", recompute="projections"), x, params)
    big = lambda saved: sum(n for n in saved.values() if n >= one)  # [T, I] activations
    assert big(peft) == 4 * one  # gate, silu(gate), up, h
    assert big(fused) == 2 * one  # gate, up
    assert sum(fused.values()) <= 0.52 * sum(peft.values())  # plus the same rank-r products in both
    assert big(lean) == 0  # only rank-r products: no [T, I] tensor saved


def test_nf4_weights_dequantize_into_reused_buffers():
    import fastft.kernels.lora as lora_module

    _, block = _peft_block(torch.bfloat16, nf4=True)
    x = torch.randn(6, HIDDEN, dtype=torch.bfloat16, requires_grad=True)
    lora_module.clear_buffers()
    lora_mlp(block, x, "silu").sum().backward()
    first = {k: v.data_ptr() for k, v in lora_module._buffers.items()}
    assert len(first) == 1  # gate, up [I, H] and down [H, I] have the same numel: one shared buffer
    lora_mlp(block, x, "silu").sum().backward()
    assert {k: v.data_ptr() for k, v in lora_module._buffers.items()} == first
