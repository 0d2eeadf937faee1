"""pytest plugin for the GPU check: append each test's outcome to a JSON-lines file as it happens.

Written per test (not at the end) so a suite stopped by the check's time limit still leaves its counts. Loaded with
``-p benchmarks.gpu.outcomes_plugin``; the file is ``$FASTFT_OUTCOMES``.
"""

import json
import os


def pytest_runtest_logreport(report):
    path = os.environ.get("FASTFT_OUTCOMES")
    if not path:
        return
    # one line per test: its call phase, or the setup phase when setup failed or skipped (call never ran)
    if report.when == "call" or (report.when == "setup" and report.outcome != "passed"):
        outcome = report.outcome
        if report.when == "setup" and outcome == "failed":
            outcome = "error"
        line = {"test": report.nodeid, "outcome": outcome, "seconds": round(report.duration, 3)}
        if outcome in ("failed", "error"):
            line["message"] = str(report.longrepr)[-1500:]
        elif outcome == "skipped" and isinstance(report.longrepr, tuple):
            line["message"] = str(report.longrepr[-1])[:300]
        with open(path, "a") as f:
            f.write(json.dumps(line) + "\n")
