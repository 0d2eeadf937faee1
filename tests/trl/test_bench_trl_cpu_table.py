"""benchmarks/bench_trl_cpu.py's table: the paired column is the median of per-step ratios of runs made side by side
(same ``pair``), warm-up steps left out; runs that were not paired give "n/a"."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_trl_cpu.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_trl_cpu", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(variant: str, times: list[float], pair: int | None = None) -> dict:
    run = dict(
        algo="sft",
        model="llama",
        dtype="bf16",
        variant=variant,
        step_times=times,
        step_cpu=times,
        losses=[1.0, 2.0],
        peak_rss_mb=100.0,
        train_rss_mb=10.0,
        head_kernel_calls=3,
    )
    if pair is not None:
        run["pair"] = pair
    return run


def _row(text: str) -> dict[str, str]:
    head, _, row = text.splitlines()
    names = [c.strip() for c in head.strip("|").split("|")]
    return dict(zip(names, (c.strip() for c in row.strip("|").split("|")), strict=True))


def test_paired_ratio_is_the_median_of_per_step_ratios_within_each_pair(bench):
    # pair 0: ratios 0.5, 0.5 after the warm-up step; pair 1: 2.0, 2.0, 0.9 -> median of (0.5, 0.5, 2, 2, 0.9) = 0.9.
    # Across pairs (plain of pair 0 with fastft of pair 1) the ratios would differ: they must not be mixed.
    results = [
        _run("plain", [9.0, 2.0, 2.0], pair=0),
        _run("fastft", [9.0, 1.0, 1.0], pair=0),
        _run("plain", [9.0, 1.0, 1.0, 1.0], pair=1),
        _run("fastft", [9.0, 2.0, 2.0, 0.9], pair=1),
    ]
    row = _row(bench.table(results, warmup=1))
    assert row["paired step ratio"] == "0.90"
    assert row["time ratio fastft/plain"] == "1.00"  # medians of all steps pooled: 1.5 / 1.5


def test_unpaired_runs_have_no_paired_ratio(bench):
    row = _row(bench.table([_run("plain", [1.0, 2.0]), _run("fastft", [1.0, 1.0])], warmup=0))
    assert row["paired step ratio"] == "n/a"
    assert row["time ratio fastft/plain"] == "0.67"
