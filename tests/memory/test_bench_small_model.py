"""The small-model benchmark's measuring function, at a tiny shape: fastft's step peak is below the baseline's, and both
compute the same loss. Runs in-process (the benchmark runs each variant in a subprocess), baseline first, because
fastft's RoPE patch is process-wide until conftest reverts it after the test."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest

from fastft.kernels._launch import force_path
from fastft.offline import save_tiny_model

_SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_model_step_memory.py"
_spec = importlib.util.spec_from_file_location("bench_model_step_memory", _SCRIPT)
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)

# Vocab large enough that the [tokens, vocab] logits dominate the step, as they do for real models: the baseline holds
# them (and their fp32 log-softmax) whole, fastft one chunk of >= 64 rows at a time.
VOCAB, SEQ = 8192, 128


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    return save_tiny_model(str(tmp_path_factory.mktemp("bench_small_model")), "llama", vocab_size=VOCAB)


@pytest.fixture(scope="module")
def baseline(model_dir):
    return bench.measure_step("baseline", model_dir, SEQ, warmup=0, steps=0)


@pytest.mark.parametrize("path", ["torch", "triton"])
def test_fastft_step_peak_below_baseline_same_loss(model_dir, baseline, path):
    with force_path(path):  # "torch" = the benchmark's cpu rows; "triton" = its interpreter rows (conftest sets it)
        # One timed step on the torch path only: the interpreter is ~100x slower, and the timing code is path-blind.
        fast = bench.measure_step("fastft", model_dir, SEQ, warmup=0, steps=1 if path == "torch" else 0)
    # The path the benchmark reports is the path that ran, and only that one.
    assert fast["fastft_paths"].get(path, 0) > 0 and set(fast["fastft_paths"]) == {path}, fast["fastft_paths"]
    assert baseline["fastft_paths"] == {}
    # Same weights, same ids (own generator: get_peft_model reseeds the global RNG), LoRA B = 0 at step 1.
    assert math.isclose(fast["loss"], baseline["loss"], rel_tol=1e-5), (fast["loss"], baseline["loss"])
    assert math.isclose(fast["loss"], math.log(VOCAB), rel_tol=0.05)  # a random model: about uniform
    # Whole logits (128 x 8192 fp32 = 4 MiB) plus their log-softmax vs one 64-row chunk: well under half.
    assert fast["peak_bytes"] < 0.5 * baseline["peak_bytes"], (fast["peak_bytes"], baseline["peak_bytes"])
    logits = SEQ * VOCAB * 4
    assert baseline["peak_bytes"] > logits  # the baseline really materializes the logits
    if path == "torch":
        # The timed step ran untracked and, with no optimizer update, computed the same loss again.
        assert len(fast["step_seconds"]) == 1 and fast["step_seconds"][0] > 0
        assert fast["later_losses"] == [pytest.approx(fast["loss"], rel=1e-6)]
        assert fast["launches"] == {}
    else:
        assert fast["step_seconds"] == []
        assert sum(fast["launches"].values()) > 0  # kernels really ran in the interpreter, counted by name
