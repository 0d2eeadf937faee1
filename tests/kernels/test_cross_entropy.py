import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fastft.kernels import cross_entropy, cross_entropy_reference, force_path, path_counts
from fastft.kernels.cross_entropy import vocab_block
from tests.tolerances import BACKWARD, FORWARD, assert_close

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (rows, vocab, softcap, logit_scale): vocabs that are not multiples of the 4,096-column block, one below a block
CASES = [
    (7, 1000, None, None),
    (5, 32001, None, None),
    (4, 5003, 30.0, None),
    (6, 4097, None, 0.0625),
    (3, 9001, 10.0, 2.5),  # softcap and scale together
]


def _inputs(rows, vocab, dtype, ignore_rows=(1,)):
    logits = (torch.randn(rows, vocab) * 4).to(dtype)
    labels = torch.randint(0, vocab, (rows,))
    for r in ignore_rows:
        if r < rows:
            labels[r] = -100
    labels[0] = vocab - 1  # the last column, in the final partial block
    return logits, labels


def _run(fn, logits, labels, dloss=None, **kw):
    x = logits.detach().requires_grad_()
    loss = fn(x, labels, **kw)
    (dx,) = torch.autograd.grad(loss, x, dloss)
    return loss, dx


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_triton_matches_reference(case, dtype):
    rows, vocab, softcap, scale = case
    logits, labels = _inputs(rows, vocab, dtype)
    kw = dict(softcap=softcap, logit_scale=scale)
    before = path_counts[("cross_entropy", "triton")], path_counts[("cross_entropy_backward", "triton")]
    loss, dx = _run(cross_entropy, logits, labels, **kw)
    assert (path_counts[("cross_entropy", "triton")], path_counts[("cross_entropy_backward", "triton")]) == (
        before[0] + 1,
        before[1] + 1,
    ), "the Triton kernels did not run"
    ref, dx_ref = _run(cross_entropy_reference, logits, labels, **kw)
    assert loss.dtype == torch.float32 and dx.dtype == dtype
    # both sides see the same input-dtype logits upcast to fp32, so the loss is fp32-accurate in every dtype
    assert_close(loss, ref, FORWARD, torch.float32, "loss")
    assert_close(dx, dx_ref, BACKWARD, dtype, "dlogits")
    assert dx[1].abs().max() == 0  # ignored row


def test_vocab_151936_few_tokens():
    logits, labels = _inputs(2, 151936, torch.float32, ignore_rows=())
    loss, dx = _run(cross_entropy, logits, labels, softcap=30.0)
    ref, dx_ref = _run(cross_entropy_reference, logits, labels, softcap=30.0)
    assert_close(loss, ref, FORWARD, torch.float32, "loss")
    assert_close(dx, dx_ref, BACKWARD, torch.float32, "dlogits")


@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_reductions_with_upstream_gradient(reduction):
    logits, labels = _inputs(6, 3001, torch.float32)
    dloss = torch.randn(6) if reduction == "none" else torch.tensor(0.37)
    loss, dx = _run(cross_entropy, logits, labels, dloss, reduction=reduction, logit_scale=0.5)
    ref, dx_ref = _run(cross_entropy_reference, logits, labels, dloss, reduction=reduction, logit_scale=0.5)
    assert loss.shape == ref.shape
    assert_close(loss, ref, FORWARD, torch.float32, "loss")
    assert_close(dx, dx_ref, BACKWARD, torch.float32, "dlogits")


def test_torch_path_matches_reference():
    logits, labels = _inputs(9, 5003, torch.bfloat16)
    with force_path("torch"):
        before = path_counts[("cross_entropy", "torch")]
        loss, dx = _run(cross_entropy, logits, labels, softcap=20.0, logit_scale=1.5)
        assert path_counts[("cross_entropy", "torch")] == before + 1
    ref, dx_ref = _run(cross_entropy_reference, logits, labels, softcap=20.0, logit_scale=1.5)
    assert_close(loss, ref, FORWARD, torch.float32, "loss")
    assert_close(dx, dx_ref, BACKWARD, torch.bfloat16, "dlogits")


@pytest.mark.parametrize("path", ["triton", "torch"])
def test_all_ignored_is_zero_not_nan(path):
    logits = torch.randn(4, 1000)
    labels = torch.full((4,), -100)
    with force_path(path):
        for reduction in ("mean", "sum"):
            loss, dx = _run(cross_entropy, logits, labels, reduction=reduction)
            assert loss.item() == 0.0 and torch.isfinite(dx).all() and dx.abs().max() == 0
        loss = cross_entropy(logits, labels, reduction="none")
        assert torch.equal(loss, torch.zeros(4))
    # torch itself says NaN for mean: the documented difference
    assert torch.isnan(cross_entropy_reference(logits, labels))


