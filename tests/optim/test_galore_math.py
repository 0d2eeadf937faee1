"""GaLore math against hand computations and torch/transformers references (pure torch on CPU, fast)."""

import copy
import math
import warnings

import pytest
import torch

import fastft.optim.galore as galore_mod
from fastft._log import reset_once
from fastft.optim import GaLoreAdafactor, GaLoreAdamW, GaLoreAdamW8bit, orthogonal_basis

LR, BETAS, EPS, WD = 1e-2, (0.9, 0.99), 1e-8, 0.1


def _identity_basis(matrix, rank, side, method="exact", seed=0):
    m, n = matrix.shape
    return torch.eye(m if side == "left" else n, rank)


def _grads(shape, steps, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g) for _ in range(steps)]


@pytest.mark.parametrize("proj_type,shape", [("left", (5, 7)), ("right", (7, 5)), ("full", (6, 6)), ("std", (7, 5))])
def test_identity_projector_matches_adamw_step_for_step(monkeypatch, proj_type, shape):
    # rank = min(shape) makes the (forced) identity basis square, so P^T G = G and P @ R = R exactly; the plain AdamW
    # galore_adamw stands for is transformers' (galore-torch's base: eps on the uncorrected sqrt(v), decay after)
    from galore_torch import GaLoreAdamW as ReferenceAdamW

    monkeypatch.setattr(galore_mod, "orthogonal_basis", _identity_basis)
    w0 = torch.randn(shape)
    b0 = torch.randn(shape[1])
    ref_w, ref_b = w0.clone().requires_grad_(), b0.clone().requires_grad_()
    our_w, our_b = w0.clone().requires_grad_(), b0.clone().requires_grad_()
    ref = ReferenceAdamW([ref_w, ref_b], lr=LR, betas=BETAS, eps=EPS, weight_decay=WD, no_deprecation_warning=True)
    ours = GaLoreAdamW(
        [
            {"params": [our_w], "rank": min(shape), "proj_type": proj_type, "scale": 1.0, "update_proj_gap": 2},
            {"params": [our_b]},
        ],
        lr=LR,
        betas=BETAS,
        eps=EPS,
        weight_decay=WD,
    )
    for gw, gb in zip(_grads(shape, 6), _grads((shape[1],), 6, seed=2)):
        for p, g in ((ref_w, gw), (ref_b, gb), (our_w, gw), (our_b, gb)):
            p.grad = g.clone()
        ref.step()
        ours.step()
        torch.testing.assert_close(our_w, ref_w, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(our_b, ref_b, rtol=1e-6, atol=1e-7)
    assert ours.state[our_w]["exp_avg"].shape == shape


@pytest.mark.parametrize(
    "proj_type,shape,side",
    [("std", (9, 6), "right"), ("std", (6, 9), "left"), ("reverse_std", (9, 6), "left"), ("right", (6, 9), "right")],
)
def test_one_step_equals_hand_computed_projection(proj_type, shape, side):
    rank, scale = 3, 0.25
    w0 = torch.randn(shape)
    w = w0.clone().requires_grad_()
    opt = GaLoreAdamW(
        [{"params": [w], "rank": rank, "proj_type": proj_type, "scale": scale, "svd": "exact"}],
        lr=LR,
        betas=BETAS,
        eps=EPS,
        weight_decay=WD,
    )
    g = torch.randn(shape)
    w.grad = g.clone()
    opt.step()
    st = opt.state[w]
    assert set(k for k in st if k.startswith("proj_")) == {f"proj_{side}"}
    p = st[f"proj_{side}"]
    u, s, vh = torch.linalg.svd(g, full_matrices=False)
    top = u[:, :rank] if side == "left" else vh[:rank].T
    # same subspace as the exact top-r singular vectors (columns may differ in sign)
    torch.testing.assert_close((p.T @ top).abs(), torch.eye(rank), atol=1e-5, rtol=0)
    r = p.T @ g if side == "left" else g @ p
    m, v = (1 - BETAS[0]) * r, (1 - BETAS[1]) * r * r
    adam = m / (v.sqrt() + EPS) * math.sqrt(1 - BETAS[1]) / (1 - BETAS[0])  # galore-torch's step-1 AdamW direction
    back = p @ adam if side == "left" else adam @ p.T
    expected = (w0 - LR * scale * back) * (1 - LR * WD)  # decoupled decay after the step, as galore-torch does
    torch.testing.assert_close(w.detach(), expected, rtol=1e-5, atol=1e-6)


def test_projector_refreshes_every_gap():
    w = torch.randn(8, 6, requires_grad=True)
    opt = GaLoreAdamW([{"params": [w], "rank": 2, "update_proj_gap": 2, "svd": "exact"}], lr=LR)
    seen = []
    for g in _grads((8, 6), 5):
        w.grad = g
        opt.step()
        seen.append(opt.state[w]["proj_right"].clone())
    assert torch.equal(seen[0], seen[1]) and torch.equal(seen[2], seen[3])  # steps 1-2 and 3-4 share a basis
    assert not torch.equal(seen[1], seen[2]) and not torch.equal(seen[3], seen[4])  # refreshed at steps 3 and 5
    assert int(opt.state[w]["step"]) == 5


def test_randomized_basis_finds_the_dominant_subspace():
    gen = torch.Generator().manual_seed(3)
    a = torch.randn(200, 4, generator=gen) @ torch.randn(4, 150, generator=gen) * 10
    a += 0.01 * torch.randn(200, 150, generator=gen)
    exact = orthogonal_basis(a, 4, "left", "exact")
    rand = orthogonal_basis(a, 4, "left", "randomized", seed=7)
    # principal angles ~0: singular values of exact^T rand all ~1
    assert torch.linalg.svdvals(exact.T @ rand).min() > 0.999
    assert torch.equal(rand, orthogonal_basis(a, 4, "left", "randomized", seed=7))  # seeded, reproducible
    state = torch.random.get_rng_state()
    orthogonal_basis(a, 4, "right", "randomized", seed=1)
    assert torch.equal(state, torch.random.get_rng_state())  # global RNG untouched


def test_svd_failure_keeps_previous_projector(monkeypatch):
    reset_once()
    w = torch.randn(8, 6, requires_grad=True)
    opt = GaLoreAdamW([{"params": [w], "rank": 2, "update_proj_gap": 1, "svd": "exact"}], lr=LR)
    w.grad = torch.randn(8, 6)
    opt.step()
    before = opt.state[w]["proj_right"].clone()

    def broken_svd(*a, **k):
        raise torch.linalg.LinAlgError("The algorithm failed to converge")

    monkeypatch.setattr(torch.linalg, "svd", broken_svd)
    w.grad = torch.randn(8, 6)
    with pytest.warns(UserWarning, match="keeping the previous projector"):
        opt.step()
    assert torch.equal(opt.state[w]["proj_right"], before)
    assert torch.isfinite(w).all()


def test_svd_failure_on_first_step_uses_a_finite_fallback(monkeypatch):
    reset_once()
    w = torch.randn(8, 6, requires_grad=True)
    opt = GaLoreAdamW([{"params": [w], "rank": 2, "svd": "exact"}], lr=LR)
    monkeypatch.setattr(torch.linalg, "svd", lambda *a, **k: (_ for _ in ()).throw(torch.linalg.LinAlgError("x")))
    w.grad = torch.randn(8, 6)
    with pytest.warns(UserWarning, match="fallback basis"):
        opt.step()
    q = opt.state[w]["proj_right"]
    torch.testing.assert_close(q.T @ q, torch.eye(2), atol=1e-5, rtol=0)  # still orthonormal
    assert torch.isfinite(w).all()


def test_rank_larger_than_matrix_is_clamped_with_warning():
    reset_once()
    w = torch.randn(9, 6, requires_grad=True)
    opt = GaLoreAdamW([{"params": [w], "rank": 100}], lr=LR)
    w.grad = torch.randn(9, 6)
    with pytest.warns(UserWarning, match="rank 100 > min"):
        opt.step()
    assert opt.state[w]["proj_right"].shape == (6, 6)
    assert opt.state[w]["exp_avg"].shape == (9, 6)


def test_bad_galore_options_fail_at_construction():
    w = torch.randn(4, 4, requires_grad=True)
    with pytest.raises(ValueError, match="proj_type"):
        GaLoreAdamW([{"params": [w], "rank": 2, "proj_type": "diagonal"}])
    with pytest.raises(ValueError, match="2-D"):
        GaLoreAdamW([{"params": [torch.randn(4, requires_grad=True)], "rank": 2}])


def test_8bit_matches_fp32_within_quantization_error():
    shape = (96, 80)  # projected 96 x 16 = 1536 elements: quantized with min_8bit_size=1024
    w0 = torch.randn(shape)
    w32, w8 = w0.clone().requires_grad_(), w0.clone().requires_grad_()
    kw = dict(lr=LR, betas=BETAS, eps=EPS, weight_decay=WD)
    group = {"rank": 16, "svd": "exact", "update_proj_gap": 100}
    o32 = GaLoreAdamW([{"params": [w32], **group}], **kw)
    o8 = GaLoreAdamW8bit([{"params": [w8], **group}], min_8bit_size=1024, **kw)
    for g in _grads(shape, 4):
        w32.grad, w8.grad = g.clone(), g.clone()
        o32.step()
        o8.step()
    st = o8.state[w8]
    assert st["exp_avg"].dtype == torch.uint8 and st["exp_avg_sq"].dtype == torch.uint8
    assert st["exp_avg_absmax"].numel() == math.ceil(96 * 16 / 256)
    moved32, moved8 = (w32 - w0).detach(), (w8 - w0).detach()
    rel = (moved8 - moved32).norm() / moved32.norm()
    assert rel < 0.05, rel  # 8-bit moments: a few percent off the fp32 trajectory, same direction
    small = torch.randn(4, 4, requires_grad=True)
    o = GaLoreAdamW8bit([small], min_8bit_size=4096)
    small.grad = torch.randn(4, 4)
    o.step()
    assert o.state[small]["exp_avg"].dtype == torch.float32  # below min_8bit_size: fp32 moments


def test_adafactor_plain_matches_transformers_and_identity_galore_matches_plain(monkeypatch):
    from transformers.optimization import Adafactor

    monkeypatch.setattr(galore_mod, "orthogonal_basis", _identity_basis)
    w0, b0 = torch.randn(7, 5), torch.randn(5)
    ref_w, ref_b = w0.clone().requires_grad_(), b0.clone().requires_grad_()
    pl_w, pl_b = w0.clone().requires_grad_(), b0.clone().requires_grad_()
    id_w = w0.clone().requires_grad_()
    ref = Adafactor([ref_w, ref_b], lr=LR, scale_parameter=False, relative_step=False, warmup_init=False, weight_decay=WD)
    plain = GaLoreAdafactor([pl_w, pl_b], lr=LR, weight_decay=WD)
    ident = GaLoreAdafactor([{"params": [id_w], "rank": 5, "proj_type": "right", "scale": 1.0}], lr=LR, weight_decay=WD)
    for gw, gb in zip(_grads((7, 5), 5), _grads((5,), 5, seed=2)):
        for p, g in ((ref_w, gw), (ref_b, gb), (pl_w, gw), (pl_b, gb), (id_w, gw)):
            p.grad = g.clone()
        ref.step()
        plain.step()
        ident.step()
        torch.testing.assert_close(pl_w, ref_w, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(pl_b, ref_b, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(id_w, ref_w, rtol=1e-5, atol=1e-6)
    assert plain.state[pl_w]["exp_avg_sq_row"].shape == (7,)  # factored second moment


@pytest.mark.parametrize("cls", [GaLoreAdamW, GaLoreAdamW8bit, GaLoreAdafactor])
def test_state_dict_round_trip_resumes_exactly_and_keeps_dtypes(cls):
    kw = {"min_8bit_size": 64} if cls is GaLoreAdamW8bit else {}
    w0 = torch.randn(40, 24, dtype=torch.bfloat16)
    b0 = torch.randn(24, dtype=torch.bfloat16)
    grads = _grads((40, 24), 7)

    def make(w, b):
        return cls(
            [{"params": [w], "rank": 4, "update_proj_gap": 3, "svd": "randomized"}, {"params": [b]}],
            lr=LR,
            weight_decay=WD,
            **kw,
        )

    wa, ba = w0.clone().requires_grad_(), b0.clone().requires_grad_()
    oa = make(wa, ba)
    for i, g in enumerate(grads):
        wa.grad, ba.grad = g.to(torch.bfloat16), g[0].to(torch.bfloat16)
        oa.step()
        if i == 3:
            saved_sd = copy.deepcopy(oa.state_dict())
            saved_w, saved_b = wa.detach().clone(), ba.detach().clone()
    wb, bb = saved_w.clone().requires_grad_(), saved_b.clone().requires_grad_()
    ob = make(wb, bb)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no surprise warnings on load
        ob.load_state_dict(saved_sd)
    for key, value in oa.state[wa].items():
        assert ob.state[wb][key].dtype == value.dtype, key  # fp32 moments not cast to the bf16 param dtype
    for g in grads[4:]:
        wb.grad, bb.grad = g.to(torch.bfloat16), g[0].to(torch.bfloat16)
        ob.step()
    assert torch.equal(wb, wa) and torch.equal(bb, ba)
