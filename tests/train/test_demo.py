"""``fastft demo --quick`` runs every stage (model build, SFT, GRPO, reports) offline and prints measured numbers."""

from __future__ import annotations

import os
import re
import subprocess
import sys


def test_demo_quick_end_to_end(tmp_path):
    env = dict(os.environ, TRITON_INTERPRET="0", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    out = tmp_path / "demo"
    proc = subprocess.run([sys.executable, "-m", "fastft", "demo", "--quick", "--output-dir", str(out)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = proc.stdout
    assert f"writing to {out}" in text and "on CPU" in text
    assert re.search(r"SFT step +8/8: loss \d+\.\d+", text)
    assert len(re.findall(r"GRPO step +\d/2: mean sampled reward \d\.\d{3}", text)) == 2
    assert re.search(r"greedy accuracy on the 100 problems: after SFT \d+% -> after GRPO \d+%", text)
    for stage in ("sft", "grpo"):
        assert os.path.isfile(out / stage / "report.md")
    assert os.path.isfile(out / "grpo" / "reward.png")
    report = open(out / "grpo" / "report.md").read()
    assert "| reward |" in report.replace("| loss | reward |", "| reward |") and "CPU" in report