def test_n_items_micro_batches_equal_one_large_batch():
    logits, labels = _inputs(16, 2000, torch.float32, ignore_rows=(1, 5, 6, 13))
    n_items = int((labels != -100).sum())
    big_loss, big_dx = _run(cross_entropy, logits, labels)
    total, grads = 0.0, []
    for part in range(4):
        rows = slice(4 * part, 4 * part + 4)
        loss, dx = _run(cross_entropy, logits[rows], labels[rows], n_items=torch.tensor(n_items))
        total = total + loss
        grads.append(dx)
    assert_close(total, big_loss, FORWARD, torch.float32, "accumulated loss")
    assert_close(torch.cat(grads), big_dx, BACKWARD, torch.float32, "accumulated grads")
    # and transformers' semantics: sum / num_items_in_batch
    ref = cross_entropy_reference(logits[:4], labels[:4], n_items=n_items)
    assert_close(cross_entropy(logits[:4], labels[:4], n_items=n_items), ref, FORWARD, torch.float32)


def test_extreme_logits_are_stable():
    logits = torch.randn(3, 5000) * 1e4
    labels = torch.tensor([0, 4999, 17])
    loss, dx = _run(cross_entropy, logits, labels, reduction="sum")
    ref, dx_ref = _run(cross_entropy_reference, logits, labels, reduction="sum")
    assert torch.isfinite(loss) and torch.isfinite(dx).all()
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-2)
    assert_close(dx, dx_ref, BACKWARD, torch.float32)


def test_non_contiguous_rows():
    base = torch.randn(5, 3000)
    logits = base[:, :2000]  # row stride 3000
    labels = torch.randint(0, 2000, (5,))
    loss, dx = _run(cross_entropy, logits, labels)
    ref, dx_ref = _run(cross_entropy_reference, logits, labels)
    assert_close(loss, ref, FORWARD, torch.float32)
    assert_close(dx, dx_ref, BACKWARD, torch.float32)


def test_gradient_never_overwrites_the_callers_logits():
    logits, labels = _inputs(4, 1000, torch.float32)
    x = logits.clone().requires_grad_()
    cross_entropy(x, labels).backward()
    assert torch.equal(x.detach(), logits)


@settings(max_examples=15, deadline=None)
@given(
    rows=st.integers(1, 5),
    vocab=st.integers(1, 5000),
    dtype=st.sampled_from(DTYPES),
    softcap=st.sampled_from([None, 15.0]),
    scale=st.sampled_from([None, 0.3]),
)
def test_fuzz(rows, vocab, dtype, softcap, scale):
    logits = (torch.randn(rows, vocab) * 3).to(dtype)
    labels = torch.randint(0, vocab, (rows,))
    loss, dx = _run(cross_entropy, logits, labels, softcap=softcap, logit_scale=scale, reduction="sum")
    ref, dx_ref = _run(cross_entropy_reference, logits, labels, softcap=softcap, logit_scale=scale, reduction="sum")
    assert_close(loss, ref, FORWARD, torch.float32, "loss")
    assert_close(dx, dx_ref, BACKWARD, dtype, "dlogits")


