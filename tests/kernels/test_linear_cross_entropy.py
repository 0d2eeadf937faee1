import pytest
import torch

from fastft.kernels import force_path, linear_cross_entropy, linear_cross_entropy_reference, path_counts
from fastft.kernels.linear_cross_entropy import choose_chunk_size, chunk_counts, token_stats_reference
from fastft.memory import LiveBytesTracker
from tests.tolerances import BACKWARD, FORWARD, assert_close

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _inputs(lead, hidden, vocab, dtype, bias=False, ignore=(1,)):
    h = torch.randn(*lead, hidden).to(dtype)
    w = (torch.randn(vocab, hidden) / hidden**0.5 * 2).to(dtype)
    b = (torch.randn(vocab) * 0.5).to(dtype) if bias else None
    labels = torch.randint(0, vocab, lead)
    flat = labels.view(-1)
    for i in ignore:
        if i < flat.numel():
            flat[i] = -100
    flat[0] = vocab - 1
    return h, w, b, labels


def _run(fn, h, w, b, labels, dloss=None, train_w=True, **kw):
    h = h.detach().requires_grad_()
    w = w.detach().requires_grad_(train_w)
    b = None if b is None else b.detach().requires_grad_()
    loss = fn(h, w, labels, bias=b, **kw)
    wrt = [t for t in (h, w, b) if t is not None and t.requires_grad]
    grads = torch.autograd.grad(loss, wrt, dloss)
    return loss, grads


def _close_grads(grads, ref, dtype):
    for i, (g, r) in enumerate(zip(grads, ref)):
        assert g.dtype == r.dtype and g.shape == r.shape
        scale = r.float().abs().max().clamp_min(1e-3)  # summed over tokens or vocab: compare relative to scale
        assert_close(g / scale, r / scale, BACKWARD, dtype, f"grad {i}")


