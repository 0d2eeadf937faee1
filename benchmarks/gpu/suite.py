"""Run the test suite for the GPU check and count what passed, failed, errored and skipped.

Tiers run in order, each under its own time limit, so the kernel tests always report even when the slower model and
TRL tests cannot finish in the check's 8 minutes. Outcomes stream to a JSON-lines file (outcomes_plugin), so a tier
stopped at its limit still counts the tests it ran.
"""

from __future__ import annotations

import collections
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def run_tier(
    name: str, paths: list[str], out: Path, *, device: str, limit_s: float, workers: int, extra: list[str] | None = None
) -> dict:
    """Run ``pytest paths`` with FASTFT_TEST_DEVICE=device; returns counts, failures and whether it hit the limit."""
    outcomes = out / f"suite_{name}.jsonl"
    outcomes.unlink(missing_ok=True)
    env = dict(os.environ, FASTFT_TEST_DEVICE=device, FASTFT_OUTCOMES=str(outcomes))
    if device == "cuda":
        env.pop("TRITON_INTERPRET", None)
    else:
        env["TRITON_INTERPRET"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-p",
        "benchmarks.gpu.outcomes_plugin",
        "-p",
        "no:cacheprovider",
        *(["-n", str(workers)] if workers > 1 else ["-n", "0"]),
        *(extra or []),
        *paths,
    ]
    t0 = time.perf_counter()
    log = out / f"suite_{name}.log"
    with open(log, "w") as f:
        try:
            proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=limit_s)
            rc, timed_out = proc.returncode, False
        except subprocess.TimeoutExpired:
            rc, timed_out = None, True
    lines = [json.loads(x) for x in outcomes.read_text().splitlines()] if outcomes.exists() else []
    counts = collections.Counter(x["outcome"] for x in lines)
    return {
        "tier": name,
        "paths": paths,
        "device": device,
        "returncode": rc,
        "timed_out": timed_out,
        "limit_s": limit_s,
        "seconds": round(time.perf_counter() - t0, 1),
        "counts": {k: counts.get(k, 0) for k in ("passed", "failed", "error", "skipped")},
        "failures": [
            {"test": x["test"], "message": x.get("message", "")[-600:]} for x in lines if x["outcome"] in ("failed", "error")
        ][:40],
        "log": log.name,
        "log_tail": log.read_text()[-2000:] if rc not in (0, 5) else "",
    }
