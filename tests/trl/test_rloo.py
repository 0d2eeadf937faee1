"""FastRLOOTrainer vs TRL's RLOOTrainer: same per-step loss, grad norm, KL and entropy (fp32, LoRA, beta > 0 so the
reference pass runs with the adapters disabled, steps_per_generation > 1 so the old-policy pass runs too).

Generations are fixed at TRL's own seam, ``RLOOTrainer._generate_single_turn``, exactly as in ``test_grpo.py``.
"""

import pytest
from datasets import Dataset

from tests.trl._common import assert_head_calls, assert_same_run, common_args, lora_config, run
from tests.trl.test_grpo import PROMPTS, fixed_generations, reward_len

rloo_module = pytest.importorskip("trl.trainer.rloo_trainer", reason="this TRL has no trl.trainer.rloo_trainer")


def _make(tmp_path, **config):
    def make(cls, model, tokenizer):
        from trl import RLOOConfig

        args = RLOOConfig(
            **common_args(
                tmp_path,
                per_device_train_batch_size=4,
                num_generations=4,
                steps_per_generation=2,
                max_completion_length=8,
                beta=0.04,
                **config,
            )
        )
        return cls(
            model=model,
            reward_funcs=reward_len,
            args=args,
            train_dataset=Dataset.from_list(PROMPTS),
            processing_class=tokenizer,
            peft_config=lora_config(),
        )

    return make


def rloo_generations(self, prompt_ids, images, multimodal_fields):
    return fixed_generations(self, prompt_ids, images, multimodal_fields)[0]  # RLOO returns the ids alone


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_rloo_matches_trl(temperature, tmp_path, monkeypatch):
    monkeypatch.setattr(rloo_module.RLOOTrainer, "_generate_single_turn", rloo_generations)
    fast, calls = run("RLOO", True, _make(tmp_path / "fast", temperature=temperature))
    slow, _ = run("RLOO", False, _make(tmp_path / "slow", temperature=temperature))
    assert_head_calls(calls, "selective_log_softmax")
    assert any(abs(row["loss"]) > 1e-6 for row in slow), "degenerate run: every loss is zero"
    assert_same_run(fast, slow, ("loss", "grad_norm", "entropy"))
    # RLOO logs kl (folded into the reward) on generation steps only: the same steps both ways, equal values there.
    kl_steps = [step for step, row in enumerate(slow) if "kl" in row]
    assert kl_steps and kl_steps == [step for step, row in enumerate(fast) if "kl" in row]
    assert_same_run([fast[i] for i in kl_steps], [slow[i] for i in kl_steps], ("kl",))
