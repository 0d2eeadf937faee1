"""Patches are guarded by the contract they rely on, not by a version number.

Drift: every row's targets exist and every contract holds on the installed transformers. Each guard catches what it
is there for: a rotary function, RMSNorm or MLP that computes something else (numerical probe), a causal-LM forward
without the parameters the fused loss reads; the piece stays unpatched with one warning and the rest is patched.
Pass-through parameters are passed under the caller's name. A release outside the tested range is patched with one
info line. Reverting never clobbers a later replacement by someone else.
"""

from __future__ import annotations

import logging
import warnings

import pytest
import torch
import transformers.models.llama.modeling_llama as llama

import fastft
from fastft.offline import build_tiny_model
from fastft.patches.architectures import ARCHITECTURES
from fastft.patches.base import Patch
from fastft.patches.patcher import patch_model

EVERY_PIECE = {"rope", "rms_norm", "mlp", "fused_loss"}


pytestmark = pytest.mark.usefixtures("fresh_patches")


def _pieces(report):
    return {name.split(":")[0] for name in report.applied}


def _batch(seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 384, (2, 11), generator=g)
    return ids, ids.clone()


def test_every_row_targets_exist_and_every_contract_holds(model_type):
    row = ARCHITECTURES[model_type]
    import importlib

    modeling = importlib.import_module(row.module)
    for name in (row.norm_class, row.mlp_class, row.rope_function, row.experts_class):
        assert name is None or hasattr(modeling, name), f"{row.module} has no {name}"
    model = build_tiny_model(model_type)
    report = patch_model(model)
    unfused = {piece for piece, _ in row.unfused}
    # MoE rows: the experts piece, and the dense MLP piece only where the model has dense layers (qwen3_moe's fixture)
    expected = EVERY_PIECE | ({"experts"} if row.experts_class else set())
    if row.experts_class and not any(type(m).__name__ == row.mlp_class for m in model.modules()):
        expected = expected - {"mlp"}
    assert _pieces(report) == expected - unfused and set(report.skipped) == unfused, str(report)


@pytest.mark.parametrize("model_type,piece", [("glm4", "rope"), ("olmo2", "rms_norm"), ("olmo3", "rms_norm")])
def test_a_piece_the_row_marks_unfused_is_left_as_written_and_the_rest_patched(model_type, piece):
    """GLM-4's interleaved partial RoPE and OLMo 2/3's weight-in-fp32 RMSNorm cannot be computed identically by
    fastft's kernels: that piece keeps transformers' code (with the reason in the report), the others are patched,
    and the model's logits are unchanged."""
    import importlib

    row = ARCHITECTURES[model_type]
    modeling = importlib.import_module(row.module)
    original_rope = getattr(modeling, row.rope_function)
    ids, _ = _batch()
    plain = build_tiny_model(model_type)
    with torch.no_grad():
        want = plain(input_ids=ids).logits
    model = build_tiny_model(model_type)
    report = patch_model(model)
    assert report.skipped == [piece] and report.reasons[piece] == dict(row.unfused)[piece], str(report)
    assert _pieces(report) == EVERY_PIECE - {piece}
    norms = [m for m in model.modules() if type(m).__name__ == row.norm_class]
    if piece == "rope":
        assert getattr(modeling, row.rope_function) is original_rope
        assert all("forward" in vars(m) for m in norms)
    else:
        assert norms and not any("forward" in vars(m) for m in norms)
        assert getattr(modeling, row.rope_function) is not original_rope
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, want, rtol=1e-4, atol=1e-4)


