"""FastKTOTrainer vs TRL's KTOTrainer: same per-step loss, grad norm and reward/logit metrics (fp32, LoRA: the
reference log-probs come from the same model with the adapters disabled; the KL pass runs on mismatched pairs)."""

import pytest
from datasets import Dataset

from tests.trl._common import assert_head_calls, assert_same_run, common_args, lora_config, run

KTO_ROWS = [
    {"prompt": "What is 12 plus 7?", "completion": " The answer is 19.", "label": True},
    {"prompt": "Name a fast animal.", "completion": " The lazy dog.", "label": False},
    {"prompt": "Why checkpoint?", "completion": " It trades compute for memory.", "label": True},
    {"prompt": "Count:", "completion": " 5 3 1", "label": False},
] * 3

pytestmark = pytest.mark.skipif(not hasattr(__import__("trl"), "KTOTrainer"), reason="this TRL has no trl.KTOTrainer")


def _make(tmp_path, **config):
    def make(cls, model, tokenizer):
        from trl import KTOConfig

        args = KTOConfig(**common_args(tmp_path, per_device_train_batch_size=4, max_length=48, **config))
        # A fingerprint per run, so a precomputed-reference cache is never shared between the two runs (see DPO).
        dataset = Dataset.from_list(KTO_ROWS).map(lambda row: row, new_fingerprint=f"fastft-kto-{tmp_path.name}")
        return cls(model=model, args=args, train_dataset=dataset, processing_class=tokenizer, peft_config=lora_config())

    return make


KEYS = ("loss", "grad_norm", "kl", "rewards/chosen_sum", "rewards/rejected_sum", "logits/chosen_sum", "logits/rejected_sum")


@pytest.mark.parametrize("precompute", [False, True], ids=["ref_in_step", "ref_precomputed"])
def test_kto_matches_trl(precompute, tmp_path):
    config = dict(precompute_ref_log_probs=True) if precompute else {}
    fast, calls = run("KTO", True, _make(tmp_path / "fast", **config))
    slow, _ = run("KTO", False, _make(tmp_path / "slow", **config))
    assert_head_calls(calls, "selective_log_softmax")
    keys = tuple(key for key in KEYS if key in slow[0])
    assert {"loss", "grad_norm", "kl"} <= set(keys), slow[0]
    assert_same_run(fast, slow, keys)
