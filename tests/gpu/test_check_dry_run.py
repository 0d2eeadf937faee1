"""The prepared GPU check runs end to end on CPU (``--dry-run``), so the script that will use the first GPU hour
cannot rot: every stage runs (environment, the CUDA tests collected and skipped, every kernel benchmark, the
end-to-end step for fastft and the transformers+PEFT baseline) and the report and JSON say what ran."""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_gpu_check_dry_run_end_to_end(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST") and k != "FASTFT_TEST_DEVICE"}
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHON"] = sys.executable  # the interpreter running the tests, wherever its venv lives
    proc = subprocess.run(
        [str(REPO / "benchmarks/gpu/check.sh"), str(tmp_path), "--dry-run"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    result = json.loads((tmp_path / "results.json").read_text())
    report = (tmp_path / "report.md").read_text()
    assert result["dry_run"] and "DRY RUN" in report
    assert all(v == "ok" for k, v in result["environment"].items() if k.startswith("import fastft")), result
    # the CUDA-only tests collect and skip cleanly on CPU: nothing failed, nothing passed by accident
    (tier,) = result["suite"]
    assert tier["counts"]["skipped"] >= 10 and tier["counts"]["passed"] == tier["counts"]["failed"] == 0, tier
    assert tier["counts"]["error"] == 0 and not tier["timed_out"], tier
    measured = {(r["op"], r["impl"], r["pass"]) for r in result["kernels"]["rows"] if "ms" in r}
    for op in ("rms_norm", "swiglu", "rope", "cross_entropy"):
        for impl in ("fastft", "eager", "compile"):
            assert (op, impl, "fwd+bwd") in measured, (op, impl, result["kernels"]["rows"])
    assert ("linear_cross_entropy", "fastft", "fwd+bwd") in measured
    steps = {r["impl"]: r for r in result["steps"]}
    for impl in ("fastft", "baseline"):
        (row,) = steps[impl]["rows"]
        assert row["tokens_per_s"] > 0 and len(row["losses"]) == 1, steps[impl]
    # same random weights, data and seed: the first-step losses agree
    assert abs(steps["fastft"]["rows"][0]["losses"][0] - steps["baseline"]["rows"][0]["losses"][0]) < 1e-2
    assert "liger" in steps  # imported and measured, or a stated reason
    assert steps["liger"].get("rows") or steps["liger"].get("error")
    assert "| tiny | lora | fastft | 32 |" in report
    # the modeled (roofline) step for the same rows sits beside the measured one (fastft and the baseline)
    modeled = {(r["impl"], r["tokens"]): r for r in result["modeled"]["rows"]}
    assert modeled[("fastft", 32)]["seconds_per_step"] > 0 and modeled[("baseline", 32)]["seconds_per_step"] > 0
    assert "modeled (roofline) s/step" in report
