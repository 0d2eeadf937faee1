"""The fast fused LM head alone, against TRL's own fused head on the same model: every FusedCausalLMOutput field,
gradients, gemma2's softcap with tied embeddings, temperature, an all-masked batch, and bf16 autocast."""

import types

import pytest
import torch
import trl.trainer.utils

from fastft.offline import build_tiny_model
from fastft.patches.trl import LOSS_ONLY, _make_fast_forward

add_fused_lm_head = getattr(trl.trainer.utils, "add_fused_lm_head", None)
# This file compares fastft's head with TRL's fused head, which TRL 1.14 does not have; there PatchFastRL's losses are
# TRL's own code (tests/trl/test_sft.py etc. assert that no fastft head kernel runs and the losses match).
pytestmark = pytest.mark.skipif(add_fused_lm_head is None, reason="TRL < 1.15 has no fused LM head to compare with")

ALL = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")


def _heads(model_type, temperature):
    model = build_tiny_model(model_type)
    add_fused_lm_head(model, temperature=temperature, outputs=ALL)
    trl_forward = model.forward
    fast = types.MethodType(_make_fast_forward(trl_forward, temperature=temperature, outputs=ALL, cast_fp32=False), model)
    return model, trl_forward, fast


def _batch(model, masked_all=False):
    torch.manual_seed(1)
    ids = torch.randint(5, model.config.vocab_size, (2, 9))
    labels = ids.clone()
    labels[:, :3] = -100  # a prompt
    labels[1, 7:] = -100  # padding
    if masked_all:
        labels[:] = -100
    return ids, labels


@pytest.mark.parametrize("model_type,temperature", [("llama", 0.7), ("gemma2", 1.0)])
def test_fast_head_matches_trl_head(model_type, temperature):
    model, trl_forward, fast = _heads(model_type, temperature)
    ids, labels = _batch(model)
    results = []
    for forward in (trl_forward, fast):
        model.zero_grad()
        out = forward(input_ids=ids, labels=labels, fused_lm_head=True)
        (out.log_probs.sum() + 0.3 * out.entropy.sum()).backward()
        grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
        results.append((out, grads))
    (slow, slow_grads), (quick, quick_grads) = results
    for name in (*ALL, "loss", "label_mask"):
        a, b = getattr(quick, name), getattr(slow, name)
        if a.dtype == torch.bool:
            assert torch.equal(a, b), name
        else:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")
    assert len(quick_grads) == len(slow_grads) > 0
    for a, b in zip(quick_grads, slow_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_loss_only_mode_and_all_masked_batch():
    model, trl_forward, fast = _heads("llama", 1.0)
    ids, labels = _batch(model)
    expected = trl_forward(input_ids=ids, labels=labels, fused_lm_head=True, num_items_in_batch=11).loss
    got = fast(input_ids=ids, labels=labels, fused_lm_head=LOSS_ONLY, num_items_in_batch=11)
    assert got.log_probs is None
    torch.testing.assert_close(got.loss, expected, rtol=1e-5, atol=1e-6)
    ids, labels = _batch(model, masked_all=True)
    out = fast(input_ids=ids, labels=labels, fused_lm_head=True)
    assert out.loss.item() == 0.0 and out.label_mask.sum() == 0
    (out.log_probs.sum() + out.entropy.sum()).backward()  # an all-masked micro-batch still backpropagates (zeros)
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in model.parameters())


def test_bf16_autocast_states_with_fp32_head():
    model, trl_forward, fast = _heads("llama", 1.0)
    ids, labels = _batch(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        quick = fast(input_ids=ids, labels=labels, fused_lm_head=True)
        slow = trl_forward(input_ids=ids, labels=labels, fused_lm_head=True)
    # TRL projects in bf16 under autocast, fastft in the head's fp32: equal to bf16 rounding of the logits.
    torch.testing.assert_close(quick.log_probs, slow.log_probs, rtol=0, atol=5e-2)
