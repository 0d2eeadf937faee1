"""fastft.patches.lm_head: the one LM head the model's loss and the TRL heads share (cheap, CPU, no model forward)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from transformers import CONFIG_MAPPING

from fastft.patches.architectures import ARCHITECTURES
from fastft.patches.lm_head import (
    HeadWeights,
    head_fallback_reason,
    head_transform,
    head_weights,
    lm_head_log_probs,
    lm_head_loss,
    token_stats,
)

_LOGIT_FIELDS = ("final_logit_softcapping_field", "logit_scale_field", "logit_divisor_field")


@pytest.mark.parametrize(
    "row", [r for r in ARCHITECTURES.values() if any(getattr(r, f) for f in _LOGIT_FIELDS)], ids=lambda r: r.model_type
)
def test_head_transform_reads_every_logit_field_a_row_declares(row):
    """A row's logit fields are data: the one reading (head_transform) must apply each of them, as the model does."""
    for field in _LOGIT_FIELDS:
        name = getattr(row, field)
        if name is None:
            continue
        config = CONFIG_MAPPING[row.model_type]()
        setattr(config, name, 4.0)
        softcap, scale = head_transform(config)
        want = {
            "final_logit_softcapping_field": (4.0, softcap),
            "logit_scale_field": (4.0, scale),
            "logit_divisor_field": (0.25, scale),
        }[field]
        assert want[0] == want[1], (row.model_type, name, softcap, scale)


def test_head_transform_of_plain_rows_is_identity():
    for model_type in ("llama", "qwen2", "gemma", "qwen3_moe"):
        assert head_transform(CONFIG_MAPPING[model_type]()) == (None, None)


def test_head_fallback_reason_names_the_head():
    assert head_fallback_reason(torch.nn.Linear(4, 6)) is None
    assert head_fallback_reason(torch.nn.Sequential(torch.nn.Linear(4, 6))) == (
        "the LM head is a Sequential, not a plain nn.Linear"
    )

    class Sub(torch.nn.Linear):
        pass

    assert head_fallback_reason(Sub(4, 6)) == "the LM head is a Sub, not a plain nn.Linear"


@pytest.mark.parametrize("softcap, scale", [(None, None), (3.0, None), (None, 0.5), (3.0, 0.5)])
def test_loss_and_log_probs_equal_full_logits(softcap, scale):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 5, 8, generator=g)
    head = HeadWeights(torch.randn(11, 8, generator=g), torch.randn(11, generator=g), softcap, scale)
    labels = torch.randint(0, 11, (2, 5), generator=g)
    labels[0, 2] = -100
    z = torch.nn.functional.linear(hidden, head.weight, head.bias)
    z = z * (scale or 1.0)
    z = softcap * torch.tanh(z / softcap) if softcap else z
    shifted = torch.nn.functional.pad(labels, (0, 1), value=-100)[:, 1:]
    want = torch.nn.functional.cross_entropy(z.flatten(0, 1), shifted.flatten())
    torch.testing.assert_close(lm_head_loss(head, hidden, labels), want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lm_head_loss(head, hidden, shifted, shift=False), want, rtol=1e-5, atol=1e-6)

    mask = shifted != -100
    lp, ent = lm_head_log_probs(head, hidden[mask], shifted[mask], return_entropy=True)
    log_p = z[mask].log_softmax(-1)
    torch.testing.assert_close(lp, log_p.gather(-1, shifted[mask][:, None]).squeeze(-1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent, -(log_p.exp() * log_p).sum(-1), rtol=1e-5, atol=1e-5)
    stats = token_stats(hidden[mask], head, shifted[mask], ("entropy", "is_top1", "mean_logits"))
    torch.testing.assert_close(stats["entropy"], ent, rtol=1e-5, atol=1e-5)
    assert torch.equal(stats["is_top1"], z[mask].argmax(-1) == shifted[mask])
    torch.testing.assert_close(stats["mean_logits"], z[mask].mean(-1), rtol=1e-5, atol=1e-6)


def test_empty_batch_keeps_the_graph():
    hidden = torch.randn(0, 8, requires_grad=True)
    head = HeadWeights(torch.randn(11, 8), None, None, None)
    lp = lm_head_log_probs(head, hidden, torch.zeros(0, dtype=torch.long))
    lp.sum().backward()
    assert lp.shape == (0,) and hidden.grad is not None


def test_head_weights_reads_model_head_and_config():
    lm = torch.nn.Module()
    lm.lm_head = torch.nn.Linear(8, 11, bias=False)
    lm.get_output_embeddings = lambda: lm.lm_head
    lm.config = dataclasses.make_dataclass("C", [("logits_scaling", float), ("model_type", str)])(2.0, "granite")
    weights = head_weights(lm)
    assert weights.weight is lm.lm_head.weight and weights.bias is None and weights.scale == 0.5
