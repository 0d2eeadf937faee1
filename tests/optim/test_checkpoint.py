"""Resume through the HF Trainer: a run resumed from checkpoint-3 logs the same losses as the uninterrupted run.

The Trainer saves ``optimizer.state_dict()`` and the LR scheduler at ``save_steps`` and restores both on
``resume_from_checkpoint``; GaLore's projectors and step counters must ride along, so the projector refresh at step 4
(update_proj_gap=2 -> refreshes at steps 1, 3, 5) and the linear LR decay continue exactly.
"""

import pytest
import torch
from datasets import Dataset
from transformers import Trainer, TrainingArguments

from fastft.offline import build_tiny_model
from fastft.optim import create_optimizer


class _Trainer(Trainer):
    """How the patched trainers call us."""

    def create_optimizer(self, model=None):
        if self.optimizer is None:
            self.optimizer = create_optimizer(self.model, self.args)
        return self.optimizer


def _dataset():
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 384, (8, 16), generator=gen).tolist()
    return Dataset.from_dict({"input_ids": ids, "labels": ids})


def _run(out_dir, optim, resume=None, max_grad_norm=1.0):
    extra = {"8bit": "rank=8,update_proj_gap=2,min_8bit_size=256"}.get(
        "8bit" if "8bit" in optim else "", "rank=8,update_proj_gap=2"
    )
    args = TrainingArguments(
        str(out_dir),
        optim=optim,
        optim_target_modules=["self_attn", "mlp"] if "galore" in optim else None,
        optim_args=extra if "galore" in optim else None,
        learning_rate=3e-3,
        lr_scheduler_type="linear",
        weight_decay=0.01,
        per_device_train_batch_size=2,
        max_steps=6,
        save_steps=3,
        save_strategy="steps",
        logging_steps=1,
        use_cpu=True,
        report_to="none",
        seed=0,
        disable_tqdm=True,
        max_grad_norm=0.0 if optim.endswith("layerwise") else max_grad_norm,
        dataloader_num_workers=0,
    )
    trainer = _Trainer(model=build_tiny_model().train(), args=args, train_dataset=_dataset())
    trainer.train(resume_from_checkpoint=resume)
    losses = {h["step"]: h["loss"] for h in trainer.state.log_history if "loss" in h}
    if hasattr(trainer.optimizer, "disable_layerwise"):
        trainer.optimizer.disable_layerwise()
    return losses, trainer


@pytest.mark.parametrize(
    "optim", ["adamw_torch", "adamw_8bit", "galore_adamw", "galore_adamw_8bit", "galore_adafactor", "galore_adamw_layerwise"]
)
def test_resume_continues_exactly(tmp_path, optim):
    full, trainer = _run(tmp_path / "a", optim)
    assert sorted(full) == [1, 2, 3, 4, 5, 6]
    if "galore" in optim:
        inner = getattr(trainer.optimizer, "optimizer", trainer.optimizer)  # accelerate wraps it
        saved = torch.load(tmp_path / "a" / "checkpoint-3" / "optimizer.pt", weights_only=True)
        keys = set().union(*(s.keys() for s in saved["state"].values()))
        assert {"step", "proj_right", "exp_avg_sq_row" if "adafactor" in optim else "exp_avg"} <= keys, keys
        assert type(inner).__name__.startswith("GaLore")
    resumed, _ = _run(tmp_path / "a", optim, resume=str(tmp_path / "a" / "checkpoint-3"))
    for step in (4, 5, 6):
        assert resumed[step] == pytest.approx(full[step], rel=1e-6, abs=1e-6), (step, full, resumed)
    assert full[6] < full[1]  # and it is training


def test_layerwise_under_trainer_matches_regular_including_lr_schedule(tmp_path):
    # The Trainer's linear LR scheduler writes the optimizer's param groups; the layer-wise hooks must read those
    # (accelerate reloads the optimizer state on prepare, which replaces the group dicts).
    regular, _ = _run(tmp_path / "r", "galore_adamw", max_grad_norm=0.0)
    layerwise, trainer = _run(tmp_path / "l", "galore_adamw_layerwise")
    assert layerwise == pytest.approx(regular, rel=1e-5, abs=1e-6)
    assert trainer.lr_scheduler.get_last_lr()[0] == pytest.approx(0.0)