def test_a_changed_fused_gate_up_mlp_is_caught_by_its_probe(monkeypatch):
    """Phi-3's MLP splits one gate_up_proj; an upstream that swapped the halves (act(up) * gate) is caught by the probe
    and that MLP keeps its own forward, the rest patched."""
    import transformers.models.phi3.modeling_phi3 as phi3

    def swapped(self, x):
        up, gate = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(up * self.activation_fn(gate))

    monkeypatch.setattr(phi3.Phi3MLP, "forward", swapped)
    ids, _ = _batch()
    plain = build_tiny_model("phi3")
    with torch.no_grad():
        want = plain(input_ids=ids).logits
    model = build_tiny_model("phi3")
    report = patch_model(model)
    assert report.skipped == ["mlp"] and "probe mismatch" in report.reasons["mlp"], str(report)
    assert _pieces(report) == EVERY_PIECE - {"mlp"}
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, want, rtol=1e-4, atol=1e-4)


def test_granite_logits_scaling_reaches_the_fused_loss_head():
    from fastft.patches.lm_head import head_transform

    model = build_tiny_model("granite")
    assert head_transform(model.config) == (None, 1.0 / 8.0)
    ids, labels = _batch()
    with torch.no_grad():
        want = model.train()(input_ids=ids, labels=labels).loss
    assert "fused_loss" in patch_model(model).applied
    with torch.no_grad():
        out = model(input_ids=ids, labels=labels)
    assert out.logits is None  # the fused head ran
    torch.testing.assert_close(out.loss, want, rtol=1e-5, atol=1e-5)


def _patched_and_plain_logits():
    ids, _ = _batch()
    plain = build_tiny_model("llama")
    with torch.no_grad():
        want = plain(input_ids=ids).logits
    model = build_tiny_model("llama")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = patch_model(model)
    with torch.no_grad():
        got = model(input_ids=ids).logits
    return report, [str(w.message) for w in caught], got, want


def _negated_sin_rope(q, k, cos, sin, unsqueeze_dim=1):
    cos, sin = cos.unsqueeze(unsqueeze_dim), -sin.unsqueeze(unsqueeze_dim)
    return q * cos + llama.rotate_half(q) * sin, k * cos + llama.rotate_half(k) * sin


def _swapped_mlp(self, x):
    return self.down_proj(self.act_fn(self.up_proj(x)) * self.gate_proj(x))


def _gemma_style_norm(self, hidden_states):
    x = hidden_states.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
    return (x * (1.0 + self.weight.float())).to(hidden_states.dtype)


@pytest.mark.parametrize(
    "piece,target,replacement",
    [
        ("rope", "apply_rotary_pos_emb", _negated_sin_rope),
        ("mlp", "LlamaMLP.forward", _swapped_mlp),
        ("rms_norm", "LlamaRMSNorm.forward", _gemma_style_norm),
    ],
)
def test_probe_leaves_a_changed_function_unpatched_and_the_rest_patched(piece, target, replacement, monkeypatch):
    owner = llama if "." not in target else getattr(llama, target.split(".")[0])
    monkeypatch.setattr(owner, target.split(".")[-1], replacement)
    report, warned, got, want = _patched_and_plain_logits()
    assert piece in report.skipped and "probe mismatch" in report.reasons[piece], str(report)
    assert _pieces(report) == EVERY_PIECE - {piece}, str(report)
    assert sum("probe mismatch" in w for w in warned) == 1, warned
    # The model still computes upstream's (changed) function, not fastft's.
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_loss_forward_without_kwargs_is_left_unpatched(monkeypatch):
    def forward(self, input_ids=None, attention_mask=None, labels=None):
        return original(self, input_ids=input_ids, attention_mask=attention_mask, labels=labels)

    original = llama.LlamaForCausalLM.forward
    monkeypatch.setattr(llama.LlamaForCausalLM, "forward", forward)
    report = patch_model(build_tiny_model("llama"))
    assert "fused_loss" in report.skipped and "**kwargs" in report.reasons["fused_loss"], str(report)
    assert _pieces(report) == EVERY_PIECE - {"fused_loss"}


