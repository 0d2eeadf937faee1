"""``fastft demo --quick`` runs every stage (model build, SFT, GRPO, reports) offline and prints measured numbers."""

from __future__ import annotations

import os
import re
import subprocess
import sys


def test_demo_quick_end_to_end(tmp_path):
    env = dict(os.environ, TRITON_INTERPRET="0", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    out = tmp_path / "demo"
    proc = subprocess.run(
        [sys.executable, "-m", "fastft", "demo", "--quick", "--output-dir", str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = proc.stdout
    assert f"writing to {out}" in text and "on CPU" in text
    assert re.search(r"SFT step +8/8: loss \d+\.\d+", text)
    assert len(re.findall(r"GRPO step +\d/2: mean sampled reward \d\.\d{3}", text)) == 2
    assert re.search(
        r"greedy accuracy on the 100 problems: after SFT \d+% -> after GRPO \d+% \((unchanged|[+-]\d+ "
        r"points)\)",
        text,
    )
    # 2 GRPO steps are reported as a change, never as a rise
    assert (
        re.search(
            r"GRPO mean sampled reward: changed by [+-]\d\.\d{3} over 2 steps \(too few steps to call a "
            r"trend",
            text,
        )
        and "rose" not in text
    ), text
    for stage in ("sft", "grpo"):
        assert os.path.isfile(out / stage / "report.md")
    assert os.path.isfile(out / "grpo" / "reward.png")
    report = open(out / "grpo" / "report.md").read()
    assert "| reward |" in report.replace("| loss | reward |", "| reward |") and "CPU" in report


def test_reward_wording_follows_what_was_measured():
    from fastft.demo import describe_reward_change

    # the --quick run's case: a move over 2 steps is a change, not a rise
    assert describe_reward_change([0.25, 0.375]).startswith("changed by +0.125 over 2 steps (too few steps to call a trend")
    assert describe_reward_change([0.5]) == "1 logged step: no change to report"
    steady_rise = [0.1, 0.2, 0.15, 0.2, 0.3, 0.35, 0.4, 0.45, 0.5, 0.5, 0.55, 0.6]
    assert ": rose by 0.400 (more than twice its standard error" in describe_reward_change(steady_rise)
    assert ": fell by" in describe_reward_change(steady_rise[::-1])
    # the last quarter is higher, but by less than the step-to-step noise: not a rise
    noisy = [0.2, 0.6, 0.3, 0.5, 0.4, 0.3, 0.5, 0.4, 0.5, 0.35]
    text = describe_reward_change(noisy)
    assert "no clear change (+0.025, within twice its standard error" in text and "rose" not in text
