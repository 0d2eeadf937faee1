"""FastGRPOTrainer vs TRL's GRPOTrainer: same per-step loss, grad norm, KL and entropy (fp32, LoRA, beta > 0 so the
reference pass runs with the adapters disabled, steps_per_generation > 1 so the old-policy pass runs too).

Generations are made deterministic at TRL's own seam, ``GRPOTrainer._generate_single_turn`` (patched on TRL's class, so
the fast subclass still runs its FastModel.for_inference/for_training wrapper around it): completion ids are a fixed
function of the prompt ids and the row, and the reward is a fixed function of the completion text.
"""

import pytest
import trl.trainer.grpo_trainer as grpo_module
from datasets import Dataset

from tests.trl._common import assert_head_calls, assert_same_run, common_args, lora_config, run

PROMPTS = [{"prompt": p} for p in ("What is 12 plus 7?", "Name a fast animal.", "Why checkpoint?", "Count:")] * 4


def fixed_generations(self, prompt_ids, images, multimodal_fields, *rest, **kwargs):  # TRL 1.14 has no num_generations
    eos = self.eos_token_ids[0] if hasattr(self, "eos_token_ids") else self._tokenizer.eos_token_id  # TRL 1.14
    completions = []
    for row, ids in enumerate(prompt_ids):
        length = 3 + (sum(ids) + row) % 6  # 3..8 tokens; the shorter ones end with EOS
        tokens = [(7 * sum(ids) + 13 * row + 5 * i) % 300 + 20 for i in range(length)]
        completions.append(tokens[:-1] + [eos] if length < 8 else tokens)
    return completions, None


def reward_len(completions, **kwargs):
    return [float(len(c) % 5) + 0.1 * c.count("e") for c in completions]


def make_online_trainer(tmp_path, config_class="GRPOConfig", **config):
    """A trainer factory for ``run``: 16 prompts, 4 generations each, 2 steps per generation, beta > 0, LoRA; the
    online trainers' shared setup (``config_class``: the TRL config of the trainer, GRPO's or RLOO's)."""

    def make(cls, model, tokenizer):
        import trl

        args = getattr(trl, config_class)(
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


KEYS = ("loss", "grad_norm", "kl", "entropy")


@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "dr_grpo", "bnpo"])
def test_grpo_matches_trl(loss_type, tmp_path, monkeypatch):
    monkeypatch.setattr(grpo_module.GRPOTrainer, "_generate_single_turn", fixed_generations)
    config = dict(loss_type=loss_type)
    if loss_type == "grpo":
        config.update(temperature=0.7, entropy_coef=0.01)  # temperature reaches the head; entropy gets a gradient
    fast, calls = run("GRPO", True, make_online_trainer(tmp_path / "fast", **config))
    slow, _ = run("GRPO", False, make_online_trainer(tmp_path / "slow", **config))
    assert_head_calls(calls, "selective_log_softmax")
    assert any(abs(row["loss"]) > 1e-6 for row in slow), "degenerate run: every loss is zero"
    assert_same_run(fast, slow, KEYS)
