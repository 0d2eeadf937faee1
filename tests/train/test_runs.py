"""End-to-end ``fastft train`` runs from the example YAMLs on a tiny offline model, plus stop-and-resume."""

from __future__ import annotations

import math
import os
import signal

import pytest

from fastft.cli import main
from fastft.train.config import load_config
from fastft.train.report import series
from fastft.train.run import run
from tests.train.conftest import example

pytestmark = pytest.mark.usefixtures("torch_path")


def _losses(log_history, key="loss"):
    return dict(zip(*series(log_history, key)))


def _check_report(out, *, pngs=("loss.png",)):
    text = open(os.path.join(out, "report.md")).read()
    for needle in ("tokens/second", "peak memory", "CPU process peak RSS", "## Fast paths", "model patches: fastft:"):
        assert needle in text, needle
    for png in pngs:
        with open(os.path.join(out, png), "rb") as fh:
            assert fh.read(8) == b"\x89PNG\r\n\x1a\n"
    return text


def test_sft_from_yaml_cli(tmp_path, capsys):
    out = str(tmp_path / "sft")
    assert (
        main(
            [
                "train",
                example("sft_tiny.yaml"),
                "--set",
                f"output_dir={out}",
                "--set",
                "trainer.max_steps=3",
                "--set",
                "data.eval_size=8",
                "--set",
                "trainer.eval_steps=3",
            ]
        )
        == 0
    )
    assert "training finished at step 3" in capsys.readouterr().out
    text = _check_report(out)
    assert "TRL's trainer with fastft's fast hooks" in text
    assert "| 3 |" in text and "eval_loss" in text  # periodic eval ran (eval split held out)
    assert os.path.isfile(os.path.join(out, "adapter_model.safetensors"))


def test_dpo_from_yaml(tmp_path):
    cfg = load_config(example("dpo_tiny.yaml"), [f"output_dir={tmp_path}", "trainer.max_steps=2"])
    result = run(cfg)
    losses = _losses(result.log_history)
    assert sorted(losses) == [1, 2] and all(math.isfinite(v) for v in losses.values())
    assert abs(losses[1] - math.log(2)) < 0.05  # DPO starts at -log(sigmoid(0)) when policy == reference
    _check_report(str(tmp_path))


def test_grpo_from_yaml(tmp_path):
    cfg = load_config(example("grpo_tiny.yaml"), [f"output_dir={tmp_path}", "trainer.max_steps=2"])
    result = run(cfg)
    rewards = _losses(result.log_history, "reward")
    assert sorted(rewards) == [1, 2] and all(0.0 <= v <= 1.5 for v in rewards.values())
    assert any("rewards/exact_answer/mean" in h for h in result.log_history)
    _check_report(str(tmp_path), pngs=("loss.png", "reward.png"))


class _SigtermAt:
    """Sends this process SIGTERM at the end of step ``k`` -- the real preemption path, signal handler included."""

    def __new__(cls, k):
        from transformers import TrainerCallback

        class Cb(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                if state.global_step == k:
                    os.kill(os.getpid(), signal.SIGTERM)

        return Cb()


def test_sigterm_checkpoint_then_resume_matches_uninterrupted_run(tmp_path):
    overrides = ["trainer.max_steps=6", "trainer.logging_steps=1", "optim.lr_scheduler_type=linear"]
    full = run(load_config(example("sft_tiny.yaml"), [*overrides, f"output_dir={tmp_path / 'full'}"]))
    reference = _losses(full.log_history)
    assert sorted(reference) == [1, 2, 3, 4, 5, 6]

    cfg = load_config(example("sft_tiny.yaml"), [*overrides, f"output_dir={tmp_path / 'cut'}"])
    first = run(cfg, callbacks=[_SigtermAt(3)])
    assert first.stopped_reason == "signal SIGTERM" and first.global_step == 3
    ckpt = first.checkpoint
    for name in ("adapter_model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json"):
        assert os.path.isfile(os.path.join(ckpt, name)), name
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handler restored after training

    second = run(cfg, resume=True)
    assert second.resumed_from == ckpt and second.global_step == 6
    resumed = _losses(second.log_history)
    assert sorted(resumed) == [1, 2, 3, 4, 5, 6]  # the checkpoint's history plus the new steps
    for step in range(1, 7):
        assert resumed[step] == pytest.approx(reference[step], rel=1e-6, abs=1e-7), step
    assert "resumed from" in open(second.report_path).read()


def test_max_minutes_budget_saves_and_exits_zero(tmp_path, capsys):
    out = str(tmp_path / "budget")
    code = main(["train", example("sft_tiny.yaml"), "--set", f"output_dir={out}", "--max-minutes", "0.0001"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "stopped early (time budget of 0.0001 min (--max-minutes)) at step 1" in printed
    assert "resume with: fastft train" in printed and "--resume" in printed
    assert os.path.isfile(os.path.join(out, "checkpoint-1", "optimizer.pt"))
    # --resume with no checkpoint is an error; resume: auto then simply starts fresh.
    assert main(["train", example("sft_tiny.yaml"), "--set", f"output_dir={tmp_path / 'empty'}", "--resume"]) == 2
    assert "no checkpoint-* directory" in capsys.readouterr().err
