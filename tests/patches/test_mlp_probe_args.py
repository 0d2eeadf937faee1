"""The MLP probe builds MLP classes whose constructor needs more than the config (Gemma 4's ``Gemma4TextMLP(config,
layer_idx)``): a changed forward of such a class is still caught, and a constructor argument the probe does not know
leaves the MLP unpatched with that reason, the rest patched."""

from __future__ import annotations

import pytest
import torch

import fastft
from fastft.offline import build_tiny_model
from fastft.patches.patcher import patch_model

pytestmark = pytest.mark.usefixtures("fresh_patches")


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_gemma4_mlp_is_probed_with_its_layer_index_and_a_changed_forward_is_caught(monkeypatch):
    import transformers.models.gemma4.modeling_gemma4 as gemma4

    ids = torch.randint(5, 384, (2, 11), generator=torch.Generator().manual_seed(1))
    model = build_tiny_model("gemma4_text")
    report = patch_model(model)
    assert "mlp" not in report.skipped and any(a.startswith("mlp:geglu") for a in report.applied), str(report)
    fastft.unpatch()

    def swapped(self, x):  # act(up) * gate: the same shapes, another function
        return self.down_proj(self.act_fn(self.up_proj(x)) * self.gate_proj(x))

    monkeypatch.setattr(gemma4.Gemma4TextMLP, "forward", swapped)
    want = _logits(build_tiny_model("gemma4_text"), ids)
    model = build_tiny_model("gemma4_text")
    report = patch_model(model)
    assert "probe mismatch" in report.reasons.get("mlp", ""), str(report)
    assert "fused_loss" in report.applied, str(report)
    torch.testing.assert_close(_logits(model, ids), want, rtol=1e-4, atol=1e-4)


def test_an_mlp_constructor_argument_the_probe_does_not_know_leaves_the_mlp_unpatched(monkeypatch):
    import transformers.models.llama.modeling_llama as llama

    original = llama.LlamaMLP.__init__

    def needs_more(self, config, expert_group):  # a hypothetical upstream signature
        original(self, config)

    model = build_tiny_model("llama")  # built with the original constructor, before the signature changed
    monkeypatch.setattr(llama.LlamaMLP, "__init__", needs_more)
    report = patch_model(model)
    assert "expert_group" in report.reasons.get("mlp", "") and "cannot build" in report.reasons["mlp"], str(report)
    assert {"rope", "rms_norm", "fused_loss"} <= {a.split(":")[0] for a in report.applied}, str(report)
    mlps = [m for m in model.modules() if type(m) is llama.LlamaMLP]
    assert mlps and not any("forward" in vars(m) for m in mlps)  # each MLP keeps its class's forward
