"""PatchFastRL("ORPO" / "CPO" / "OnlineDPO") vs the unpatched trl.experimental trainers: same per-step losses and
metrics (fp32, LoRA, seed 0).

These rows have no lean head: each trainer calls ``model(...)`` without labels and reads the full ``.logits`` in its
own method (``concatenated_forward`` / ``_forward``), so fastft could only make the head lean by copying that method.
They get fastft.optim's optimizer, the checkpointing rule and the step-1 summary, which says why; no fastft head
kernel runs (asserted), and the losses equal TRL's.
"""

import importlib

import pytest
from datasets import Dataset

from tests.trl._common import assert_same_run, common_args, lora_config, run
from tests.trl.test_dpo import PAIRS


def _has(module: str) -> bool:
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True


def _make(algorithm: str, tmp_path):
    def make(cls, model, tokenizer):
        module = importlib.import_module(f"trl.experimental.{algorithm.lower().replace('onlinedpo', 'online_dpo')}")
        config_cls = getattr(module, f"{algorithm}Config")
        base = common_args(tmp_path, per_device_train_batch_size=2)
        if algorithm == "OnlineDPO":
            args = config_cls(**base, max_new_tokens=6, max_length=48, temperature=1.0)
            dataset = Dataset.from_list([{"prompt": row["prompt"]} for row in PAIRS])
            # a deterministic reward: longer completions win (no reward model to download)
            extra = dict(reward_funcs=lambda completions, **_: [float(len(c)) for c in completions])
        else:
            args = config_cls(**base, max_length=48)
            dataset, extra = Dataset.from_list(PAIRS), {}
        return cls(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                   peft_config=lora_config(), **extra)

    return make


KEYS = {"ORPO": ("loss", "grad_norm", "nll_loss", "log_odds_ratio", "rewards/chosen", "logits/chosen"),
        "CPO": ("loss", "grad_norm", "nll_loss", "rewards/chosen", "rewards/rejected", "logits/chosen"),
        "OnlineDPO": ("loss", "grad_norm", "objective/kl", "objective/scores", "rewards/chosen")}


@pytest.mark.parametrize("algorithm", list(KEYS))
def test_experimental_rows_match_trl_and_say_why_no_lean_head(algorithm, tmp_path, capsys):
    module = {"ORPO": "orpo", "CPO": "cpo", "OnlineDPO": "online_dpo"}[algorithm]
    if not _has(f"trl.experimental.{module}"):
        pytest.skip(f"this TRL has no trl.experimental.{module}")
    trainers = []
    fast, calls = run(algorithm, True, _make(algorithm, tmp_path / "fast"), keep=trainers)
    block = capsys.readouterr().out
    slow, _ = run(algorithm, False, _make(algorithm, tmp_path / "slow"))
    assert calls == 0, f"{algorithm} has no lean head, yet fastft's head kernels ran {calls} times"
    optimizer = trainers[0].optimizer
    assert getattr(getattr(optimizer, "optimizer", optimizer), "_fastft_built", False), "fastft.optim not used"
    assert f"(PatchFastRL({algorithm!r}))" in block and "no lean head:" in block, block
    keys = tuple(key for key in KEYS[algorithm] if key in slow[0])
    assert {"loss", "grad_norm"} <= set(keys) and len(keys) >= 4, slow[0]
    assert_same_run(fast, slow, keys)
