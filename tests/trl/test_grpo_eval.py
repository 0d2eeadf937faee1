"""GRPO evaluation, patched vs unpatched TRL: an eval dataset, ``eval_on_start`` and dropout > 0.

A generation made during evaluation must leave the model in eval mode (the fast generation hook restores the mode it
found): otherwise TRL computes the eval loss as a training loss (a crash before the first step; after it, dropout on
and the training normalizer). Eval metrics must equal unpatched TRL's to float rounding, before and after training.
"""

import torch
import trl.trainer.grpo_trainer as grpo_module
from datasets import Dataset

import fastft
from fastft.offline import build_tiny_model, build_tokenizer
from tests.trl._common import _kernel_calls, assert_head_calls, common_args, lora_config, trainer_class
from tests.trl.test_grpo import PROMPTS, fixed_generations, reward_len

EVAL_KEYS = ("eval_loss", "eval_reward", "eval_kl", "eval_entropy", "eval_completions/mean_length")


def _evaluate(patched: bool, tmp_path) -> tuple[list[dict[str, float]], int]:
    from trl import GRPOConfig

    cls = trainer_class("GRPO", patched)
    try:
        # dropout > 0: an eval pass run in train mode would differ from TRL's (and from run to run)
        model = build_tiny_model("llama", attention_dropout=0.3)
        torch.manual_seed(0)
        args = GRPOConfig(
            **common_args(
                tmp_path,
                max_steps=2,
                per_device_train_batch_size=4,
                per_device_eval_batch_size=4,
                num_generations=4,
                num_generations_eval=4,
                steps_per_generation=2,
                max_completion_length=8,
                beta=0.04,
                eval_strategy="steps",
                eval_steps=2,
                eval_on_start=True,
            )
        )
        trainer = cls(
            model=model,
            reward_funcs=reward_len,
            args=args,
            train_dataset=Dataset.from_list(PROMPTS),
            eval_dataset=Dataset.from_list(PROMPTS[:8]),
            processing_class=build_tokenizer(),
            peft_config=lora_config(),
        )
        before = _kernel_calls()
        trainer.train()
        calls = _kernel_calls() - before
    finally:
        fastft.unpatch()
    rows = [row for row in trainer.state.log_history if "eval_loss" in row]
    assert len(rows) == 2, trainer.state.log_history  # eval_on_start, then after step 2
    return rows, calls


def test_grpo_evaluation_matches_trl(tmp_path, monkeypatch):
    monkeypatch.setattr(grpo_module.GRPOTrainer, "_generate_single_turn", fixed_generations)
    fast, calls = _evaluate(True, tmp_path / "fast")
    slow, _ = _evaluate(False, tmp_path / "slow")
    assert_head_calls(calls, "selective_log_softmax")
    for when, f, s in zip(("on start", "after step 2"), fast, slow, strict=True):
        for key in EVAL_KEYS:
            if key not in s:
                continue
            torch.testing.assert_close(
                torch.tensor(f[key], dtype=torch.float64),
                torch.tensor(s[key], dtype=torch.float64),
                rtol=2e-5,
                atol=2e-6,
                msg=lambda m, k=key, w=when: f"{w}, {k}: fast vs TRL\n{m}",
            )
    assert "eval_loss" in slow[0] and "eval_reward" in slow[0]
