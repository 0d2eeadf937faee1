"""The fast SFT head runs in every configuration TRL users start from, with losses equal to unpatched TRL's.

Model given as a string (a local directory), a plain transformers model, a user-made PEFT model, FastModel with and
without LoRA; fp32 or bf16 mixed precision through accelerate; with and without gradient checkpointing. Path counts
prove fastft's head ran (``assert_head_calls``). Under bf16 autocast accelerate wraps ``model.forward`` of a non-PEFT
model (``convert_outputs_to_fp32(autocast(...))``), which once hid TRL's fused forward from PatchFastRL.

fp16 on CPU: TrainingArguments and accelerate accept ``fp16=True`` with ``use_cpu=True``, but accelerate turns native
AMP off there (``native_amp`` False: no autocast, no wrapper, no grad scaler), so the step runs in fp32; the fp16 cells
assert exactly that, so a release that starts autocasting fp16 on CPU shows up here. Real fp16 autocast needs a GPU.
"""

import pytest
import torch
from datasets import Dataset

import fastft
from fastft.offline import build_tiny_model, build_tokenizer, save_tiny_model
from tests.trl._common import _kernel_calls, assert_head_calls, assert_same_run, common_args, lora_config, trainer_class
from tests.trl.test_sft import PROMPT_COMPLETION

STEPS = 2


def _model(source: str, directory: str):
    if source == "string":
        return directory  # TRL loads it (AutoModelForCausalLM.from_pretrained)
    if source == "plain":
        return build_tiny_model("llama")
    if source == "peft":
        from peft import get_peft_model

        return get_peft_model(build_tiny_model("llama"), lora_config())
    from fastft import FastModel

    model, _ = FastModel.from_pretrained(directory, dtype=torch.float32)
    if source == "fastmodel_lora":
        model = FastModel.get_peft_model(model, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"])
    return model


def _train(patched: bool, source: str, precision: str, checkpointing: bool, tmp_path, directory: str):
    from trl import SFTConfig

    cls = trainer_class("SFT", patched)
    try:
        model = _model(source, directory)
        torch.manual_seed(0)
        args = SFTConfig(
            **common_args(
                tmp_path,
                max_steps=STEPS,
                per_device_train_batch_size=2,
                max_length=48,
                bf16=precision == "bf16",
                fp16=precision == "fp16",
                gradient_checkpointing=checkpointing,
                completion_only_loss=True,
            )
        )
        before = _kernel_calls()
        trainer = cls(
            model=model, args=args, train_dataset=Dataset.from_list(PROMPT_COMPLETION), processing_class=build_tokenizer()
        )
        trainer.train()
        calls = _kernel_calls() - before
    finally:
        fastft.unpatch()
    rows = [row for row in trainer.state.log_history if "loss" in row]
    assert len(rows) == STEPS, rows
    return rows, calls, trainer.accelerator.native_amp


CELLS = [
    (source, precision, False)
    for source in ("string", "plain", "peft", "fastmodel", "fastmodel_lora")
    for precision in ("fp32", "bf16")
]
CELLS += [("plain", "fp16", False), ("fastmodel_lora", "fp16", False)]
CELLS += [("plain", "bf16", True), ("fastmodel_lora", "bf16", True), ("peft", "fp32", True)]


@pytest.mark.parametrize(
    "source,precision,checkpointing", CELLS, ids=[f"{s}-{p}-{'gc' if c else 'nogc'}" for s, p, c in CELLS]
)
def test_fast_head_runs_in_every_configuration(source, precision, checkpointing, tmp_path):
    directory = save_tiny_model(str(tmp_path / "model"), "llama")
    fast, calls, native_amp = _train(True, source, precision, checkpointing, tmp_path / "fast", directory)
    slow, _, _ = _train(False, source, precision, checkpointing, tmp_path / "slow", directory)
    assert native_amp == (precision == "bf16"), f"{precision}: accelerate native_amp={native_amp} on CPU"
    assert_head_calls(calls, "linear_cross_entropy")
    # bf16: TRL projects the LM head in bf16 under autocast, fastft in the head's fp32 (more precise): equal to bf16
    # rounding of the logits. fp32: float rounding.
    tolerance = dict(rtol=2e-2, atol=2e-3) if precision == "bf16" else dict(rtol=2e-5, atol=2e-6)
    assert_same_run(fast, slow, ("loss",), **tolerance)
