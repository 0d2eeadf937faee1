"""fastft's checkpointing choice survives TRL's no-grad passes.

TRL's GRPO (old/reference log-probs) and DPO (in-step reference pass) wrap their no-grad forwards in
``disable_gradient_checkpointing``, which turns checkpointing back on through ``gradient_checkpointing_enable``:
transformers' own checkpoint function then replaced the one fastft's rule chose, so on CUDA the offloaded
checkpointing never ran in a GRPO or DPO training forward. PatchFastRL's rows pause checkpointing instead
(:func:`fastft.patches.modes.checkpointing_paused`), leaving the function as it was.

On CPU "fastft" mode is standard checkpointing by design; these tests make fastft's rule see a CUDA model
(``_on_cuda``) so it installs the offloaded function, which runs on CPU too (host copies).
"""

from __future__ import annotations

import functools

import pytest
import torch
from datasets import Dataset

import fastft
from fastft.kernels import force_path
from fastft.patches import checkpointing
from fastft.patches.modes import checkpointed_modules, checkpointing_paused, for_inference, for_training, generating
from tests.trl._common import common_args

STEPS = 2


def _offload_counter(monkeypatch) -> list[int]:
    """Make fastft's rule pick the offloaded function on CPU and count its training calls."""
    calls = [0]
    real = checkpointing._OffloadedCheckpoint.apply

    def apply(*args):
        calls[0] += 1
        return real(*args)

    monkeypatch.setattr(checkpointing, "_on_cuda", lambda model: True)
    monkeypatch.setattr(checkpointing._OffloadedCheckpoint, "apply", apply)
    return calls


def _fast_lora(tmp_path):
    from fastft.model import FastModel
    from fastft.offline import save_tiny_model

    model, tokenizer = FastModel.from_pretrained(save_tiny_model(str(tmp_path / "m"), "llama"))
    return FastModel.get_peft_model(model, r=4, target_modules=["q_proj", "v_proj", "up_proj"]), tokenizer


def _layers_use_offloaded(model) -> bool:
    layers = model.get_base_model().model.layers
    return all(
        layer.gradient_checkpointing and layer._gradient_checkpointing_func is checkpointing.offloaded_checkpoint
        for layer in layers
    )


@pytest.mark.parametrize("algorithm", ["GRPO", "DPO"])
def test_trl_no_grad_passes_keep_fastfts_checkpoint_function(algorithm, tmp_path, monkeypatch):
    import trl

    calls = _offload_counter(monkeypatch)
    assert fastft.PatchFastRL(algorithm) == {algorithm: True}
    model, tokenizer = _fast_lora(tmp_path)
    n_layers = len(model.get_base_model().model.layers)
    shared = common_args(tmp_path, max_steps=STEPS, gradient_checkpointing=True, per_device_train_batch_size=4)
    if algorithm == "GRPO":
        args = trl.GRPOConfig(**shared, num_generations=4, max_completion_length=4, beta=0.04)
        trainer = trl.GRPOTrainer(
            model=model,
            args=args,
            train_dataset=Dataset.from_list([{"prompt": f"Question {i}: what is {i}+1?"} for i in range(4)]),
            processing_class=tokenizer,
            reward_funcs=lambda completions, **_: [float(len(c)) for c in completions],
        )
    else:
        args = trl.DPOConfig(**shared, max_length=32)
        rows = [{"prompt": f"Q{i}: the fox", "chosen": " jumps high", "rejected": " sleeps"} for i in range(4)]
        trainer = trl.DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer)
    assert _layers_use_offloaded(model)
    with force_path("torch"):  # what this tests is the checkpointing, not the kernels (the interpreter is slow)
        trainer.train()
    # every training forward went through fastft's function in every layer (TRL's pause did not replace it) ...
    assert calls[0] == n_layers * STEPS, calls
    assert _layers_use_offloaded(model)
    assert all(torch.isfinite(torch.tensor(row["loss"])) for row in trainer.state.log_history if "loss" in row)


