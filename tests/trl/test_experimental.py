"""PatchFastRL("ORPO" / "CPO" / "OnlineDPO") as a user meets it: the trainer from trl.experimental, patched in place,
trains with fastft.optim's optimizer and fastft's lean head (path counts; ``fastft.patches.trl_preference``), the
step-1 summary names the row and the head, and the per-step losses and metrics equal unpatched TRL's (fp32, LoRA,
seed 0). Online DPO samples its completions for real (same seed both ways). The lean head's own parity cases (guards,
a user override, changed TRL text, the mean-logit identity) are in ``test_preference_lean.py``.
"""

import importlib

import pytest
from datasets import Dataset

from fastft.patches.trl import lean_head_absent
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
        return cls(
            model=model, args=args, train_dataset=dataset, processing_class=tokenizer, peft_config=lora_config(), **extra
        )

    return make


KEYS = {
    "ORPO": ("loss", "grad_norm", "nll_loss", "log_odds_ratio", "rewards/chosen", "logits/chosen"),
    "CPO": ("loss", "grad_norm", "nll_loss", "rewards/chosen", "rewards/rejected", "logits/chosen"),
    "OnlineDPO": ("loss", "grad_norm", "objective/kl", "objective/scores", "rewards/chosen"),
}


@pytest.mark.parametrize("algorithm", list(KEYS))
def test_experimental_rows_match_trl_with_the_lean_head_and_fastft_optim(algorithm, tmp_path, capsys):
    module = {"ORPO": "orpo", "CPO": "cpo", "OnlineDPO": "online_dpo"}[algorithm]
    if not _has(f"trl.experimental.{module}"):
        pytest.skip(f"this TRL has no trl.experimental.{module}")
    trainers = []
    fast, calls = run(algorithm, True, _make(algorithm, tmp_path / "fast"), keep=trainers)
    block = capsys.readouterr().out
    slow, _ = run(algorithm, False, _make(algorithm, tmp_path / "slow"))
    absent = lean_head_absent(algorithm)  # set when this TRL's methods differ from the text the lean head implements
    if absent is None:
        assert calls > 0, f"the fast run never reached fastft's head for {algorithm}"
    else:
        assert calls == 0, f"{algorithm}: lean head absent ({absent}) yet fastft's head ran {calls} times"
    optimizer = trainers[0].optimizer
    assert getattr(getattr(optimizer, "optimizer", optimizer), "_fastft_built", False), "fastft.optim not used"
    assert f"(PatchFastRL({algorithm!r}))" in block, block
    assert ("fastft chunked cross-entropy" if absent is None else absent) in block, block
    keys = tuple(key for key in KEYS[algorithm] if key in slow[0])
    assert {"loss", "grad_norm"} <= set(keys) and len(keys) >= 4, slow[0]
    assert_same_run(fast, slow, keys)
