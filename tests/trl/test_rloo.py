"""FastRLOOTrainer vs TRL's RLOOTrainer: same per-step loss, grad norm, KL and entropy (fp32, LoRA, beta > 0 so the
reference pass runs with the adapters disabled, steps_per_generation > 1 so the old-policy pass runs too).

Generations are fixed at TRL's own seam, ``RLOOTrainer._generate_single_turn``, exactly as in ``test_grpo.py``.
"""

import pytest

from tests.trl._common import assert_head_calls, assert_same_run, run
from tests.trl.test_grpo import fixed_generations, make_online_trainer

rloo_module = pytest.importorskip("trl.trainer.rloo_trainer", reason="this TRL has no trl.trainer.rloo_trainer")


def rloo_generations(self, prompt_ids, images, multimodal_fields):
    return fixed_generations(self, prompt_ids, images, multimodal_fields)[0]  # RLOO returns the ids alone


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_rloo_matches_trl(temperature, tmp_path, monkeypatch):
    monkeypatch.setattr(rloo_module.RLOOTrainer, "_generate_single_turn", rloo_generations)
    fast, calls = run("RLOO", True, make_online_trainer(tmp_path / "fast", "RLOOConfig", temperature=temperature))
    slow, _ = run("RLOO", False, make_online_trainer(tmp_path / "slow", "RLOOConfig", temperature=temperature))
    assert_head_calls(calls, "selective_log_softmax")
    assert any(abs(row["loss"]) > 1e-6 for row in slow), "degenerate run: every loss is zero"
    assert_same_run(fast, slow, ("loss", "grad_norm", "entropy"))
    # RLOO logs kl (folded into the reward) on generation steps only: the same steps both ways, equal values there.
    kl_steps = [step for step, row in enumerate(slow) if "kl" in row]
    assert kl_steps and kl_steps == [step for step, row in enumerate(fast) if "kl" in row]
    assert_same_run([fast[i] for i in kl_steps], [slow[i] for i in kl_steps], ("kl",))
