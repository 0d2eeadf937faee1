"""`fastft train --resume` refuses a checkpoint written by a different number of processes, before loading anything."""

import os

import pytest

from fastft.train.config import ConfigError, load_config
from fastft.train.run import run

EXAMPLES = os.path.join(os.path.dirname(__file__), "..", "..", "examples")


def test_resume_from_a_two_process_checkpoint_in_one_process_is_a_clear_error(tmp_path):
    ckpt = tmp_path / "checkpoint-3"
    ckpt.mkdir()
    for rank in (0, 1):  # what the HF Trainer writes when world_size == 2
        (ckpt / f"rng_state_{rank}.pth").write_bytes(b"")
    (ckpt / "trainer_state.json").write_text("{}")
    cfg = load_config(os.path.join(EXAMPLES, "sft_tiny.yaml"), [f"output_dir={tmp_path}"])
    with pytest.raises(ConfigError, match="saved by 2 process.*--num_processes 2"):
        run(cfg, resume=True)
