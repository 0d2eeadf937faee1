import pytest
import torch
from trl.trainer.utils import entropy_from_logits
from trl.trainer.utils import selective_log_softmax as trl_selective_log_softmax

from fastft.kernels import force_path, path_counts, selective_log_softmax, selective_log_softmax_reference
from fastft.kernels.linear_cross_entropy import chunk_counts
from tests.tolerances import BACKWARD, FORWARD, assert_close

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _inputs(b, t, hidden, vocab, dtype, bias=False):
    h = torch.randn(b, t, hidden).to(dtype)
    w = (torch.randn(vocab, hidden) / hidden**0.5 * 2).to(dtype)
    bb = (torch.randn(vocab) * 0.5).to(dtype) if bias else None
    ids = torch.randint(0, vocab, (b, t))
    ids[0, 0] = vocab - 1
    return h, w, bb, ids


def _run(fn, h, w, b, ids, entropy, train_w=True, **kw):
    h = h.detach().requires_grad_()
    w = w.detach().requires_grad_(train_w)
    b = None if b is None else b.detach().requires_grad_()
    out = fn(h, w, ids, bias=b, return_entropy=entropy, **kw)
    torch.manual_seed(1)
    logp, ent = out if entropy else (out, None)
    objective = (logp * torch.randn_like(logp)).sum()
    if entropy:
        objective = objective + (ent * torch.randn_like(ent)).sum()
    wrt = [t for t in (h, w, b) if t is not None and t.requires_grad]
    return logp, ent, torch.autograd.grad(objective, wrt)


def _close_grads(grads, ref, dtype):
    for i, (g, r) in enumerate(zip(grads, ref)):
        assert g.dtype == r.dtype and g.shape == r.shape
        scale = r.float().abs().max().clamp_min(1e-3)
        assert_close(g / scale, r / scale, BACKWARD, dtype, f"grad {i}")


