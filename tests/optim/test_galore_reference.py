"""fastft's GaLore under transformers' names takes galore-torch 1.0's step (galore-torch is what transformers builds
for ``optim="galore_adamw"`` / ``"galore_adafactor"``): step by step on CPU, before the first projector refresh.

galore-torch computes its projector with an exact SVD at step 0 and keeps it for ``update_proj_gap`` steps; ours uses
``svd="exact"`` here, so both project onto the same subspace (singular vectors may differ in sign, which cancels
between projection and back-projection). galore-torch's 8-bit optimizer calls ``torch.cuda.synchronize`` in every
step and cannot run here; its fp32 math is the AdamW checked below.
"""

from __future__ import annotations

import pytest
import torch
from galore_torch import GaLoreAdafactor as RefAdafactor
from galore_torch import GaLoreAdamW as RefAdamW

from fastft.optim import GaLoreAdafactor, GaLoreAdamW, create_optimizer

STEPS, GAP = 6, 100  # all steps before the first refresh after step 0


def _grads(shape, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g) for _ in range(STEPS)]


def _run_pair(make_ref, make_ours, shape, rank, proj_type):
    """Step both optimizers on identical weights and gradients; assert they agree after every step."""
    w0, b0 = torch.randn(shape), torch.randn(shape[1])
    ref_w, ref_b, our_w, our_b = (t.clone().requires_grad_() for t in (w0, b0, w0, b0))
    galore = {"rank": rank, "update_proj_gap": GAP, "scale": 0.25, "proj_type": proj_type}
    ref = make_ref([{"params": [ref_b]}, {"params": [ref_w], **galore}])
    ours = make_ours([{"params": [our_b]}, {"params": [our_w], **galore, "svd": "exact"}])
    for step, (gw, gb) in enumerate(zip(_grads(shape, 1), _grads((shape[1],), 2)), start=1):
        for p, g in ((ref_w, gw), (ref_b, gb), (our_w, gw), (our_b, gb)):
            p.grad = g.clone()
        ref.step()
        ours.step()
        torch.testing.assert_close(our_w, ref_w, rtol=2e-5, atol=2e-6, msg=lambda m, s=step: f"step {s}: {m}")
        torch.testing.assert_close(our_b, ref_b, rtol=2e-5, atol=2e-6, msg=lambda m, s=step: f"step {s}: {m}")
    assert not torch.equal(our_w, w0)
    return w0, our_w


_SHAPES = [("std", (12, 8)), ("std", (8, 12)), ("reverse_std", (12, 8)), ("left", (8, 12)), ("right", (12, 8))]


# eps 1e-3: where eps sits visibly changes the step (torch's placement fails this). "full" runs with it only: at a
# refresh step the two-sided projection of the gradient the basis came from is diag(s) exactly, so its off-diagonal
# entries are rounding noise, which Adam with eps 1e-8 scales up to O(1) steps -- in any implementation, differently.
@pytest.mark.parametrize(
    "proj_type,shape,eps",
    [*[(t, s, 1e-8) for t, s in _SHAPES], *[(t, s, 1e-3) for t, s in _SHAPES], ("full", (10, 10), 1e-3)],
)
def test_galore_adamw_equals_galore_torch_step_by_step(proj_type, shape, eps):
    kw = dict(lr=1e-2, betas=(0.9, 0.99), eps=eps, weight_decay=0.1)
    _run_pair(
        lambda groups: RefAdamW(groups, no_deprecation_warning=True, **kw),
        lambda groups: GaLoreAdamW(groups, **kw),
        shape,
        3,
        proj_type,
    )


def test_galore_adamw_is_not_torch_adamw_when_eps_matters():
    # the same comparison against torch.optim.AdamW's eps placement must fail: the test above can tell them apart
    w = torch.randn(6, 4)
    torch_w, ours_w = w.clone().requires_grad_(), w.clone().requires_grad_()
    kw = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-3, weight_decay=0.0)
    ref, ours = torch.optim.AdamW([torch_w], **kw), GaLoreAdamW([ours_w], **kw)
    for g in _grads((6, 4), 3):
        torch_w.grad, ours_w.grad = g.clone(), g.clone()
        ref.step()
        ours.step()
    assert (ours_w - torch_w).abs().max() > 1e-5


@pytest.mark.parametrize("beta1", [None, 0.9])
def test_galore_adafactor_equals_galore_torch_step_by_step(beta1):
    # transformers builds galore_adafactor with scale_parameter=False, relative_step=False (external lr)
    kw = dict(lr=1e-2, beta1=beta1, weight_decay=0.1)
    _run_pair(
        lambda groups: RefAdafactor(groups, scale_parameter=False, relative_step=False, warmup_init=False, **kw),
        lambda groups: GaLoreAdafactor(groups, **kw),
        (12, 8),
        3,
        "std",
    )


def test_create_optimizer_galore_adamw_equals_transformers_galore(tmp_path):
    """``optim="galore_adamw"``: fastft's create_optimizer vs the optimizer transformers' Trainer builds for the same
    arguments (galore-torch over transformers' param groups), on a tiny model's real gradients."""
    from transformers import Trainer, TrainingArguments

    from fastft.offline import build_tiny_model

    args = TrainingArguments(
        output_dir=str(tmp_path),
        optim="galore_adamw",
        optim_target_modules=["mlp"],
        optim_args=f"rank=4,update_proj_gap={GAP},scale=0.25",
        learning_rate=1e-2,
        weight_decay=0.0,
        adam_epsilon=1e-6,
        use_cpu=True,
        report_to="none",
    )
    torch.manual_seed(0)
    ref_model = build_tiny_model("llama")
    our_model = build_tiny_model("llama")
    our_model.load_state_dict(ref_model.state_dict())
    cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args, ref_model)
    assert cls is RefAdamW, cls  # transformers' galore_adamw is galore-torch's AdamW
    ref = cls(**kwargs) if "params" in kwargs else cls(ref_model.parameters(), **kwargs)
    ours = create_optimizer(our_model, args)
    assert isinstance(ours, GaLoreAdamW)
    for p in ours.param_groups:
        if p["rank"] is not None:
            p["svd"] = "exact"  # galore-torch's SVD; the randomized default differs by design
    ids = torch.randint(0, ref_model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(3))
    for _ in range(3):
        for model, opt in ((ref_model, ref), (our_model, ours)):
            opt.zero_grad()
            model(input_ids=ids, labels=ids).loss.backward()
            opt.step()
        for (name, p_ref), p_ours in zip(ref_model.named_parameters(), our_model.parameters()):
            torch.testing.assert_close(p_ours, p_ref, rtol=1e-4, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")