def _checkpointed_base(tmp_path, every_n_layers: int = 1):
    from fastft.offline import build_tiny_model

    model = build_tiny_model("llama", num_hidden_layers=4)
    function = functools.partial(torch.utils.checkpoint.checkpoint, use_reentrant=False)
    model._set_gradient_checkpointing(True, function, every_n_layers=every_n_layers)
    return model, function


@pytest.mark.parametrize("every_n_layers", [1, 2])
def test_checkpointing_paused_restores_exactly(every_n_layers, tmp_path):
    model, function = _checkpointed_base(tmp_path, every_n_layers)
    before = [
        (m, m.gradient_checkpointing, m._gradient_checkpointing_func)
        for m in model.modules()
        if hasattr(m, "gradient_checkpointing")
    ]
    assert [m for m, on, _ in before if on] == checkpointed_modules(model)  # what transformers' own walk sees
    assert sum(on for _, on, _ in before) == (4 if every_n_layers == 1 else 2) + (model.model.gradient_checkpointing)
    with checkpointing_paused(model):
        assert not model.is_gradient_checkpointing
        assert checkpointed_modules(model) == []
    assert [(m, m.gradient_checkpointing, m._gradient_checkpointing_func) for m, _, _ in before] == before
    with checkpointing_paused(model):  # nothing on: nothing turned on afterwards either
        with checkpointing_paused(model):
            pass
        assert not model.is_gradient_checkpointing
    assert model.is_gradient_checkpointing


def test_for_inference_turns_checkpointing_off_and_for_training_back_on(tmp_path):
    model, _ = _fast_lora(tmp_path)
    base = model.get_base_model()
    assert base.is_gradient_checkpointing and model.training
    for_inference(model)
    assert not base.is_gradient_checkpointing and not model.training and base.config.use_cache
    assert model._fastft_checkpointing  # remembered
    for_inference(model)  # twice: still remembered as on
    for_training(model)
    assert base.is_gradient_checkpointing and model.training and not base.config.use_cache


@pytest.mark.parametrize("training", [True, False])
def test_grpo_generation_puts_checkpointing_back_as_found(training, tmp_path, monkeypatch):
    """PatchFastRL's generation hook: eval mode, KV cache on and checkpointing off while TRL generates; afterwards the
    mode it found, KV cache off, and the very checkpoint function it found (for_training rebuilt fastft's own, a walk
    over every module per generation, replacing one fastft's rule did not choose)."""
    import trl.trainer.grpo_trainer as grpo_module

    model, _ = _fast_lora(tmp_path)
    base = model.get_base_model()
    own = functools.partial(torch.utils.checkpoint.checkpoint, use_reentrant=False)
    base._set_gradient_checkpointing(True, own)
    switches = checkpointed_modules(base)
    seen = []

    def fake_generation(self, *args, **kwargs):
        seen.append((model.training, checkpointed_modules(base), base.config.use_cache))
        return [[1]], None

    monkeypatch.setattr(grpo_module.GRPOTrainer, "_generate_single_turn", fake_generation)
    assert fastft.PatchFastRL("GRPO") == {"GRPO": True}
    cls = grpo_module.GRPOTrainer
    trainer = cls.__new__(cls)
    trainer.use_vllm = False
    trainer.accelerator = type("A", (), {"unwrap_model": staticmethod(lambda m: m)})()
    trainer.model = model.train(training)
    assert cls._generate_single_turn(trainer, [[1]], None, {}, 1) == ([[1]], None)
    assert seen == [(False, [], True)]
    assert model.training is training and not base.config.use_cache
    assert checkpointed_modules(base) == switches
    assert all(m._gradient_checkpointing_func is own for m in switches)


def test_generating_restores_what_it_found(tmp_path):
    model, function = _checkpointed_base(tmp_path, every_n_layers=2)
    switches = checkpointed_modules(model)
    for training in (True, False):
        model.train(training)
        with generating(model):
            assert not model.training and model.config.use_cache and checkpointed_modules(model) == []
        assert model.training is training and not model.config.use_cache
        assert checkpointed_modules(model) == switches
        assert all(m._gradient_checkpointing_func is function for m in switches)
