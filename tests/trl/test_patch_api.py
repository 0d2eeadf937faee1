"""PatchFastRL as a user meets it: names before/after, idempotence, unpatch, bad input, signature drift."""

import importlib
import sys
import warnings

import pytest
from datasets import Dataset

import fastft
from fastft._log import reset_once
from fastft.offline import build_tiny_model, build_tokenizer
from fastft.patches import trl as fast_trl
from tests.trl._common import common_args, lora_config

NAMES = {"SFT": "sft_trainer", "DPO": "dpo_trainer", "GRPO": "grpo_trainer"}


def _all_names(algorithm):
    trl = importlib.import_module("trl")
    module = importlib.import_module(f"trl.trainer.{NAMES[algorithm]}")
    cls = f"{algorithm}Trainer"
    return getattr(trl, cls), getattr(trl.trainer, cls), getattr(module, cls)


@pytest.fixture(autouse=True)
def _clean():
    fastft.unpatch()
    reset_once()
    yield
    fastft.unpatch()


def test_patch_all_names_then_unpatch():
    from trl import GRPOTrainer as grpo_before  # bound before: stays TRL's class

    originals = {alg: _all_names(alg) for alg in NAMES}
    assert fastft.PatchFastRL() == {"SFT": True, "DPO": True, "GRPO": True}
    for alg in NAMES:
        names = _all_names(alg)
        assert all(n is names[0] for n in names)
        assert names[0].__name__ == f"Fast{alg}Trainer" and issubclass(names[0], originals[alg][0])
    from trl import GRPOTrainer as grpo_after

    assert grpo_after is fast_trl.fast_trainer_class("grpo") and grpo_before is originals["GRPO"][0]
    assert fastft.unpatch() == 9
    for alg in NAMES:
        assert _all_names(alg) == originals[alg]


def test_idempotent_and_case_insensitive():
    assert fastft.PatchFastRL("grpo") == {"GRPO": True}
    fast = _all_names("GRPO")[0]
    assert fastft.PatchFastRL("GRPO") == {"GRPO": True}
    assert fastft.PatchFastRL("Grpo", FastModel=None) == {"GRPO": True}
    assert _all_names("GRPO")[0] is fast
    assert fastft.unpatch() == 3  # three names, each patched once
    assert _all_names("GRPO")[0].__name__ == "GRPOTrainer"


def test_unknown_algorithm_lists_supported():
    with pytest.raises(ValueError, match="SFT, DPO, GRPO"):
        fastft.PatchFastRL("PPO")


def test_patch_before_trl_import_in_fresh_interpreter():
    # `import fastft` + PatchFastRL with trl never imported; then the user's `from trl import ...` sees fast classes.
    import subprocess

    code = ("import sys, fastft; assert 'trl' not in sys.modules; fastft.PatchFastRL('SFT'); "
            "from trl import SFTTrainer; from trl.trainer import SFTTrainer as B; "
            "assert SFTTrainer.__name__ == 'FastSFTTrainer' and B is SFTTrainer; fastft.unpatch(); "
            "from trl import SFTTrainer as C; assert C.__name__ == 'SFTTrainer'; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "ok", out.stderr[-2000:]


def test_create_optimizer_goes_through_fastft_optim(tmp_path, monkeypatch):
    import fastft.optim

    calls = []
    real = fastft.optim.create_optimizer
    monkeypatch.setattr(fastft.optim, "create_optimizer", lambda model, args: calls.append(1) or real(model, args))
    fastft.PatchFastRL("SFT")
    from trl import SFTConfig, SFTTrainer

    trainer = SFTTrainer(model=build_tiny_model(), args=SFTConfig(**common_args(tmp_path, max_steps=1)),
                         train_dataset=Dataset.from_list([{"text": "The quick brown fox."}] * 2),
                         processing_class=build_tokenizer(), peft_config=lora_config())
    optimizer = trainer.create_optimizer()
    assert calls == [1] and optimizer is trainer.optimizer
    # NotImplementedError from fastft.optim defers to the parent's optimizer
    monkeypatch.setattr(fastft.optim, "create_optimizer", lambda model, args: (_ for _ in ()).throw(
        NotImplementedError("not this one")))
    trainer.optimizer = None
    assert type(trainer.create_optimizer()).__name__ == "AdamW"


def _drifted_compute_loss(original):
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None, new_upstream_arg=None):
        return original(self, model, inputs, return_outputs, num_items_in_batch)

    return compute_loss


def test_signature_drift_leaves_trainer_unpatched_and_working(tmp_path, monkeypatch):
    import trl.trainer.sft_trainer as sft_module

    original = sft_module.SFTTrainer.compute_loss
    monkeypatch.setattr(sft_module.SFTTrainer, "compute_loss", _drifted_compute_loss(original))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = fastft.PatchFastRL()
    assert result == {"SFT": False, "DPO": True, "GRPO": True}
    messages = [str(w.message) for w in caught if "SFTTrainer.compute_loss" in str(w.message)]
    assert len(messages) == 1 and "new_upstream_arg" in messages[0], [str(w.message) for w in caught]
    assert all(n.__name__ == "SFTTrainer" for n in _all_names("SFT"))  # none of its three names half-patched
    assert _all_names("GRPO")[0].__name__ == "FastGRPOTrainer"

    def make(cls, model, tokenizer):
        from trl import SFTConfig

        args = SFTConfig(**common_args(tmp_path, per_device_train_batch_size=2, max_steps=1))
        return cls(model=model, args=args, processing_class=tokenizer, peft_config=lora_config(),
                   train_dataset=Dataset.from_list([{"text": "The quick brown fox jumps."}] * 2))

    fastft.unpatch()
    cls = importlib.import_module("trl").SFTTrainer
    trainer = make(cls, build_tiny_model(), build_tokenizer())
    trainer.train()
    assert trainer.state.log_history[0]["loss"] > 0


def test_trl_version_outside_range_leaves_everything_unpatched(monkeypatch):
    monkeypatch.setattr(fast_trl, "TRL_RANGE", {"trl": ">=1.17"})
    fast_trl._PATCHES.clear()
    try:
        with pytest.warns(UserWarning, match="outside the tested range"):
            assert fastft.PatchFastRL("DPO") == {"DPO": False}
        assert _all_names("DPO")[0].__name__ == "DPOTrainer"
    finally:
        fast_trl._PATCHES.clear()


def test_fast_model_hooks_wrap_generation(monkeypatch):
    """GRPO generation runs between FastModel.for_inference and FastModel.for_training when they exist."""
    import trl.trainer.grpo_trainer as grpo_module

    events = []

    class FakeFastModel:
        @staticmethod
        def for_inference(model):
            events.append("inference")

        @staticmethod
        def for_training(model):
            events.append("training")

    monkeypatch.setattr(grpo_module.GRPOTrainer, "_generate_single_turn",
                        lambda self, *a, **k: events.append("generate") or ([[1]], None))
    fastft.PatchFastRL("GRPO", FastModel=FakeFastModel)
    try:
        fast = fast_trl.fast_trainer_class("GRPO")
        trainer = fast.__new__(fast)
        trainer.use_vllm = False
        trainer.accelerator = type("A", (), {"unwrap_model": staticmethod(lambda m: m)})()
        trainer.model = object()
        assert fast._generate_single_turn(trainer, [[1]], None, {}, 1) == ([[1]], None)
        assert events == ["inference", "generate", "training"]
    finally:
        monkeypatch.setattr(fast_trl, "_FAST_MODEL", None)

