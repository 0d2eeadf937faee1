"""benchmarks/trl_conformance/run.py end to end on a stand-in of TRL's tests/ (written to tmp_path): the offline hub
stand-ins load (a ``trl-internal-testing`` model id and the ``zen`` dataset), a test runs unpatched and patched, and a
test that passes unpatched but fails patched is reported as a regression with a non-zero exit status."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "trl_conformance" / "run.py"

TESTS = """
import os

from datasets import load_dataset


def test_trains_on_stand_ins(tmp_path):
    from trl import SFTConfig, SFTTrainer

    dataset = load_dataset("trl-internal-testing/zen", "standard_prompt_completion", split="train")
    assert dataset.column_names == ["prompt", "completion"] and len(dataset) == 17
    assert set(load_dataset("trl-internal-testing/zen", "conversational_preference")) == {"train", "test"}
    args = SFTConfig(output_dir=str(tmp_path), max_steps=1, report_to="none", use_cpu=True, save_strategy="no")
    trainer = SFTTrainer(model="trl-internal-testing/tiny-Qwen2ForCausalLM-2.5", args=args, train_dataset=dataset)
    assert type(trainer.model).__name__ == "Qwen2ForCausalLM"
    trainer.train()


def test_passes_only_unpatched():
    from trl import SFTTrainer

    assert getattr(SFTTrainer, "_fastft_algorithm", None) is None
"""


@pytest.mark.benchmark
def test_conformance_script_runs_both_ways_and_reports_regressions(tmp_path):
    source = tmp_path / "trl"
    (source / "tests").mkdir(parents=True)
    (source / "tests" / "__init__.py").write_text("")
    (source / "tests" / "test_sft_trainer.py").write_text(TESTS)
    out = tmp_path / "result.json"
    done = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "--trainers",
            "SFT",
            "--source",
            str(source),
            "--workdir",
            str(tmp_path / "work"),
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 1, done.stdout + done.stderr
    row = json.loads(out.read_text())["trainers"]["SFT"]
    assert row["unpatched"] == {"passed": 2, "failed": 0, "skipped": 0}, done.stdout
    assert row["patched"] == {"passed": 1, "failed": 1, "skipped": 0}, done.stdout
    assert row["passes_unpatched_fails_patched"] == ["tests.test_sft_trainer::test_passes_only_unpatched"]
    assert "REGRESSION tests.test_sft_trainer::test_passes_only_unpatched" in done.stdout