# (b, t, hidden, vocab, bias, temperature, softcap, scale, entropy, chunk)
CASES = [
    (2, 3, 48, 1001, False, 1.0, None, None, False, 4),
    (1, 5, 32, 32001, False, 0.7, None, None, True, 2),
    (2, 2, 40, 5003, True, 0.9, 30.0, None, True, 3),
    (3, 2, 24, 4097, False, 1.3, 10.0, 2.0, True, None),  # temperature, softcap and scale together
    (2, 3, 16, 2999, True, 1.0, None, 0.5, False, 5),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_triton_matches_reference(case, dtype):
    b, t, hidden, vocab, bias, temperature, softcap, scale, entropy, chunk = case
    h, w, bb, ids = _inputs(b, t, hidden, vocab, dtype, bias)
    kw = dict(temperature=temperature, softcap=softcap, logit_scale=scale)
    before = path_counts[("cross_entropy", "triton")], path_counts[("cross_entropy_backward", "triton")]
    logp, ent, grads = _run(selective_log_softmax, h, w, bb, ids, entropy, chunk_size=chunk, **kw)
    assert path_counts[("cross_entropy", "triton")] > before[0]
    assert path_counts[("cross_entropy_backward", "triton")] > before[1]
    ref, ent_ref, ref_grads = _run(selective_log_softmax_reference, h, w, bb, ids, entropy, **kw)
    assert logp.dtype == torch.float32 and logp.shape == (b, t)
    assert_close(logp, ref, FORWARD, dtype, "logp")
    if entropy:
        assert ent.dtype == torch.float32 and ent.shape == (b, t)
        assert_close(ent, ent_ref, FORWARD, dtype, "entropy")
    _close_grads(grads, ref_grads, dtype)


def test_vocab_151936_few_tokens():
    h, w, bb, ids = _inputs(1, 3, 16, 151936, torch.float32)
    logp, ent, grads = _run(selective_log_softmax, h, w, bb, ids, True, chunk_size=2, temperature=0.8)
    ref, ent_ref, ref_grads = _run(selective_log_softmax_reference, h, w, bb, ids, True, temperature=0.8)
    assert_close(logp, ref, FORWARD, torch.float32, "logp")
    assert_close(ent, ent_ref, FORWARD, torch.float32, "entropy")
    _close_grads(grads, ref_grads, torch.float32)


def test_matches_trl_on_full_logits():
    """TRL 1.16's own functions on logits / temperature are the semantics the GRPO integration relies on."""
    h, w, _, ids = _inputs(2, 4, 32, 3001, torch.float32)
    logp, ent = selective_log_softmax(h, w, ids, temperature=0.7, return_entropy=True, chunk_size=3)
    logits = (h @ w.T) / 0.7
    torch.testing.assert_close(logp, trl_selective_log_softmax(logits, ids), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent, entropy_from_logits(logits), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_torch_path_matches_reference(dtype):
    h, w, bb, ids = _inputs(2, 5, 32, 5003, dtype, bias=True)
    kw = dict(temperature=0.9, softcap=30.0, logit_scale=1.5)
    with force_path("torch"):
        before = path_counts[("cross_entropy", "torch")]
        logp, ent, grads = _run(selective_log_softmax, h, w, bb, ids, True, chunk_size=4, **kw)
        assert path_counts[("cross_entropy", "torch")] - before == 3 + 3  # forward and recompute, 10 tokens / 4
    ref, ent_ref, ref_grads = _run(selective_log_softmax_reference, h, w, bb, ids, True, **kw)
    assert_close(logp, ref, FORWARD, dtype, "logp")
    assert_close(ent, ent_ref, FORWARD, dtype, "entropy")
    _close_grads(grads, ref_grads, dtype)


def test_frozen_weight_and_no_grad():
    h, w, _, ids = _inputs(2, 3, 16, 700, torch.float32)
    before = chunk_counts["dweight_chunks"], path_counts[("cross_entropy_backward", "triton")]
    hh = h.clone().requires_grad_()
    selective_log_softmax(hh, w, ids, chunk_size=2).sum().backward()  # LoRA: weight frozen
    assert hh.grad is not None and w.grad is None
    assert chunk_counts["dweight_chunks"] == before[0]
    with torch.no_grad():  # old / reference policy log-probs: no gradient work at all
        logp = selective_log_softmax(hh, w.requires_grad_(), ids)
    assert not logp.requires_grad
    assert path_counts[("cross_entropy_backward", "triton")] == before[1] + 3  # only the backward above, 3 chunks


def test_bad_inputs_raise_before_any_kernel():
    h, w, _, ids = _inputs(2, 3, 16, 100, torch.float32)
    before = sum(path_counts.values())
    bad = ids.clone()
    bad[0, 1] = 100
    with pytest.raises(ValueError, match=r"outside \[0, 100\)"):
        selective_log_softmax(h, w, bad)
    bad[0, 1] = -100  # there is no ignore_index here: mask the result instead
    with pytest.raises(ValueError, match=r"outside \[0, 100\)"):
        selective_log_softmax(h, w, bad)
    with pytest.raises(ValueError, match=r"\[B, T, H\]"):
        selective_log_softmax(h[0], w, ids[0])
    with pytest.raises(ValueError, match=r"\[B, T\]"):
        selective_log_softmax(h, w, ids[:, :2])
    with pytest.raises(TypeError, match="float16"):
        selective_log_softmax(h, w.half(), ids)
    with pytest.raises(ValueError, match="temperature"):
        selective_log_softmax(h, w, ids, temperature=0.0)
    assert sum(path_counts.values()) == before


def test_empty_batch_returns_zero_without_launch():
    before = sum(path_counts.values())
    logp, ent = selective_log_softmax(
        torch.empty(2, 0, 8), torch.randn(10, 8), torch.empty(2, 0, dtype=torch.long), return_entropy=True
    )
    assert logp.shape == (2, 0) and ent.shape == (2, 0)
    assert sum(path_counts.values()) == before


def test_fake_impl_traces_on_meta_and_under_compile():
    h = torch.empty(2, 512, 256, device="meta", dtype=torch.bfloat16, requires_grad=True)
    w = torch.empty(151936, 256, device="meta", dtype=torch.bfloat16)
    ids = torch.empty(2, 512, device="meta", dtype=torch.long)
    logp, ent = selective_log_softmax(h, w, ids, return_entropy=True, temperature=0.7)
    (logp.sum() + ent.sum()).backward()
    assert logp.shape == (2, 512) and logp.dtype == torch.float32 and h.grad.shape == h.shape

    compiled = torch.compile(
        lambda a, b, c: selective_log_softmax(a, b, c, temperature=0.5, chunk_size=2), backend="aot_eager", fullgraph=True
    )
    a = torch.randn(2, 3, 16, requires_grad=True)
    b = torch.randn(40, 16)
    c = torch.randint(0, 40, (2, 3))
    out = compiled(a, b, c)
    out.sum().backward()
    torch.testing.assert_close(out, selective_log_softmax_reference(a, b, c, temperature=0.5), rtol=1e-5, atol=1e-5)
    a2 = a.detach().requires_grad_()
    selective_log_softmax_reference(a2, b, c, temperature=0.5).sum().backward()
    torch.testing.assert_close(a.grad, a2.grad, rtol=1e-4, atol=1e-6)
