"""The patched causal-LM forward decides "original forward" before binding its arguments when there is nothing for
the fused loss to do (eval mode, or no labels: every generation step), and still takes the fused loss for labels
passed by keyword or by position in training mode."""

from __future__ import annotations

import inspect

import torch

from fastft import FastModel
from fastft.offline import save_tiny_model


def _model(tmp_path):
    model, _ = FastModel.from_pretrained(save_tiny_model(str(tmp_path / "llama"), "llama"), full_finetuning=True)
    return model


def test_no_labels_or_eval_skips_binding_and_returns_logits(tmp_path, monkeypatch):
    model = _model(tmp_path)
    ids = torch.randint(5, 300, (2, 9), generator=torch.Generator().manual_seed(0))
    binds = []
    bind = inspect.Signature.bind
    monkeypatch.setattr(inspect.Signature, "bind", lambda self, *a, **k: binds.append(1) or bind(self, *a, **k))
    with torch.no_grad():
        model.train()
        assert model(input_ids=ids).logits is not None
        model.eval()
        out = model(input_ids=ids, labels=ids)
        assert out.logits is not None and out.loss is not None  # eval: transformers' own forward and loss
    assert binds == []
    model.train()
    with torch.no_grad():
        fused = model(input_ids=ids, labels=ids)
    assert binds, "a training call with labels binds its arguments"
    assert fused.logits is None  # the fused loss: no logits built
    torch.testing.assert_close(fused.loss, out.loss, rtol=1e-5, atol=1e-6)


def test_positional_labels_take_the_fused_loss(tmp_path):
    model = _model(tmp_path).train()
    ids = torch.randint(5, 300, (2, 9), generator=torch.Generator().manual_seed(1))
    names = [n for n in inspect.signature(type(model).forward).parameters if n != "self"]  # transformers' order
    args = [None] * names.index("labels") + [ids]
    args[names.index("input_ids")] = ids
    with torch.no_grad():
        by_position = model(*args)
        by_keyword = model(input_ids=ids, labels=ids)
    assert by_position.logits is None and by_keyword.logits is None
    torch.testing.assert_close(by_position.loss, by_keyword.loss, rtol=0, atol=0)


def test_patched_forward_shows_the_original_parameters(tmp_path):
    """transformers' generate() picks its path from the forward's parameters (logits_to_keep, position_ids,
    attention_mask): the patched forward must show the original's, not ``(*args, **kwargs)``."""
    model = _model(tmp_path)
    assert getattr(vars(model).get("forward"), "__func__", None) is not None  # the instance forward is fastft's
    patched = inspect.signature(model.forward)
    original = inspect.signature(type(model).forward.__get__(model))
    assert list(patched.parameters) == list(original.parameters)
    assert {"logits_to_keep", "position_ids", "attention_mask"} <= set(patched.parameters)
    assert model._supports_logits_to_keep()
