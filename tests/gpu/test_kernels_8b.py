"""Every fused op, compiled on a CUDA GPU, at Llama-3.1-8B shapes (8K tokens), vs its torch reference.

CUDA-only (``FASTFT_TEST_DEVICE=cuda``): skipped cleanly on CPU, where the interpreter could not afford these shapes.
Each test also proves the Triton path ran (``path_counts``) and that the torch path on the same CUDA tensors gives the
same bf16 roundings, so interpreter parity on CPU carries over to the GPU.
"""

import pytest
import torch

from fastft.kernels import (
    apply_rope,
    apply_rope_reference,
    cross_entropy,
    cross_entropy_reference,
    force_path,
    linear_cross_entropy,
    linear_cross_entropy_reference,
    path_counts,
    rms_norm,
    rms_norm_reference,
    selective_log_softmax,
    selective_log_softmax_reference,
    swiglu,
    swiglu_reference,
)
from tests.gpu.shapes import BACKWARD, FORWARD, HEAD_DIM, HEADS, HIDDEN, INTERMEDIATE, KV_HEADS, TOKENS, VOCAB, assert_close

pytestmark = pytest.mark.cuda
BF16 = torch.bfloat16


def _grads(fn, inputs, dy):
    leaves = [t.detach().requires_grad_() for t in inputs]
    out = fn(*leaves)
    outs = out if isinstance(out, tuple) else (out,)
    dys = dy if isinstance(dy, tuple) else (dy,)
    grads = torch.autograd.grad(outs, leaves, dys)
    return outs, grads


def _ran(op: str, before: int) -> None:
    assert path_counts[(op, "triton")] > before, f"{op}: the compiled Triton kernel did not run"


