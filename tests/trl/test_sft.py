"""FastSFTTrainer vs TRL's SFTTrainer: same per-step loss, grad norm and token metrics (fp32, LoRA, tiny model)."""

import pytest
from datasets import Dataset

from tests.trl._common import assert_head_calls, assert_same_run, common_args, lora_config, run

PROMPT_COMPLETION = [
    {"prompt": "What is 12 plus 7?", "completion": " The answer is 19."},
    {"prompt": "Name a fast animal.", "completion": " The quick brown fox."},
    {"prompt": "Why checkpoint?", "completion": " It trades compute for memory."},
    {"prompt": "Count:", "completion": " 0 1 2 3 4 5"},
] * 3

CONVERSATIONS = [
    {"messages": [{"role": "user", "content": "What is 12 plus 7?"}, {"role": "assistant", "content": "The answer is 19."}]},
    {
        "messages": [
            {"role": "user", "content": "Say something."},
            {"role": "assistant", "content": "The quick brown fox jumps."},
        ]
    },
] * 6


def make_sft_trainer(dataset, **config):
    """A trainer factory for ``run``: SFT on ``dataset`` with LoRA, batch 2, max_length 48 (``tmp_path`` in config)."""

    def make(cls, model, tokenizer):
        from trl import SFTConfig

        args = SFTConfig(**common_args(config.pop("tmp_path"), per_device_train_batch_size=2, max_length=48, **config))
        return cls(
            model=model,
            args=args,
            train_dataset=Dataset.from_list(dataset),
            processing_class=tokenizer,
            peft_config=lora_config(),
        )

    return make


KEYS = ("loss", "grad_norm", "entropy", "mean_token_accuracy")


@pytest.mark.parametrize("case", ["completion_only", "assistant_only_grad_accum", "packing_gemma2"])
def test_sft_matches_trl(case, tmp_path):
    model_type = "llama"
    if case == "completion_only":
        dataset, config = PROMPT_COMPLETION, dict(completion_only_loss=True)
    elif case == "assistant_only_grad_accum":
        # num_items_in_batch spans the two micro-batches; labels outside the assistant turns are -100
        dataset, config = CONVERSATIONS, dict(assistant_only_loss=True, gradient_accumulation_steps=2)
    else:
        # packing (bfd) is padding-free: one row per batch with position_ids; gemma2 has tied embeddings + final softcap
        dataset, config = PROMPT_COMPLETION, dict(packing=True, completion_only_loss=True)
        model_type = "gemma2"
    fast, calls = run("SFT", True, make_sft_trainer(dataset, tmp_path=tmp_path / "fast", **config), model_type)
    slow, _ = run("SFT", False, make_sft_trainer(dataset, tmp_path=tmp_path / "slow", **config), model_type)
    assert_head_calls(calls, "linear_cross_entropy")
    assert_same_run(fast, slow, KEYS)
