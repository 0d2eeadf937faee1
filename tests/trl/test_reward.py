"""PatchFastRL("Reward") vs TRL's RewardTrainer: same per-step loss, grad norm and accuracy metrics (fp32, seed 0).

RewardTrainer scores a sequence-classification head (one scalar per sequence), so there is no LM head to make lean:
the row gets fastft.optim's optimizer, the checkpointing rule and the step-1 summary, whose ``loss head`` row says so.
"""

import torch
from datasets import Dataset

from fastft.offline import build_tokenizer, tiny_config
from tests.trl._common import _kernel_calls, assert_same_run, common_args, run

PAIRS = [
    {"chosen": "What is 12 plus 7? The answer is 19.", "rejected": "What is 12 plus 7? It is 20."},
    {"chosen": "Name a fast animal. The quick brown fox.", "rejected": "Name a fast animal. The lazy dog."},
    {"chosen": "Why checkpoint? It trades compute for memory.", "rejected": "Why checkpoint? No idea."},
] * 4


def _reward_model():
    from transformers import AutoModelForSequenceClassification

    config = tiny_config("llama", num_labels=1, pad_token_id=build_tokenizer().pad_token_id)
    torch.manual_seed(0)
    return AutoModelForSequenceClassification.from_config(config, attn_implementation="eager")


def _make(tmp_path):
    def make(cls, model, tokenizer):
        from trl import RewardConfig

        args = RewardConfig(**common_args(tmp_path, per_device_train_batch_size=2, max_length=48))
        return cls(model=model, args=args, train_dataset=Dataset.from_list(PAIRS), processing_class=tokenizer)

    return make


def test_reward_matches_trl_and_says_there_is_no_lm_head(tmp_path, capsys):
    trainers = []
    before = _kernel_calls()
    fast, _ = run("Reward", True, _make(tmp_path / "fast"), build=_reward_model, keep=trainers)
    block = capsys.readouterr().out
    slow, _ = run("Reward", False, _make(tmp_path / "slow"), build=_reward_model)
    assert _kernel_calls() == before  # nothing of fastft's head ran: there is none to run
    optimizer = trainers[0].optimizer
    assert getattr(getattr(optimizer, "optimizer", optimizer), "_fastft_built", False), "fastft.optim not used"
    assert "RewardTrainer step 1 (PatchFastRL('Reward'))" in block, block
    assert "no LM head to fuse: RewardTrainer scores a sequence-classification head" in block, block
    assert "built by fastft.optim" in block, block
    keys = ("loss", "grad_norm", "accuracy", "margin")
    assert set(keys) <= set(slow[0]), slow[0]
    assert_same_run(fast, slow, keys)