def _scaled(t: torch.Tensor, ref: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    scale = ref.float().abs().max().clamp_min(1.0)
    return t / scale, ref / scale


@pytest.mark.parametrize("dtype", [torch.float32, BF16], ids=str)
def test_rms_norm_8b(dtype):
    x = torch.randn(TOKENS, HIDDEN, device="cuda", dtype=dtype) * 3
    w = (1 + torch.randn(HIDDEN, device="cuda") * 0.1).to(dtype)
    dy = torch.randn_like(x)
    before = path_counts[("rms_norm", "triton")]
    (y,), (dx, dw) = _grads(lambda a, b: rms_norm(a, b, 1e-5), (x, w), dy)
    _ran("rms_norm", before)
    (y_ref,), (dx_ref, dw_ref) = _grads(lambda a, b: rms_norm_reference(a, b, 1e-5), (x, w), dy)
    assert_close(y, y_ref, FORWARD, dtype, "y")
    assert_close(dx, dx_ref, BACKWARD, dtype, "dx")
    assert_close(*_scaled(dw, dw_ref), BACKWARD, dtype, "dweight")


def test_rms_norm_bf16_rounds_like_the_torch_path_on_gpu():
    """Given the kernel's rstd, the compiled kernel's bf16 output is the torch path's arithmetic bit for bit."""
    x = torch.randn(TOKENS, HIDDEN, device="cuda", dtype=BF16) * 3
    w = (1 + torch.randn(HIDDEN, device="cuda") * 0.1).to(BF16)
    y, rstd = torch.ops.fastft.rms_norm_forward(x, w, 1e-5, False)
    expected = ((x.float() * rstd[:, None]).to(BF16).float() * w.float()).to(BF16)
    assert torch.equal(y, expected), f"{int((y != expected).sum())} of {y.numel()} elements differ"


@pytest.mark.parametrize("dtype", [torch.float32, BF16], ids=str)
def test_swiglu_8b(dtype):
    gate = torch.randn(TOKENS, INTERMEDIATE, device="cuda", dtype=dtype)
    up = torch.randn_like(gate)
    dy = torch.randn_like(gate)
    before = path_counts[("swiglu", "triton")]
    (h,), (dg, du) = _grads(swiglu, (gate, up), dy)
    _ran("swiglu", before)
    (h_ref,), (dg_ref, du_ref) = _grads(swiglu_reference, (gate, up), dy)
    assert_close(h, h_ref, FORWARD, dtype, "h")
    assert_close(dg, dg_ref, BACKWARD, dtype, "dgate")
    assert_close(du, du_ref, BACKWARD, dtype, "dup")


def test_rope_8b_bf16():
    q = torch.randn(1, HEADS, TOKENS, HEAD_DIM, device="cuda", dtype=BF16)
    k = torch.randn(1, KV_HEADS, TOKENS, HEAD_DIM, device="cuda", dtype=BF16)
    inv = 1.0 / (500000.0 ** (torch.arange(0, HEAD_DIM, 2, device="cuda").float() / HEAD_DIM))
    freqs = torch.outer(torch.arange(TOKENS, device="cuda").float(), inv)
    emb = torch.cat([freqs, freqs], -1)[None]
    cos, sin = emb.cos().to(BF16), emb.sin().to(BF16)
    dq, dk = torch.randn_like(q), torch.randn_like(k)
    before = path_counts[("rope", "triton")]
    outs, grads = _grads(lambda a, b: apply_rope(a, b, cos, sin), (q, k), (dq, dk))
    _ran("rope", before)
    ref_outs, ref_grads = _grads(lambda a, b: apply_rope_reference(a, b, cos, sin), (q, k), (dq, dk))
    for name, a, b in zip(("q", "k"), outs, ref_outs):
        assert_close(a, b, FORWARD, BF16, name)
    for name, a, b in zip(("dq", "dk"), grads, ref_grads):
        assert_close(a, b, BACKWARD, BF16, name)


@pytest.mark.parametrize("softcap", [None, 30.0], ids=["plain", "softcap"])
def test_cross_entropy_8b_vocab(softcap):
    tokens = 2048  # 2K x 128K logits: the fp32 reference alone holds 1 GiB per copy
    logits = (torch.randn(tokens, VOCAB, device="cuda") * 4).to(BF16)
    labels = torch.randint(0, VOCAB, (tokens,), device="cuda")
    labels[::7] = -100
    before = path_counts[("cross_entropy", "triton")]
    (loss,), (dx,) = _grads(lambda a: cross_entropy(a, labels, softcap=softcap), (logits,), torch.tensor(1.0))
    _ran("cross_entropy", before)
    (ref,), (dx_ref,) = _grads(lambda a: cross_entropy_reference(a, labels, softcap=softcap), (logits,), torch.tensor(1.0))
    assert_close(loss, ref, FORWARD, torch.float32, "loss")
    assert_close(*_scaled(dx, dx_ref), BACKWARD, BF16, "dlogits")


@pytest.mark.parametrize("train_head", [False, True], ids=["frozen_head", "trained_head"])
def test_linear_cross_entropy_8b(train_head):
    hidden = torch.randn(TOKENS, HIDDEN, device="cuda", dtype=BF16)
    weight = (torch.randn(VOCAB, HIDDEN, device="cuda") * HIDDEN**-0.5).to(BF16)
    labels = torch.randint(0, VOCAB, (TOKENS,), device="cuda")
    labels[:100] = -100
    inputs = (hidden, weight)

    def run(fn):
        h = hidden.detach().requires_grad_()
        w = weight.detach().requires_grad_(train_head)
        loss = fn(h, w, labels)
        grads = torch.autograd.grad(loss, (h, w) if train_head else (h,))
        return loss, grads

    before = path_counts[("cross_entropy", "triton")]
    loss, grads = run(linear_cross_entropy)
    _ran("cross_entropy", before)
    torch.cuda.empty_cache()
    ref, ref_grads = run(linear_cross_entropy_reference)
    assert_close(loss, ref, FORWARD, torch.float32, "loss")
    for name, g, g_ref in zip(("dhidden", "dweight"), grads, ref_grads):
        assert_close(*_scaled(g, g_ref), BACKWARD, BF16, name)
    del inputs


def test_selective_log_softmax_8b():
    tokens = 2048
    hidden = torch.randn(tokens, HIDDEN, device="cuda", dtype=BF16)
    weight = (torch.randn(VOCAB, HIDDEN, device="cuda") * HIDDEN**-0.5).to(BF16)
    ids = torch.randint(0, VOCAB, (tokens,), device="cuda")
    dy = torch.randn(tokens, device="cuda")
    (lp,), (dh,) = _grads(lambda h: selective_log_softmax(h, weight, ids, temperature=0.7), (hidden,), dy)
    (lp_ref,), (dh_ref,) = _grads(lambda h: selective_log_softmax_reference(h, weight, ids, temperature=0.7), (hidden,), dy)
    assert_close(lp, lp_ref, FORWARD, torch.float32, "logprobs")
    assert_close(*_scaled(dh, dh_ref), BACKWARD, BF16, "dhidden")


def test_torch_path_on_cuda_tensors_is_still_available():
    """force_path("torch") on CUDA tensors: the fallback a user gets is the same math (one dispatch rule)."""
    x = torch.randn(64, HIDDEN, device="cuda", dtype=BF16)
    w = torch.ones(HIDDEN, device="cuda", dtype=BF16)
    with force_path("torch"):
        before = path_counts[("rms_norm", "torch")]
        y = rms_norm(x, w)
        assert path_counts[("rms_norm", "torch")] == before + 1
    assert_close(y, rms_norm_reference(x, w), FORWARD, BF16)
