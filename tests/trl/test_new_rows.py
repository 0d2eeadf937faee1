"""PatchFastRL on the newer architecture rows (issue 17): DPO, GRPO and SFT through fastft's heads on Phi-3's fused
projections, Granite's logit divisor, Gemma 3's softcap, and MoE rows (router aux loss in TRL's loss), each equal to
unpatched TRL step by step (fp32, LoRA)."""

import logging

import pytest
import trl.trainer.grpo_trainer as grpo_module
from datasets import Dataset

from tests.trl import test_dpo, test_grpo, test_sft
from tests.trl._common import assert_head_calls, assert_same_run, common_args, run


def _lora(model_type):
    from peft import LoraConfig

    # attention only: Phi-3 has one qkv_proj; PEFT remaps qwen3_moe's gate/up/down_proj names onto its experts
    targets = ["qkv_proj", "o_proj"] if model_type == "phi3" else ["q_proj", "v_proj"]
    return LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=targets, task_type="CAUSAL_LM")


def _dpo(tmp_path, model_type):
    def make(cls, model, tokenizer):
        from trl import DPOConfig

        args = DPOConfig(**common_args(tmp_path, per_device_train_batch_size=2, max_length=48, max_steps=3))
        dataset = Dataset.from_list(test_dpo.PAIRS).map(lambda row: row, new_fingerprint=f"rows-{tmp_path.name}")
        return cls(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                   peft_config=_lora(model_type))

    return make


def _grpo(tmp_path, model_type):
    def make(cls, model, tokenizer):
        from trl import GRPOConfig

        args = GRPOConfig(**common_args(tmp_path, per_device_train_batch_size=4, num_generations=4, max_steps=3,
                                        steps_per_generation=2, max_completion_length=8, beta=0.04))
        return cls(model=model, reward_funcs=test_grpo.reward_len, args=args,
                   train_dataset=Dataset.from_list(test_grpo.PROMPTS), processing_class=tokenizer,
                   peft_config=_lora(model_type))

    return make


@pytest.mark.parametrize("model_type", ["phi3", "granite", "qwen3_moe"])
def test_dpo_on_new_rows_matches_trl(model_type, tmp_path):
    fast, calls = run("DPO", True, _dpo(tmp_path / "fast", model_type), model_type=model_type)
    slow, _ = run("DPO", False, _dpo(tmp_path / "slow", model_type), model_type=model_type)
    assert_head_calls(calls, "selective_log_softmax")
    assert_same_run(fast, slow, test_dpo.KEYS)


@pytest.mark.parametrize("model_type", ["gemma3_text", "mixtral"])
def test_grpo_on_new_rows_matches_trl(model_type, tmp_path, monkeypatch, caplog):
    """mixtral: TRL asks the policy pass for the MoE aux loss (compute_aux_loss); fastft's head returns it, so that
    pass no longer falls back to TRL's head, and the logged aux_loss equals TRL's."""
    from fastft._log import reset_once

    monkeypatch.setattr(grpo_module.GRPOTrainer, "_generate_single_turn", test_grpo.fixed_generations)
    reset_once()
    with caplog.at_level(logging.INFO, logger="fastft"):
        fast, calls = run("GRPO", True, _grpo(tmp_path / "fast", model_type), model_type=model_type)
    assert not [r for r in caplog.records if "an MoE aux loss" in r.getMessage()]
    slow, _ = run("GRPO", False, _grpo(tmp_path / "slow", model_type), model_type=model_type)
    assert_head_calls(calls, "selective_log_softmax")
    keys = test_grpo.KEYS + (("aux_loss",) if model_type == "mixtral" else ())
    assert_same_run(fast, slow, keys)


def test_sft_on_moe_adds_the_router_aux_loss_through_fastfts_head(tmp_path):
    """TRL turns output_router_logits on for MoE models and adds coef * outputs.aux_loss: fastft's head now returns
    the model's own aux loss, so the step runs fastft's head (no fallback to TRL's) and equals TRL's."""
    def make(path):
        def build(cls, model, tokenizer):
            from trl import SFTConfig

            args = SFTConfig(**common_args(path, per_device_train_batch_size=2, max_length=48, max_steps=3))
            return cls(model=model, args=args, train_dataset=Dataset.from_list(test_sft.PROMPT_COMPLETION),
                       processing_class=tokenizer, peft_config=_lora("qwen3_moe"))

        return build

    fast, calls = run("SFT", True, make(tmp_path / "fast"), model_type="qwen3_moe")
    slow, _ = run("SFT", False, make(tmp_path / "slow"), model_type="qwen3_moe")
    assert_head_calls(calls, "per-token head")
    assert all(row["aux_loss"] > 0 for row in slow)
    assert_same_run(fast, slow, ("loss", "grad_norm", "aux_loss"))
