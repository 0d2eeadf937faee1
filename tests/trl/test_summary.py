"""The start-of-training summary: one block after step 1 of a patched trainer, saying what ran and every fallback."""

from __future__ import annotations

import logging

import pytest
from datasets import Dataset

import fastft
from fastft import _log
from fastft.model import FastModel
from fastft.offline import save_tiny_model
from tests.trl._common import common_args, fused_head_available

DATA = [{"prompt": "What is 1+2?", "completion": " 3"}, {"prompt": "Name a colour.", "completion": " Red."}] * 4


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model(str(tmp_path_factory.mktemp("summary") / "tiny"), "llama")


def _train_sft(model_dir, tmp_path, *, patched=True, lora_kwargs=None, **args):
    from trl import SFTConfig, SFTTrainer

    fastft.unpatch()
    if patched:
        fastft.PatchFastRL("SFT")
    try:
        model, tokenizer = FastModel.from_pretrained(model_dir)
        model = FastModel.get_peft_model(model, r=4, **(lora_kwargs or {}))
        config = SFTConfig(**common_args(tmp_path, max_steps=2, per_device_train_batch_size=2, **args))
        trainer = SFTTrainer(model=model, args=config, train_dataset=Dataset.from_list(DATA), processing_class=tokenizer)
        trainer.train()
    finally:
        fastft.unpatch()
    return trainer


def _block(out: str) -> list[str]:
    lines = out.splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith("fastft: SFTTrainer step 1")]
    assert len(starts) == 1, f"expected one summary block, got {len(starts)}:\n{out}"
    block = [lines[starts[0]]]
    for line in lines[starts[0] + 1 :]:
        if not line.startswith("  "):
            break
        block.append(line)
    return block


def _row(block: list[str], name: str) -> str:
    hits = [line.split(name, 1)[1].strip() for line in block if line.strip().startswith(name)]
    assert hits, f"no {name!r} row in:\n" + "\n".join(block)
    return hits[0]


def test_bf16_default_run_says_what_ran_once(model_dir, tmp_path, capsys):
    """TRL's defaults (bf16 autocast on CPU, checkpointing on): the block names the precision, the fused LoRA calls
    of step 1, the loss head that really ran, the optimizer fastft built and the checkpointing mode."""
    _train_sft(model_dir, tmp_path, bf16=True)
    block = _block(capsys.readouterr().out)
    assert _row(block, "precision").startswith("bf16 mixed precision")
    assert _row(block, "kernels") == "llama: patched rope, rms_norm, mlp:swiglu, fused_loss"
    lora = _row(block, "fused LoRA")
    assert lora.startswith("installed on 2 MLPs, 8 attention projections; step 1: ")
    assert "mlp fused" in lora and "linear fused" in lora and "peft" not in lora  # bf16 autocast runs fused
    assert "rms_norm x" in _row(block, "ran in step 1")
    head = _row(block, "loss head")
    assert head.startswith("fastft chunked cross-entropy" if fused_head_available() else "TRL's SFT code")
    assert "built by fastft.optim" in _row(block, "optimizer")
    assert _row(block, "checkpointing").startswith("standard")  # TRL's default gradient_checkpointing=True, on CPU
    notes = "\n".join(block)
    assert "gradient checkpointing: standard (TRL's gradient_checkpointing=True)" in notes


def test_every_fallback_is_listed_with_its_reason_even_when_said_before(model_dir, tmp_path, capsys):
    """lora_dropout > 0 makes every fused LoRA call fall back: the block says PEFT's path ran, and the notes give the
    reason -- on a second run in the same process too, where the once-only log line is not repeated."""
    for _ in range(2):
        _train_sft(model_dir, tmp_path, lora_kwargs={"lora_dropout": 0.1}, gradient_checkpointing=False)
        block = _block(capsys.readouterr().out)
        lora = _row(block, "fused LoRA")
        assert "mlp peft x" in lora and "fused" not in lora.split("step 1:")[1], lora
        assert any("lora_dropout > 0 (dropout makes the fused path inexact)" in line for line in block), block
        assert _row(block, "checkpointing") == "off"


def test_unpatched_trainer_prints_no_summary(model_dir, tmp_path, capsys):
    _train_sft(model_dir, tmp_path, patched=False)
    assert "step 1 (PatchFastRL" not in capsys.readouterr().out


def test_fastft_log_env_sets_the_level_and_rejects_unknown_values():
    logger = logging.getLogger("fastft")
    level, handlers = logger.level, list(logger.handlers)
    try:
        assert _log.configure_from_env("DEBUG") == "debug"
        assert logger.level == logging.DEBUG
        assert any(getattr(h, "_fastft_env", False) for h in logger.handlers)
        _log.configure_from_env("debug")  # idempotent: one handler
        assert sum(getattr(h, "_fastft_env", False) for h in logger.handlers) == 1
        with pytest.warns(UserWarning, match="FASTFT_LOG='verbose' is not a level; use one of debug, info"):
            assert _log.configure_from_env("verbose") is None
    finally:
        logger.setLevel(level)
        logger.handlers[:] = handlers