# (leading shape, hidden, vocab, bias, softcap, scale, chunk)
CASES = [
    ((2, 5), 48, 1001, False, None, None, 3),
    ((7,), 64, 32001, True, None, None, 4),
    ((3, 3), 32, 5003, False, 30.0, None, 4),
    ((2, 4), 40, 4097, True, 10.0, 2.0, 5),  # softcap and scale together, with bias
    ((5,), 24, 2999, False, None, 0.25, None),  # default chunk size
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_triton_matches_reference(case, dtype):
    lead, hidden, vocab, bias, softcap, scale, chunk = case
    h, w, b, labels = _inputs(lead, hidden, vocab, dtype, bias)
    kw = dict(softcap=softcap, logit_scale=scale)
    before = path_counts[("cross_entropy", "triton")], path_counts[("cross_entropy_backward", "triton")]
    loss, grads = _run(linear_cross_entropy, h, w, b, labels, chunk_size=chunk, **kw)
    n_chunks = -(-labels.numel() // (chunk or labels.numel()))
    if chunk:
        assert path_counts[("cross_entropy", "triton")] - before[0] == n_chunks
        assert path_counts[("cross_entropy_backward", "triton")] - before[1] == n_chunks
    else:
        assert path_counts[("cross_entropy", "triton")] > before[0]
    ref, ref_grads = _run(linear_cross_entropy_reference, h, w, b, labels, **kw)
    assert loss.dtype == torch.float32 and loss.shape == ()
    assert_close(loss, ref, FORWARD, dtype, "loss")
    _close_grads(grads, ref_grads, dtype)


def test_vocab_151936_few_tokens():
    h, w, b, labels = _inputs((3,), 16, 151936, torch.float32, ignore=())
    loss, grads = _run(linear_cross_entropy, h, w, b, labels, chunk_size=2)
    ref, ref_grads = _run(linear_cross_entropy_reference, h, w, b, labels)
    assert_close(loss, ref, FORWARD, torch.float32, "loss")
    _close_grads(grads, ref_grads, torch.float32)


@pytest.mark.parametrize("path", ["triton", "torch"])
@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_reductions_with_upstream_gradient(reduction, path):
    h, w, b, labels = _inputs((2, 3), 32, 3001, torch.float32, bias=True)
    dloss = torch.randn(2, 3) if reduction == "none" else torch.tensor(0.37)
    with force_path(path):
        loss, grads = _run(linear_cross_entropy, h, w, b, labels, dloss, reduction=reduction, softcap=20.0, chunk_size=4)
    ref, ref_grads = _run(linear_cross_entropy_reference, h, w, b, labels, dloss, reduction=reduction, softcap=20.0)
    assert loss.shape == ref.shape
    assert_close(loss, ref, FORWARD, torch.float32, "loss")
    _close_grads(grads, ref_grads, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_torch_path_matches_reference(dtype):
    h, w, b, labels = _inputs((3, 4), 32, 5003, dtype, bias=True)
    with force_path("torch"):
        before = path_counts[("cross_entropy", "torch")]
        loss, grads = _run(linear_cross_entropy, h, w, b, labels, softcap=30.0, logit_scale=1.5, chunk_size=5)
        assert path_counts[("cross_entropy", "torch")] == before + 3  # 12 tokens / 5 per chunk
    ref, ref_grads = _run(linear_cross_entropy_reference, h, w, b, labels, softcap=30.0, logit_scale=1.5)
    assert_close(loss, ref, FORWARD, dtype, "loss")
    _close_grads(grads, ref_grads, dtype)


@pytest.mark.parametrize("path", ["triton", "torch"])
def test_frozen_weight_costs_no_weight_gradient(path):
    """LoRA: lm_head frozen -> weight.grad stays None, no dweight chunk ran, and no [V, H] buffer was ever allocated."""
    vocab, hidden = 3001, 64
    h = torch.randn(4, 5, hidden, requires_grad=True)
    w = torch.randn(vocab, hidden) * 0.1  # frozen
    labels = torch.randint(0, vocab, (4, 5))
    before = chunk_counts["dweight_chunks"], chunk_counts["chunks"]
    with force_path(path), LiveBytesTracker() as tracker:
        loss = linear_cross_entropy(h, w, labels, chunk_size=4)
        loss.backward()
    assert w.grad is None and h.grad is not None
    assert chunk_counts["dweight_chunks"] == before[0]
    assert chunk_counts["chunks"] == before[1] + 5
    weight_bytes = vocab * hidden * 4
    # one [4, V] fp32 chunk of logits + dhidden + a few [N] vectors; a weight gradient alone would be weight_bytes
    assert tracker.peak_bytes < weight_bytes / 4, tracker.peak_bytes

    # trainable: the dweight work happens, once per chunk
    w.requires_grad_()
    linear_cross_entropy(h, w, labels, chunk_size=4).backward()
    assert chunk_counts["dweight_chunks"] == before[0] + 5 and w.grad.shape == w.shape


def test_frozen_hidden_trainable_bias_only():
    h, w, b, labels = _inputs((6,), 16, 777, torch.float32, bias=True)
    b = b.requires_grad_()
    before = chunk_counts["dweight_chunks"]
    loss = linear_cross_entropy(h, w, labels, bias=b, chunk_size=4)
    (db,) = torch.autograd.grad(loss, b)
    bref = b.detach().clone().requires_grad_()
    (db_ref,) = torch.autograd.grad(linear_cross_entropy_reference(h, w, labels, bias=bref), bref)
    assert_close(db, db_ref, BACKWARD, torch.float32)
    assert chunk_counts["dweight_chunks"] == before


def test_tied_embeddings():
    """weight is the embedding matrix: its gradient sums the embedding lookup's and the loss's contributions."""
    vocab, hidden = 1001, 32
    emb0 = torch.randn(vocab, hidden) * 0.1
    proj = torch.randn(hidden, hidden) * 0.2
    ids = torch.randint(0, vocab, (2, 6))
    labels = torch.roll(ids, -1, dims=1)
    labels[:, -1] = -100

    def step(loss_fn):
        emb = torch.nn.Embedding(vocab, hidden)
        with torch.no_grad():
            emb.weight.copy_(emb0)
        hidden_states = torch.tanh(emb(ids) @ proj)
        loss = loss_fn(hidden_states, emb.weight, labels)  # tied: lm_head weight IS emb.weight
        loss.backward()
        return loss, emb.weight.grad

    loss, grad = step(lambda hs, w, y: linear_cross_entropy(hs, w, y, chunk_size=5))
    ref, grad_ref = step(lambda hs, w, y: linear_cross_entropy_reference(hs, w, y))
    assert_close(loss, ref, FORWARD, torch.float32, "loss")
    assert_close(grad, grad_ref, BACKWARD, torch.float32, "tied weight grad")


def test_n_items_micro_batches_equal_one_large_batch():
    h, w, b, labels = _inputs((4, 5), 32, 2001, torch.float32, bias=True, ignore=(1, 6, 7, 15, 19))
    n_items = torch.tensor(int((labels != -100).sum()))
    big, big_grads = _run(linear_cross_entropy, h, w, b, labels, chunk_size=3)
    hs = h.detach().requires_grad_()
    ws = w.detach().requires_grad_()
    bs = b.detach().requires_grad_()
    total = 0.0
    for i in range(4):  # 4 micro-batches, gradients accumulate in .grad as a Trainer's would
        loss = linear_cross_entropy(hs[i], ws, labels[i], bias=bs, n_items=n_items, chunk_size=3)
        loss.backward()
        total = total + loss.detach()
    assert_close(total, big, FORWARD, torch.float32, "accumulated loss")
    _close_grads([hs.grad, ws.grad, bs.grad], big_grads, torch.float32)


@pytest.mark.parametrize("path", ["triton", "torch"])
def test_all_ignored_is_zero_not_nan(path):
    h, w, b, _ = _inputs((2, 3), 16, 500, torch.float32)
    labels = torch.full((2, 3), -100)
    with force_path(path):
        for reduction in ("mean", "sum"):
            loss, (dh, dw) = _run(linear_cross_entropy, h, w, None, labels, reduction=reduction, chunk_size=4)
            assert loss.item() == 0.0
            assert dh.abs().max() == 0 and dw.abs().max() == 0


def test_loss_under_no_grad_does_no_gradient_work():
    h, w, b, labels = _inputs((5,), 16, 600, torch.float32)
    h.requires_grad_()
    w.requires_grad_()
    before = path_counts[("cross_entropy_backward", "triton")] + path_counts[("cross_entropy_backward", "torch")]
    with torch.no_grad():
        loss = linear_cross_entropy(h, w, labels)
    assert torch.isfinite(loss)
    after = path_counts[("cross_entropy_backward", "triton")] + path_counts[("cross_entropy_backward", "torch")]
    assert after == before


def test_bad_inputs_raise_before_any_kernel():
    h, w, _, labels = _inputs((2, 3), 16, 100, torch.float32)
    before = sum(path_counts.values()), chunk_counts["chunks"]
    bad = labels.clone()
    bad[1, 2] = 100
    with pytest.raises(ValueError, match=r"outside \[0, 100\)"):
        linear_cross_entropy(h, w, bad)
    bad[1, 2] = -7
    with pytest.raises(ValueError, match="not ignore_index"):
        linear_cross_entropy(h, w, bad)
    with pytest.raises(ValueError, match="leading shape"):
        linear_cross_entropy(h, w, labels.view(-1))
    with pytest.raises(ValueError, match=r"weight \[V, H\]"):
        linear_cross_entropy(h, w[:, :8], labels)
    with pytest.raises(TypeError, match="bfloat16"):
        linear_cross_entropy(h, w.bfloat16(), labels)
    with pytest.raises(ValueError, match="bias"):
        linear_cross_entropy(h, w, labels, bias=torch.zeros(99))
    with pytest.raises(TypeError, match="integer"):
        linear_cross_entropy(h, w, labels.float())
    with pytest.raises(ValueError, match="chunk_size"):
        linear_cross_entropy(h, w, labels, chunk_size=0)
    assert (sum(path_counts.values()), chunk_counts["chunks"]) == before, "work ran before the input was rejected"


def test_empty_batch_returns_zero_without_launch():
    before = sum(path_counts.values()), chunk_counts["chunks"]
    h = torch.empty(0, 7, 16, requires_grad=True)
    w = torch.randn(50, 16, requires_grad=True)
    loss = linear_cross_entropy(h, w, torch.empty(0, 7, dtype=torch.long))
    loss.backward()
    assert loss.item() == 0.0 and h.grad.shape == h.shape
    assert (sum(path_counts.values()), chunk_counts["chunks"]) == before


def test_chunk_size_choice():
    # logits chunk about as large as hidden: 4096 tokens x 1024 hidden over a 128,256 vocab -> 33 -> 64 rows
    assert choose_chunk_size(4096, 1024, 128256, torch.float32, torch.device("cpu")) == 64
    assert choose_chunk_size(65536, 4096, 32000, torch.bfloat16, torch.device("cpu")) == 16384
    assert choose_chunk_size(10, 4096, 32000, torch.bfloat16, torch.device("cpu")) == 10


def test_fake_impl_traces_on_meta_and_under_compile():
    h = torch.empty(2, 1024, 256, device="meta", dtype=torch.bfloat16, requires_grad=True)
    w = torch.empty(262144, 256, device="meta", dtype=torch.bfloat16, requires_grad=True)
    labels = torch.empty(2, 1024, device="meta", dtype=torch.long)
    loss = linear_cross_entropy(h, w, labels, softcap=30.0)
    loss.backward()
    assert loss.device.type == "meta" and h.grad.shape == h.shape and w.grad.shape == w.shape

    compiled = torch.compile(
        lambda a, b, c: linear_cross_entropy(a, b, c, chunk_size=2) * 2, backend="aot_eager", fullgraph=True
    )
    a = torch.randn(5, 16, requires_grad=True)
    b = torch.randn(40, 16, requires_grad=True)
    c = torch.randint(0, 40, (5,))
    out = compiled(a, b, c)
    out.backward()
    torch.testing.assert_close(out, linear_cross_entropy_reference(a, b, c) * 2, rtol=1e-5, atol=1e-5)
    a2, b2 = a.detach().requires_grad_(), b.detach().requires_grad_()
    (linear_cross_entropy_reference(a2, b2, c) * 2).backward()
    torch.testing.assert_close(a.grad, a2.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(b.grad, b2.grad, rtol=1e-4, atol=1e-6)


def test_autocast_casts_like_f_linear():
    """Mixed precision: fp32 hidden and lm_head under bf16 autocast compute in bf16, the fp32 weight gets fp32 grads."""
    h, w, _, labels = _inputs((2, 4), 32, 1001, torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, (dh, dw) = _run(linear_cross_entropy, h, w, None, labels, chunk_size=3)
        ref, (dh_ref, dw_ref) = _run(linear_cross_entropy_reference, h, w, None, labels)
    assert dh.dtype == torch.float32 and dw.dtype == torch.float32
    assert_close(loss, ref, FORWARD, torch.bfloat16, "loss")
    _close_grads([dh, dw], [dh_ref, dw_ref], torch.bfloat16)
    with pytest.raises(TypeError, match="autocast"):  # without autocast a dtype mismatch is an error
        linear_cross_entropy(h, w.bfloat16(), labels)


def test_second_backward_through_same_graph_fails_loudly():
    """The backward scales the precomputed gradients in place; a retain_graph re-run must not return wrong grads."""
    h, w, _, labels = _inputs((6,), 16, 300, torch.float32)
    h.requires_grad_()
    loss = linear_cross_entropy(h, w, labels)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="inplace"):
        loss.backward()


# ---------------------------------------------------------------------------------------------------------------------
# Loss options and token statistics
# ---------------------------------------------------------------------------------------------------------------------
# (leading shape, hidden, vocab, bias, label_smoothing, lse_square_scale, class weights, softcap, chunk)
OPTION_CASES = [
    ((2, 5), 48, 1001, False, 0.1, 0.0, False, None, 3),
    ((7,), 32, 4099, True, 0.0, 1e-3, False, None, 4),
    ((3, 3), 24, 3001, False, 0.0, 0.0, True, None, 4),
    ((2, 4), 40, 2003, True, 0.2, 1e-2, True, 10.0, 5),  # everything together, with a softcap and a bias
]


# The per-row option math is cross_entropy's (tested there in every dtype); here each case runs in fp32 on both paths,
# and the case with every option in every dtype under the interpreter (the interpreter is what costs time).
OPTION_RUNS = [(case, torch.float32, path) for case in OPTION_CASES for path in ("triton", "torch")] + [
    (OPTION_CASES[-1], dtype, "triton") for dtype in (torch.bfloat16, torch.float16)
]


@pytest.mark.parametrize("case,dtype,path", OPTION_RUNS, ids=str)
def test_loss_options_match_torch(case, dtype, path):
    """F.cross_entropy(weight=, label_smoothing=) + z-loss on the full logits is the oracle, every reduction."""
    lead, hidden, vocab, bias, smoothing, z_scale, weighted, softcap, chunk = case
    h, w, b, labels = _inputs(lead, hidden, vocab, dtype, bias)
    kw = dict(
        label_smoothing=smoothing,
        lse_square_scale=z_scale,
        softcap=softcap,
        class_weight=(torch.rand(vocab) * 2 + 0.1) if weighted else None,
    )
    for reduction in ("mean", "sum", "none"):
        dloss = torch.randn(lead) if reduction == "none" else torch.tensor(0.37)
        with force_path(path):
            before = path_counts[("cross_entropy", path)]
            loss, grads = _run(linear_cross_entropy, h, w, b, labels, dloss, reduction=reduction, chunk_size=chunk, **kw)
            assert path_counts[("cross_entropy", path)] > before
        ref, ref_grads = _run(linear_cross_entropy_reference, h, w, b, labels, dloss, reduction=reduction, **kw)
        assert loss.shape == ref.shape
        assert_close(loss, ref, FORWARD, dtype, f"{reduction} loss")
        _close_grads(grads, ref_grads, dtype)


def test_loss_options_n_items_micro_batches_equal_one_large_batch():
    h, w, b, labels = _inputs((4, 5), 32, 2001, torch.float32, bias=True, ignore=(1, 6, 7, 15, 19))
    kw = dict(label_smoothing=0.1, lse_square_scale=1e-3)
    n_items = torch.tensor(int((labels != -100).sum()))
    big, big_grads = _run(linear_cross_entropy, h, w, b, labels, chunk_size=3, **kw)
    hs, ws, bs = (t.detach().requires_grad_() for t in (h, w, b))
    total = 0.0
    for i in range(4):
        loss = linear_cross_entropy(hs[i], ws, labels[i], bias=bs, n_items=n_items, chunk_size=3, **kw)
        loss.backward()
        total = total + loss.detach()
    assert_close(total, big, FORWARD, torch.float32, "accumulated loss")
    _close_grads([hs.grad, ws.grad, bs.grad], big_grads, torch.float32)


@pytest.mark.parametrize("path", ["triton", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_token_stats_equal_full_logits_in_the_same_pass(dtype, path):
    """return_token_stats: entropy and top-1 from the loss's own chunks (no extra chunk pass), equal to the full-logits
    reference; the loss and its gradients are unchanged by asking for them."""
    h, w, b, labels = _inputs((3, 7), 32, 3001, dtype, bias=True, ignore=(1, 8, 20))
    labels[0, 3] = (h[0, 3].float() @ w.float().T + b.float()).argmax()  # a sure top-1 hit
    with force_path(path):
        before = chunk_counts["chunks"]
        out, grads = _run(
            lambda *a, **k: linear_cross_entropy(*a, **k, return_token_stats=True).loss, h, w, b, labels, chunk_size=8
        )
        stats = linear_cross_entropy(h, w, labels, bias=b, chunk_size=8, return_token_stats=True)
        assert chunk_counts["chunks"] - before == 2 * 3  # 21 tokens / 8 per chunk, twice: one GEMM per chunk each
        plain, plain_grads = _run(linear_cross_entropy, h, w, b, labels, chunk_size=8)
    entropy, top1 = token_stats_reference(h, w, labels, bias=b)
    assert stats.entropy.shape == labels.shape and stats.is_top1.dtype == torch.bool
    assert torch.equal(stats.is_top1, top1) and top1[0, 3] and not stats.is_top1.view(-1)[[1, 8, 20]].any()
    torch.testing.assert_close(stats.entropy, entropy, rtol=1e-5, atol=1e-5)
    assert stats.entropy.view(-1)[[1, 8, 20]].eq(0).all() and not stats.entropy.requires_grad
    assert torch.equal(out, plain) and all(torch.equal(a, c) for a, c in zip(grads, plain_grads))


def test_loss_options_bad_input_and_meta():
    h, w, _, labels = _inputs((2, 3), 16, 100, torch.float32)
    before = sum(path_counts.values()), chunk_counts["chunks"]
    with pytest.raises(ValueError, match="label_smoothing"):
        linear_cross_entropy(h, w, labels, label_smoothing=-0.1)
    with pytest.raises(ValueError, match="lse_square_scale"):
        linear_cross_entropy(h, w, labels, lse_square_scale=float("nan"))
    with pytest.raises(ValueError, match="class_weight"):
        linear_cross_entropy(h, w, labels, class_weight=torch.ones(101))
    assert (sum(path_counts.values()), chunk_counts["chunks"]) == before
    hm = torch.empty(2, 64, 32, device="meta", dtype=torch.bfloat16, requires_grad=True)
    wm = torch.empty(50000, 32, device="meta", dtype=torch.bfloat16)
    out = linear_cross_entropy(
        hm,
        wm,
        torch.empty(2, 64, device="meta", dtype=torch.long),
        label_smoothing=0.1,
        lse_square_scale=1e-4,
        class_weight=torch.empty(50000, device="meta"),
        return_token_stats=True,
    )
    out.loss.backward()
    assert out.entropy.shape == (2, 64) and out.is_top1.dtype == torch.bool and hm.grad.shape == hm.shape