def test_bad_inputs_raise_before_any_kernel():
    before = sum(path_counts.values())
    logits = torch.randn(3, 100)
    for bad in (torch.tensor([0, 100, 1]), torch.tensor([0, -1, 1]), torch.tensor([5, -101, 1])):
        with pytest.raises(ValueError, match=r"outside \[0, 100\)"):
            cross_entropy(logits, bad)
    with pytest.raises(TypeError, match="integer"):
        cross_entropy(logits, torch.zeros(3))
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        cross_entropy(torch.ones(3, 100, dtype=torch.int64), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[N, V\]"):
        cross_entropy(logits, torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[N, V\]"):
        cross_entropy(logits[None], torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="reduction"):
        cross_entropy(logits, torch.zeros(3, dtype=torch.long), reduction="avg")
    with pytest.raises(ValueError, match="n_items"):
        cross_entropy(logits, torch.zeros(3, dtype=torch.long), reduction="none", n_items=3)
    with pytest.raises(ValueError, match="softcap"):
        cross_entropy(logits, torch.zeros(3, dtype=torch.long), softcap=0.0)
    assert sum(path_counts.values()) == before, "a kernel ran before the input was rejected"


def test_empty_batch_returns_zero_without_launch():
    before = sum(path_counts.values())
    x = torch.empty(0, 100, requires_grad=True)
    loss = cross_entropy(x, torch.empty(0, dtype=torch.long))
    loss.backward()
    assert loss.item() == 0.0 and x.grad.shape == (0, 100)
    assert cross_entropy(x, torch.empty(0, dtype=torch.long), reduction="none").shape == (0,)
    assert sum(path_counts.values()) == before


def test_vocab_block_is_bounded():
    assert vocab_block(262144) == (4096, 8)
    assert vocab_block(1000) == (1024, 4)


def test_fake_impl_traces_on_meta_and_under_compile():
    x = torch.empty(8, 262144, device="meta", dtype=torch.bfloat16, requires_grad=True)
    labels = torch.empty(8, device="meta", dtype=torch.long)
    loss = cross_entropy(x, labels, softcap=30.0)
    loss.backward()
    assert loss.shape == () and loss.device.type == "meta" and x.grad.shape == x.shape

    compiled = torch.compile(lambda a, b: cross_entropy(a, b, logit_scale=0.5) * 2, backend="aot_eager", fullgraph=True)
    a = torch.randn(3, 40, requires_grad=True)
    b = torch.randint(0, 40, (3,))
    out = compiled(a, b)
    out.backward()
    torch.testing.assert_close(out, cross_entropy_reference(a, b, logit_scale=0.5) * 2, rtol=1e-5, atol=1e-5)
    assert a.grad is not None and torch.isfinite(a.grad).all()


def test_bf16_grad_rounds_like_the_torch_path():
    """The bf16 dlogits store rounds to nearest even under the interpreter (cast_rne), as on a GPU and in torch.
    At the same lse the only difference left is the fp32 exp (numpy vs torch's vectorized one, an ulp at most):
    >= 99.9% of gradients are bit-identical (a truncating store leaves about half) and none is off by > 1 ulp."""
    from fastft.kernels.cross_entropy import CrossEntropyOptions, cross_entropy_backward, cross_entropy_forward

    logits, labels = _inputs(16, 4099, torch.bfloat16)
    dloss = torch.full((16,), 1 / 16)
    for softcap in (None, 30.0):
        opts = CrossEntropyOptions(softcap=softcap).op_kwargs()
        with force_path("triton"):
            lse, _, _ = cross_entropy_forward(logits, labels, None, **opts)
            dx = cross_entropy_backward(logits, labels, lse, dloss, dloss, None, None, **opts)
        with force_path("torch"):
            dx_t = cross_entropy_backward(logits, labels, lse, dloss, dloss, None, None, **opts)
        same = (dx == dx_t).float().mean().item()
        assert same >= 0.999, f"softcap={softcap}: only {same:.2%} of bf16 gradients are bit-identical"
        ordered = [torch.where(i < 0, -32768 - i, i) for i in (dx.view(torch.int16).int(), dx_t.view(torch.int16).int())]
        assert int((ordered[0] - ordered[1]).abs().max()) <= 1, f"softcap={softcap}: a gradient is off by > 1 ulp"


# ---------------------------------------------------------------------------------------------------------------------
# Loss options (Liger's fused-CE options): label smoothing, z-loss (lse_square_scale), class weights
# ---------------------------------------------------------------------------------------------------------------------
# (rows, vocab, label_smoothing, lse_square_scale, class weights, softcap): odd vocabs, one across the 4,096 block
OPTION_CASES = [
    (7, 1000, 0.1, 0.0, False, None),
    (5, 4099, 0.0, 1e-3, False, None),
    (6, 3001, 0.0, 0.0, True, None),
    (4, 5003, 0.2, 1e-2, True, 30.0),  # all three together, with a softcap
]


def _class_weight(vocab):
    return torch.rand(vocab) * 2 + 0.1


@pytest.mark.parametrize("path", ["triton", "torch"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", OPTION_CASES, ids=str)
def test_loss_options_match_torch(case, dtype, path):
    """F.cross_entropy(weight=, label_smoothing=) + the z-loss term is the oracle, forward and backward."""
    rows, vocab, smoothing, z_scale, weighted, softcap = case
    logits, labels = _inputs(rows, vocab, dtype)
    kw = dict(
        label_smoothing=smoothing,
        lse_square_scale=z_scale,
        softcap=softcap,
        class_weight=_class_weight(vocab) if weighted else None,
    )
    for reduction in ("mean", "sum", "none"):
        dloss = torch.randn(rows) if reduction == "none" else torch.tensor(0.37)
        with force_path(path):
            before = path_counts[("cross_entropy_backward", path)]
            loss, dx = _run(cross_entropy, logits, labels, dloss, reduction=reduction, **kw)
            assert path_counts[("cross_entropy_backward", path)] == before + 1
        ref, dx_ref = _run(cross_entropy_reference, logits, labels, dloss, reduction=reduction, **kw)
        assert loss.shape == ref.shape and dx.dtype == dtype
        assert_close(loss, ref, FORWARD, torch.float32, f"{reduction} loss")
        assert_close(dx, dx_ref, BACKWARD, dtype, f"{reduction} dlogits")
        assert dx[1].abs().max() == 0  # the ignored row: no smoothing, z-loss or weight reaches it


def test_loss_options_with_n_items_and_all_ignored():
    logits, labels = _inputs(8, 2001, torch.float32, ignore_rows=(1, 4))
    kw = dict(label_smoothing=0.1, lse_square_scale=1e-3, class_weight=_class_weight(2001))
    loss, dx = _run(cross_entropy, logits, labels, n_items=torch.tensor(11), **kw)
    ref, dx_ref = _run(cross_entropy_reference, logits, labels, n_items=11, **kw)
    assert_close(loss, ref, FORWARD, torch.float32, "loss / n_items")
    assert_close(dx, dx_ref, BACKWARD, torch.float32, "dlogits / n_items")
    # every row ignored, or every target weighing 0: 0 with zero gradients, never NaN
    for labels_, weight in ((torch.full((8,), -100), kw["class_weight"]), (labels, torch.zeros(2001))):
        loss, dx = _run(cross_entropy, logits, labels_, **{**kw, "class_weight": weight, "lse_square_scale": 0.0})
        assert loss.item() == 0.0 and dx.abs().max() == 0


@settings(max_examples=10, deadline=None)
@given(
    rows=st.integers(1, 5),
    vocab=st.integers(1, 5000),
    smoothing=st.sampled_from([0.0, 0.05, 1.0]),
    z_scale=st.sampled_from([0.0, 1e-4]),
    weighted=st.booleans(),
    reduction=st.sampled_from(["mean", "sum"]),
)
def test_fuzz_options(rows, vocab, smoothing, z_scale, weighted, reduction):
    logits = torch.randn(rows, vocab) * 3
    labels = torch.randint(0, vocab, (rows,))
    kw = dict(
        label_smoothing=smoothing,
        lse_square_scale=z_scale,
        reduction=reduction,
        class_weight=_class_weight(vocab) if weighted else None,
    )
    loss, dx = _run(cross_entropy, logits, labels, **kw)
    ref, dx_ref = _run(cross_entropy_reference, logits, labels, **kw)
    assert_close(loss, ref, FORWARD, torch.float32, "loss")
    assert_close(dx, dx_ref, BACKWARD, torch.float32, "dlogits")


def test_bad_options_raise_before_any_kernel():
    before = sum(path_counts.values())
    logits, labels = torch.randn(3, 100), torch.zeros(3, dtype=torch.long)
    with pytest.raises(ValueError, match="label_smoothing"):
        cross_entropy(logits, labels, label_smoothing=1.5)
    with pytest.raises(ValueError, match="lse_square_scale"):
        cross_entropy(logits, labels, lse_square_scale=-1e-4)
    with pytest.raises(ValueError, match=r"class_weight must be \[100\]"):
        cross_entropy(logits, labels, class_weight=torch.ones(99))
    with pytest.raises(TypeError, match="floating"):
        cross_entropy(logits, labels, class_weight=torch.ones(100, dtype=torch.long))
    with pytest.raises(ValueError, match="requires grad"):
        cross_entropy(logits, labels, class_weight=torch.ones(100, requires_grad=True))
    assert sum(path_counts.values()) == before, "a kernel ran before the input was rejected"


@pytest.mark.parametrize("path", ["triton", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_row_stats_top1_and_entropy_follow_argmax_and_softmax(dtype, path):
    """The stats pass's token metrics against the full logits: argmax's first-maximum rule (ties within a block and
    across the 4,096-column block boundary), entropy = lse - E_p[f]."""
    from fastft.kernels.cross_entropy import CrossEntropyOptions, ce_stats

    vocab = 9001
    logits = torch.randn(8, vocab).to(dtype)
    labels = torch.randint(0, vocab, (8,))
    top = (logits.float().max() + 1).to(dtype)
    logits[0, [5, 7000]] = top  # tie across blocks: the first column wins
    labels[0] = 5
    logits[1, [5, 7000]] = top
    labels[1] = 7000  # the later tie is not top-1
    logits[2, [4095, 4096]] = top  # tie at the block boundary
    labels[2] = 4095
    logits[3, 100] = top
    labels[3] = 100
    labels[4] = -100  # ignored: never top-1
    labels[5] = logits[5].float().argmax()
    with force_path(path):
        stats = ce_stats(logits, labels, CrossEntropyOptions(), entropy=True, top1=True)
    z = logits.float()
    expected = (z.argmax(-1) == labels) & (labels != -100)
    assert torch.equal(stats.top1, expected) and expected[[0, 2, 3, 5]].all() and not expected[[1, 4]].any()
    log_p = z.log_softmax(-1)
    torch.testing.assert_close(stats.lse - stats.ef, -(log_p.exp() * log_p).sum(-1), rtol=1e-5, atol=1e-5)
