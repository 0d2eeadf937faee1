"""One short SFT step through the Triton kernels (interpreter on CPU): the training path really dispatches to them."""

from __future__ import annotations

import os

import pytest

from fastft.kernels._launch import INTERPRETER
from fastft.train.config import load_config
from fastft.train.run import run
from tests.train.conftest import example


@pytest.mark.skipif(not INTERPRETER, reason="needs TRITON_INTERPRET=1 (set by tests/conftest.py) or a GPU")
def test_sft_run_triton_interpreter(tmp_path):
    cfg = load_config(
        example("sft_tiny.yaml"), [f"output_dir={tmp_path}", "trainer.max_steps=1", "trainer.per_device_train_batch_size=2"]
    )
    result = run(cfg)
    text = open(result.report_path).read()
    assert "rms_norm: triton" in text and "swiglu: triton" in text
    assert "rms_norm: torch" not in text
    assert os.path.isfile(os.path.join(tmp_path, "loss.png"))
