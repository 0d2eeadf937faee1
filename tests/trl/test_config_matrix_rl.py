"""bf16 cells of the configuration matrix for the per-token trainers (DPO, GRPO, KTO, RLOO): under accelerate's bf16
autocast the fast head runs (path counts) and the losses equal unpatched TRL's to bf16 rounding.

The SFT matrix (``test_config_matrix.py``) covers every model source; here each trainer runs its parity test's setup
(LoRA from ``peft_config``, the reference pass with the adapters disabled) for 2 steps with ``bf16=True``. TRL's head
projects in bf16 under autocast, fastft's in the head weight's fp32, so the two agree to bf16 rounding of the logits.
"""

import pytest

from tests.trl import test_dpo, test_grpo, test_kto, test_rloo
from tests.trl._common import assert_head_calls, assert_same_run, run

BF16 = dict(bf16=True, max_steps=2)
TOLERANCE = dict(rtol=3e-2, atol=3e-3)


def _setup(algorithm: str, tmp_path, monkeypatch):
    if algorithm == "GRPO":
        import trl.trainer.grpo_trainer as grpo_module

        monkeypatch.setattr(grpo_module.GRPOTrainer, "_generate_single_turn", test_grpo.fixed_generations)
        return test_grpo.make_online_trainer(tmp_path, **BF16), ("loss", "kl", "entropy")
    if algorithm == "RLOO":
        rloo_module = pytest.importorskip("trl.trainer.rloo_trainer")
        monkeypatch.setattr(rloo_module.RLOOTrainer, "_generate_single_turn", test_rloo.rloo_generations)
        return test_grpo.make_online_trainer(tmp_path, "RLOOConfig", **BF16), ("loss", "entropy")
    if algorithm == "KTO":
        pytest.importorskip("trl.trainer.kto_trainer")
        return test_kto._make(tmp_path, **BF16), ("loss", "kl", "rewards/chosen_sum", "rewards/rejected_sum")
    return test_dpo._make(tmp_path, **BF16), ("loss", "rewards/chosen", "rewards/rejected", "logits/chosen")


@pytest.mark.parametrize("algorithm", ["DPO", "GRPO", "KTO", "RLOO"])
def test_fast_head_runs_under_bf16_with_losses_equal_to_trl(algorithm, tmp_path, monkeypatch):
    make_fast, keys = _setup(algorithm, tmp_path / "fast", monkeypatch)
    make_slow, _ = _setup(algorithm, tmp_path / "slow", monkeypatch)
    trainers = []
    fast, calls = run(algorithm, True, make_fast, keep=trainers)
    slow, _ = run(algorithm, False, make_slow)
    assert trainers[0].accelerator.native_amp, "bf16 autocast is not on: this cell would test fp32"
    assert_head_calls(calls, "selective_log_softmax")
    assert any(abs(row["loss"]) > 1e-6 for row in slow), "degenerate run: every loss is zero"
    keys = tuple(key for key in keys if key in slow[0] and key in fast[0])
    assert "loss" in keys
    assert_same_run(fast, slow, keys, **TOLERANCE)
