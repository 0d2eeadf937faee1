"""Fused RoPE (fastft.kernels.rope) vs transformers' apply_rotary_pos_emb, forward and backward, both paths."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

from fastft.kernels import apply_rope, apply_rope_reference, force_path, path_counts
from fastft.kernels import rope as rope_module
from tests.tolerances import BACKWARD, FORWARD, assert_close

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (batch, q_heads, kv_heads, seq, head_dim, layout): GQA 8:2, 4:1, 3:1, MHA, head_dim 64/128/80/96/256, odd seq;
# "bshd" builds q/k as transposed views of [batch, seq, heads, head_dim] buffers, as the attention modules do.
SHAPES = [
    (2, 8, 2, 7, 64, "bshd"),
    (1, 4, 4, 33, 128, "bhsd"),
    (3, 6, 2, 5, 80, "bshd"),
    (2, 4, 1, 9, 96, "bhsd"),
    (1, 12, 4, 3, 256, "bshd"),  # 12 q heads in tiles of 8: a ragged second pass of the head loop
]


def _rotary(head_dim, n_heads, n_kv, position_ids, dtype):
    config = LlamaConfig(
        hidden_size=n_heads * head_dim,
        num_attention_heads=n_heads,
        num_key_value_heads=n_kv,
        head_dim=head_dim,
        max_position_embeddings=4096,
    )
    x = torch.empty(1, dtype=dtype)
    return LlamaRotaryEmbedding(config)(x, position_ids)


def _qk(batch, n_q, n_kv, seq, head_dim, layout, dtype):
    if layout == "bshd":
        q = torch.randn(batch, seq, n_q, head_dim).to(dtype).transpose(1, 2)
        k = torch.randn(batch, seq, n_kv, head_dim).to(dtype).transpose(1, 2)
        assert seq == 1 or n_q == 1 or not q.is_contiguous()
    else:
        q = torch.randn(batch, n_q, seq, head_dim).to(dtype)
        k = torch.randn(batch, n_kv, seq, head_dim).to(dtype)
    return q, k


def _run(fn, q, k, cos, sin, dq, dk):
    q = q.detach().requires_grad_()
    k = k.detach().requires_grad_()
    q_out, k_out = fn(q, k, cos, sin)
    gq, gk = torch.autograd.grad((q_out, k_out), (q, k), (dq, dk))
    return q_out, k_out, gq, gk


def _hf(q, k, cos, sin):
    return apply_rotary_pos_emb(q, k, cos, sin)


def _check(q, k, cos, sin, dtype):
    """apply_rope vs HF in the input dtype (eager rounding) and vs the fp32 math on the same inputs."""
    dq, dk = torch.randn(q.shape).to(dtype), torch.randn(k.shape).to(dtype)
    out = _run(apply_rope, q, k, cos, sin, dq, dk)
    if cos.dtype == q.dtype:
        ref = _run(_hf, q, k, cos, sin, dq, dk)
    else:  # HF would promote to cos's dtype; fastft keeps q's
        ref = _run(apply_rope_reference, q, k, cos, sin, dq, dk)
    ref32 = _run(_hf, q.float(), k.float(), cos.float(), sin.float(), dq.float(), dk.float())
    for name, a, b, b32 in zip(("q_out", "k_out", "dq", "dk"), out, ref, ref32, strict=True):
        assert a.dtype == dtype and a.shape == b.shape, name
        table = FORWARD if name.endswith("out") else BACKWARD
        assert_close(a, b, table, dtype, f"{name} vs HF")
        assert_close(a, b32, FORWARD, dtype, f"{name} vs fp32")
    return out


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_triton_matches_hf(shape, dtype):
    batch, n_q, n_kv, seq, head_dim, layout = shape
    q, k = _qk(batch, n_q, n_kv, seq, head_dim, layout, dtype)
    position_ids = torch.arange(seq)[None].expand(batch, -1)
    cos, sin = _rotary(head_dim, n_q, n_kv, position_ids, dtype)
    before = path_counts[("rope", "triton")], path_counts[("rope_backward", "triton")]
    q_out, k_out, dq, dk = _check(q, k, cos, sin, dtype)
    assert (path_counts[("rope", "triton")], path_counts[("rope_backward", "triton")]) == (before[0] + 1, before[1] + 1)
    # outputs keep the input's memory layout (a transposed [b, s, h, d] buffer stays one)
    assert q_out.stride() == q.stride() and k_out.stride() == k.stride()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_fp32_cos_sin_with_half_q(dtype):
    q, k = _qk(2, 4, 2, 7, 64, "bshd", dtype)
    cos, sin = _rotary(64, 4, 2, torch.arange(7)[None] + 40, torch.float32)
    q_out, _, dq, _ = _check(q, k, cos, sin, dtype)
    assert q_out.dtype == dtype and dq.dtype == dtype


def test_q_and_k_rotated_in_one_launch(monkeypatch):
    launches = []
    real_launch = rope_module.launch
    monkeypatch.setattr(
        rope_module, "launch", lambda kernel, grid, *a, **kw: (launches.append(grid), real_launch(kernel, grid, *a, **kw))
    )
    q, k = _qk(2, 8, 2, 5, 64, "bshd", torch.float32)
    cos, sin = _rotary(64, 8, 2, torch.arange(5)[None], torch.float32)
    q_out, k_out = apply_rope(q.requires_grad_(), k.requires_grad_(), cos, sin)
    assert launches == [(2 * 5,)]
    (q_out.sum() + k_out.sum()).backward()
    assert launches == [(10,), (10,)]


def test_packed_sequences_with_restarting_positions():
    """Three documents packed in one row (positions restart at 0), and a batch with per-row offsets."""
    dtype = torch.bfloat16
    position_ids = torch.cat([torch.arange(5), torch.arange(7), torch.arange(4)])[None]
    q, k = _qk(1, 8, 2, 16, 64, "bshd", dtype)
    cos, sin = _rotary(64, 8, 2, position_ids, dtype)
    q_out, k_out, _, _ = _check(q, k, cos, sin, dtype)
    # restart means the first token of each document is rotated by angle 0: unchanged
    for start in (0, 5, 12):
        torch.testing.assert_close(q_out[:, :, start], q[:, :, start], rtol=0, atol=0)
    # per-row positions (left padding / generation offsets): cos/sin batch 2, no broadcast
    position_ids = torch.stack([torch.arange(9) + 100, torch.arange(9)])
    q, k = _qk(2, 4, 4, 9, 96, "bhsd", torch.float32)
    cos, sin = _rotary(96, 4, 4, position_ids, torch.float32)
    _check(q, k, cos, sin, torch.float32)


def test_head_slices_of_a_fused_qkv_buffer():
    """q and k as head slices of one [batch, seq, q+2kv heads, head_dim] projection (non-dense views, no copy)."""
    qkv = torch.randn(2, 7, 8 + 2 + 2, 64, dtype=torch.bfloat16)
    q, k = qkv[:, :, :8].transpose(1, 2), qkv[:, :, 8:10].transpose(1, 2)
    cos, sin = _rotary(64, 8, 2, torch.arange(7)[None], torch.bfloat16)
    _check(q, k, cos, sin, torch.bfloat16)


def test_backward_is_the_exact_adjoint_for_arbitrary_cos_sin():
    """cos/sin taken as given: with halves that differ (not a pure rotation) the backward is still exact."""
    q, k = _qk(2, 4, 2, 5, 32, "bhsd", torch.float32)
    cos, sin = torch.randn(2, 5, 32), torch.randn(2, 5, 32)
    _check(q, k, cos, sin, torch.float32)
    cos2d, sin2d = cos[0], sin[0]  # [seq, head_dim] broadcasts over the batch
    out = apply_rope(q, k, cos2d, sin2d)
    ref = _hf(q, k, cos2d[None], sin2d[None])
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)


def test_only_cos_and_sin_are_saved():
    q, k = _qk(1, 4, 2, 6, 64, "bshd", torch.float32)
    cos, sin = _rotary(64, 4, 2, torch.arange(6)[None], torch.float32)
    q_out, _ = apply_rope(q.requires_grad_(), k.requires_grad_(), cos, sin)
    saved = q_out.grad_fn.saved_tensors
    assert len(saved) == 2 and saved[0] is cos and saved[1] is sin


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_torch_path_matches_hf(dtype):
    q, k = _qk(2, 8, 2, 7, 80, "bshd", dtype)
    cos, sin = _rotary(80, 8, 2, torch.arange(7)[None] + 3, dtype)
    with force_path("torch"):
        before = path_counts[("rope", "torch")], path_counts[("rope_backward", "torch")]
        q_out, _, _, _ = _check(q, k, cos, sin, dtype)
        assert (path_counts[("rope", "torch")], path_counts[("rope_backward", "torch")]) == (before[0] + 1, before[1] + 1)
    assert q_out.stride() == q.stride()


@settings(max_examples=15, deadline=None)
@given(
    batch=st.integers(1, 2),
    n_kv=st.integers(1, 3),
    group=st.integers(1, 4),
    seq=st.integers(1, 6),
    half=st.integers(1, 70),
    dtype=st.sampled_from(DTYPES),
    layout=st.sampled_from(["bshd", "bhsd"]),
    cos_batch_one=st.booleans(),
    offset=st.integers(0, 2000),
)
def test_fuzz(batch, n_kv, group, seq, half, dtype, layout, cos_batch_one, offset):
    head_dim = 2 * half
    q, k = _qk(batch, n_kv * group, n_kv, seq, head_dim, layout, dtype)
    position_ids = torch.arange(seq)[None] + offset
    if not cos_batch_one:
        position_ids = position_ids.expand(batch, -1)
    cos, sin = _rotary(head_dim, n_kv * group, n_kv, position_ids, dtype)
    _check(q, k, cos, sin, dtype)


def test_bad_inputs_raise_clear_errors():
    q, k = torch.randn(2, 4, 6, 64), torch.randn(2, 2, 6, 64)
    cos, sin = torch.randn(2, 6, 64), torch.randn(2, 6, 64)
    with pytest.raises(ValueError, match="shorter than the sequence"):
        apply_rope(q, k, cos[:, :5], sin[:, :5])
    with pytest.raises(ValueError, match="head_dim 32 does not match"):
        apply_rope(q, k, cos[..., :32], sin[..., :32])
    with pytest.raises(ValueError, match="batch 3 must be 1 or"):
        apply_rope(q, k, torch.randn(3, 6, 64), torch.randn(3, 6, 64))
    with pytest.raises(ValueError, match="must match q"):
        apply_rope(q, torch.randn(2, 2, 6, 32), cos, sin)
    with pytest.raises(ValueError, match=r"\[batch, heads, seq, head_dim\]"):
        apply_rope(q[0], k[0], cos, sin)
    with pytest.raises(ValueError, match="even"):
        apply_rope(torch.randn(1, 1, 2, 7), torch.randn(1, 1, 2, 7), torch.randn(1, 2, 7), torch.randn(1, 2, 7))
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        apply_rope(q.long(), k.long(), cos, sin)
    with pytest.raises(TypeError, match="cos must be"):
        apply_rope(q, k, cos.int(), sin.int())
    with pytest.raises(TypeError, match="same dtype"):
        apply_rope(q, k.half(), cos, sin)
    with pytest.raises(ValueError, match="cos/sin"):
        apply_rope(q, k, cos.requires_grad_(), sin)


def test_empty_input_returns_empty_without_launch():
    before = sum(path_counts.values())
    q_out, k_out = apply_rope(
        torch.empty(2, 4, 0, 64), torch.empty(2, 2, 0, 64), torch.empty(2, 0, 64), torch.empty(2, 0, 64)
    )
    assert q_out.shape == (2, 4, 0, 64) and k_out.shape == (2, 2, 0, 64)
    assert sum(path_counts.values()) == before


def test_fake_impl_traces_on_meta_and_under_compile():
    q = torch.empty(2, 32, 8, 8192, device="meta", dtype=torch.bfloat16).transpose(1, 2)[..., :128]
    q = torch.empty(2, 8, 32, 128, device="meta", dtype=torch.bfloat16).transpose(1, 2).requires_grad_()
    k = torch.empty(2, 8, 8, 128, device="meta", dtype=torch.bfloat16).transpose(1, 2).requires_grad_()
    cos = torch.empty(1, 8, 128, device="meta", dtype=torch.bfloat16)
    q_out, k_out = apply_rope(q, k, cos, cos)
    (q_out.sum() + k_out.sum()).backward()
    assert q_out.device.type == "meta" and q_out.shape == q.shape and q_out.stride() == q.stride()
    assert q.grad.shape == q.shape and k.grad.shape == k.shape

    def fn(a, b, c, s):
        qo, ko = apply_rope(a, b, c, s)
        return qo * 2, ko

    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    a, b = torch.randn(1, 4, 5, 64), torch.randn(1, 2, 5, 64)
    c, s = _rotary(64, 4, 2, torch.arange(5)[None], torch.float32)
    qo, ko = compiled(a, b, c, s)
    qr, kr = _hf(a, b, c, s)
    torch.testing.assert_close(qo, qr * 2, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ko, kr, rtol=1e-5, atol=1e-5)


def test_opcheck_schema_and_fake_impls():
    q, k = _qk(2, 4, 2, 7, 64, "bshd", torch.float32)
    cos, sin = torch.randn(1, 7, 64), torch.randn(1, 7, 64)
    with force_path("torch"):  # the op plumbing is path-independent; the torch path keeps this quick
        for op in (torch.ops.fastft.rope_forward, torch.ops.fastft.rope_backward):
            torch.library.opcheck(
                op, (q, k, cos, sin), test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static")
            )
