"""MoE expert stacks in the step model: the modeled LoRA is PEFT's, the experts stay 16-bit, both paths run on meta."""

import peft
import pytest
import torch

from fastft.memory.moe_model import ExpertsStandIn
from fastft.memory.step_model import StepModel, StepSpec
from fastft.offline import build_tiny_model, tiny_config

#: expert widths whose bf16 rows are 16-byte aligned: torch's grouped_mm (transformers' default path) requires it
_ALIGNED = {"qwen3_moe": {"moe_intermediate_size": 48}, "gpt_oss": {"intermediate_size": 48}}


@pytest.mark.parametrize("model_type", ["qwen3_moe", "gpt_oss"])
def test_modeled_expert_lora_has_peft_shapes_and_both_paths_run_on_meta(model_type):
    r = 4
    real = build_tiny_model(model_type, **_ALIGNED[model_type])
    wrapped = peft.get_peft_model(
        real,
        peft.LoraConfig(r=r, target_modules=["q_proj"], target_parameters=["experts.gate_up_proj", "experts.down_proj"]),
    )
    peft_shapes = sorted(tuple(p.shape) for n, p in wrapped.named_parameters() if ".experts." in n and "lora_" in n)
    peaks = {}
    for variant in ("fastft", "baseline"):
        model = StepModel(
            tiny_config(model_type, **_ALIGNED[model_type]), StepSpec(variant=variant, load_in_4bit=True, lora_r=r)
        )
        stand_ins = [m for m in model.model.modules() if isinstance(m, ExpertsStandIn)]
        assert stand_ins and all(m.fused == (variant == "fastft") for m in stand_ins)
        assert all(m.implementation == "grouped_mm" for m in stand_ins)  # transformers 5.24's default
        shapes = sorted(tuple(p.shape) for m in stand_ins for p in m.lora.values())
        assert shapes == peft_shapes  # PEFT's ParamWrapper factors: A [r*E, in], B [out, r*E] per stack
        experts = [p for m in stand_ins for p in m.original.parameters()]
        assert all(p.dtype == torch.bfloat16 and not p.requires_grad for p in experts)  # not quantized, frozen
        assert any("MoE:" in note for note in model.notes)
        result = model.step(32)
        assert result.breakdown["weights"] >= sum(p.numel() * 2 for p in experts)
        peaks[variant] = result.peak_bytes
    assert peaks["fastft"] < peaks["baseline"]


@pytest.mark.parametrize("model_type", ["mixtral", "gpt_oss"])
def test_the_baseline_stand_in_is_the_models_own_experts_forward_on_cpu(model_type):
    """Real tensors, a random routing: the baseline stand-in (transformers' grouped_mm experts path on the stand-in's
    weights) computes exactly what the model's experts module does."""
    model = build_tiny_model(model_type)
    experts = model.model.layers[0].mlp.experts
    stand_in = ExpertsStandIn(experts, r=0, alpha=0.0, fused=False, device="cpu")
    hidden, weights = torch.randn(9, 64), torch.rand(9, 2)
    index = torch.stack([torch.randperm(experts.num_experts)[:2] for _ in range(9)])
    with torch.no_grad():
        torch.testing.assert_close(stand_in(hidden, index, weights), experts(hidden, index, weights))


def test_the_loop_stand_in_runs_transformers_math_on_cpu():
    """On real tensors the loop stand-in computes transformers' expert MLP for its fixed routing (rows e*T*k/E ..
    go to expert e): checked against the model's own experts forward given that routing."""
    model = build_tiny_model("mixtral")
    experts = model.model.layers[0].mlp.experts
    experts.config._experts_implementation = "eager"
    stand_in = ExpertsStandIn(experts, r=0, alpha=0.0, fused=False, device="cpu")
    assert stand_in.implementation == "eager"
    t, k, e = 7, 2, experts.num_experts
    hidden, weights = torch.randn(t, 64), torch.rand(t, k)
    rows = torch.arange(t * k)
    bounds = torch.tensor([i * (t * k // e) + min(i, t * k % e) for i in range(e + 1)])
    index = (torch.bucketize(rows, bounds, right=True) - 1).reshape(t, k)
    with torch.no_grad():
        torch.testing.assert_close(stand_in(hidden, index, weights), experts(hidden, index, weights))
