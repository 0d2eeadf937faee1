"""FastDPOTrainer vs TRL's DPOTrainer: same per-step loss, grad norm and reward/logit metrics (fp32, LoRA: the
reference log-probs come from the same model with the adapters disabled)."""

import pytest
from datasets import Dataset

from tests.trl._common import assert_head_calls, assert_same_run, common_args, lora_config, run

PAIRS = [
    {"prompt": "What is 12 plus 7?", "chosen": " The answer is 19.", "rejected": " It is 20."},
    {"prompt": "Name a fast animal.", "chosen": " The quick brown fox.", "rejected": " The lazy dog."},
    {"prompt": "Why checkpoint?", "chosen": " It trades compute for memory.", "rejected": " No idea."},
] * 4


def _make(tmp_path, **config):
    def make(cls, model, tokenizer):
        from trl import DPOConfig

        args = DPOConfig(**common_args(tmp_path, per_device_train_batch_size=2, max_length=48, **config))
        # A fingerprint per run: DPO caches precomputed reference log-probs by (dataset fingerprint, model hash), and
        # two identical from_list datasets share one, so the second run would reuse the first run's values.
        dataset = Dataset.from_list(PAIRS).map(lambda row: row, new_fingerprint=f"fastft-dpo-{tmp_path.name}")
        return cls(model=model, args=args, train_dataset=dataset, processing_class=tokenizer, peft_config=lora_config())

    return make


KEYS = (
    "loss",
    "grad_norm",
    "rewards/chosen",
    "rewards/rejected",
    "logits/chosen",
    "logits/rejected",
    "entropy",
    "mean_token_accuracy",
)


@pytest.mark.parametrize("precompute", [False, True], ids=["ref_in_step", "ref_precomputed"])
def test_dpo_matches_trl(precompute, tmp_path):
    # ref_in_step: _compute_loss's reference pass under use_adapter(None); ref_precomputed: compute_ref_log_probs
    # over the dataset before training (the other overridden entry point), with WPO weights (log_sum_sq_probs) on.
    config = dict(precompute_ref_log_probs=True, use_weighting=True) if precompute else {}
    fast, calls = run("DPO", True, _make(tmp_path / "fast", **config))
    slow, _ = run("DPO", False, _make(tmp_path / "slow", **config))
    assert_head_calls(calls, "selective_log_softmax")
    assert_same_run(fast, slow, KEYS)
