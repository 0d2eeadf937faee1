"""PatchFastRL on every row of the architecture table (issue 17): one DPO and one GRPO run per row through fastft's
heads (Phi-3's fused projections, Granite's logit divisor, Gemma's softcaps, MoE rows with the router aux loss in
TRL's loss, ...), each equal to unpatched TRL step by step (fp32, LoRA). Kept cheap: the rows' tiny fixtures, 2
steps, short sequences, and on CPU the kernels' torch paths (the Triton interpreter costs ~0.1 s per program, i.e.
per token row, and would make this file several minutes). What the runs check is fastft's head on each row's own
model (its softcap / scale / divisor, its aux loss, its LoRA targets) inside TRL's trainers; the kernels themselves
run under the interpreter in tests/trl/test_dpo.py and test_grpo.py (llama, every loss variant) and in the
per-row kernel parity tests, and as compiled kernels here under FASTFT_TEST_DEVICE=cuda."""

import logging

import pytest
import trl.trainer.grpo_trainer as grpo_module
from datasets import Dataset

from fastft.kernels import force_path
from fastft.patches.architectures import ARCHITECTURES
from tests.trl import test_dpo, test_grpo, test_sft
from tests.trl._common import assert_head_calls, assert_same_run, common_args, run

ROWS = sorted(ARCHITECTURES)
MOE_ROWS = {name for name, row in ARCHITECTURES.items() if row.experts_class}


@pytest.fixture(autouse=True)
def _kernel_path(test_device):
    if test_device.type == "cpu":
        with force_path("torch"):
            yield
    else:
        yield


def _lora(model_type):
    from peft import LoraConfig

    # attention only: Phi-3 has one qkv_proj; PEFT remaps qwen3_moe's gate/up/down_proj names onto its experts
    targets = ["qkv_proj", "o_proj"] if model_type == "phi3" else ["q_proj", "v_proj"]
    return LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=targets, task_type="CAUSAL_LM")


def _dpo(tmp_path, model_type):
    def make(cls, model, tokenizer):
        from trl import DPOConfig

        args = DPOConfig(**common_args(tmp_path, per_device_train_batch_size=2, max_length=24, max_steps=2))
        dataset = Dataset.from_list(test_dpo.PAIRS).map(lambda row: row, new_fingerprint=f"rows-{tmp_path.name}")
        return cls(model=model, args=args, train_dataset=dataset, processing_class=tokenizer, peft_config=_lora(model_type))

    return make


def _grpo(tmp_path, model_type):
    def make(cls, model, tokenizer):
        from trl import GRPOConfig

        # steps_per_generation 2: the old-policy pass runs; beta > 0: the reference pass (adapters off) runs too
        args = GRPOConfig(
            **common_args(
                tmp_path,
                per_device_train_batch_size=2,
                num_generations=2,
                max_steps=2,
                steps_per_generation=2,
                max_completion_length=8,
                beta=0.04,
            )
        )
        return cls(
            model=model,
            reward_funcs=test_grpo.reward_len,
            args=args,
            train_dataset=Dataset.from_list(test_grpo.PROMPTS),
            processing_class=tokenizer,
            peft_config=_lora(model_type),
        )

    return make


@pytest.mark.parametrize("model_type", ROWS)
def test_dpo_on_every_row_matches_trl(model_type, tmp_path):
    fast, calls = run("DPO", True, _dpo(tmp_path / "fast", model_type), model_type=model_type)
    slow, _ = run("DPO", False, _dpo(tmp_path / "slow", model_type), model_type=model_type)
    assert_head_calls(calls, "selective_log_softmax")
    assert_same_run(fast, slow, test_dpo.KEYS)


@pytest.mark.parametrize("model_type", ROWS)
def test_grpo_on_every_row_matches_trl(model_type, tmp_path, monkeypatch, caplog):
    """MoE rows: TRL asks the policy pass for the aux loss (compute_aux_loss); fastft's head returns it, so that pass
    does not fall back to TRL's head, and the logged aux_loss equals TRL's."""
    from fastft._log import reset_once

    monkeypatch.setattr(grpo_module.GRPOTrainer, "_generate_single_turn", test_grpo.fixed_generations)
    reset_once()
    with caplog.at_level(logging.INFO, logger="fastft"):
        fast, calls = run("GRPO", True, _grpo(tmp_path / "fast", model_type), model_type=model_type)
    assert not [r for r in caplog.records if "an MoE aux loss" in r.getMessage()]
    slow, _ = run("GRPO", False, _grpo(tmp_path / "slow", model_type), model_type=model_type)
    assert_head_calls(calls, "selective_log_softmax")
    assert any(abs(row["loss"]) > 1e-6 for row in slow), "degenerate run: every loss is zero"
    keys = test_grpo.KEYS + (("aux_loss",) if model_type in MOE_ROWS else ())
    assert_same_run(fast, slow, keys)


def test_sft_on_moe_adds_the_router_aux_loss_through_fastfts_head(tmp_path):
    """TRL turns output_router_logits on for MoE models and adds coef * outputs.aux_loss: fastft's head now returns
    the model's own aux loss, so the step runs fastft's head (no fallback to TRL's) and equals TRL's."""

    def make(path):
        def build(cls, model, tokenizer):
            from trl import SFTConfig

            args = SFTConfig(**common_args(path, per_device_train_batch_size=2, max_length=48, max_steps=3))
            return cls(
                model=model,
                args=args,
                train_dataset=Dataset.from_list(test_sft.PROMPT_COMPLETION),
                processing_class=tokenizer,
                peft_config=_lora("qwen3_moe"),
            )

        return build

    fast, calls = run("SFT", True, make(tmp_path / "fast"), model_type="qwen3_moe")
    slow, _ = run("SFT", False, make(tmp_path / "slow"), model_type="qwen3_moe")
    assert_head_calls(calls, "per-token head")
    assert all(row["aux_loss"] > 0 for row in slow)
    assert_same_run(fast, slow, ("loss", "grad_norm", "aux_loss"))