def test_pass_through_parameters_reach_the_backbone_under_the_callers_name():
    """A parameter the fused loss does not read (``past_key_values`` here; ``cache`` since transformers 5.24) goes to
    the backbone as the caller named it, along with any new keyword, and the output carries what the backbone gave."""
    model = build_tiny_model("llama")
    assert "fused_loss" in patch_model(model).applied
    seen = {}
    backbone_forward = model.model.forward

    def spy(**kwargs):
        seen.update(kwargs)
        return backbone_forward(**kwargs)

    model.model.forward = spy
    ids, labels = _batch()
    model.train()
    out = model(ids, labels=labels, use_cache=False, output_attentions=True, some_new_upstream_flag=None)
    assert out.logits is None and out.loss is not None and out.attentions is not None
    assert seen["input_ids"] is ids and seen["use_cache"] is False and "some_new_upstream_flag" in seen
    assert "labels" not in seen and "logits_to_keep" not in seen


def test_release_outside_the_tested_range_is_patched_with_one_note(monkeypatch, caplog):
    from packaging.specifiers import SpecifierSet

    import fastft.versions

    ranges = dict(fastft.versions.declared_ranges())
    ranges["transformers"] = SpecifierSet(">=9.0")
    monkeypatch.setattr(fastft.versions, "declared_ranges", lambda: ranges)
    with caplog.at_level(logging.INFO, logger="fastft"):
        report = patch_model(build_tiny_model("qwen2"))
        patch_model(build_tiny_model("llama"))
    assert _pieces(report) == EVERY_PIECE
    notes = [r.getMessage() for r in caplog.records if "outside the tested range" in r.getMessage()]
    assert len(notes) == 1 and "transformers" in notes[0] and "untested" in notes[0], notes


def test_revert_leaves_a_later_replacement_by_someone_else():
    class Owner:
        value = "upstream"

    patch = Patch("demo", Owner, "value", "fastft")
    assert patch.apply() and Owner.value == "fastft"
    Owner.value = "someone else"
    patch.revert()
    assert Owner.value == "someone else" and not patch.applied
    assert patch.apply() and Owner.value == "fastft"
    patch.revert()
    assert Owner.value == "someone else"  # what it found when it applied the second time


def test_a_guard_that_raises_is_a_failed_contract_not_a_crash():
    class Owner:
        value = 1

    def guard(original):
        raise RuntimeError("cannot probe")

    with pytest.warns(UserWarning, match="contract check failed"):
        assert not Patch("raising guard", Owner, "value", 2, guard=guard).apply()
    assert Owner.value == 1


def test_patch_unpatch_patch_again_on_the_same_model():
    model = build_tiny_model("llama")
    assert _pieces(patch_model(model)) == EVERY_PIECE
    fastft.unpatch()
    assert not any("forward" in vars(m) for m in model.modules())  # every instance patch reverted
    assert _pieces(patch_model(model)) == EVERY_PIECE
    assert all("forward" in vars(m) for m in model.modules() if type(m).__name__ in ("LlamaMLP", "LlamaRMSNorm"))


def test_a_changed_experts_forward_is_caught_by_its_probe(monkeypatch):
    """The experts' probe compares the class's forward with fastft's grouped-GEMM experts on an uneven routing: an
    upstream whose experts computed something else (here: routing weights ignored) keeps its own forward, the rest of
    the model patched."""
    import transformers.models.mixtral.modeling_mixtral as mixtral

    original = mixtral.MixtralExperts.forward

    def unweighted(self, hidden_states, top_k_index, top_k_weights):
        return original(self, hidden_states, top_k_index, torch.ones_like(top_k_weights))

    monkeypatch.setattr(mixtral.MixtralExperts, "forward", unweighted)
    ids, _ = _batch()
    with torch.no_grad():
        want = build_tiny_model("mixtral")(input_ids=ids).logits
    model = build_tiny_model("mixtral")
    report = patch_model(model)
    assert report.skipped == ["experts"] and "probe mismatch" in report.reasons["experts"], str(report)
    assert _pieces(report) == {"rope", "rms_norm", "fused_loss"}
    assert not [m for m in model.modules() if type(m).__name__ == "MixtralExperts" and "forward" in vars(m)]
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, want, rtol=1e-4, atol=1e-4)
