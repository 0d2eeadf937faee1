"""PatchFastRL as a user meets it: in place on TRL's classes, idempotence, unpatch, bad input, contract drift."""

import importlib
import sys
import warnings

import pytest
from datasets import Dataset

import fastft
from fastft.offline import build_tiny_model, build_tokenizer
from fastft.patches.trl import patched_algorithm
from tests.trl._common import common_args, lora_config

#: every row -> the module that defines its trainer (trl.experimental's for ORPO, CPO, Online DPO)
ALL_NAMES = {
    "SFT": "trl.trainer.sft_trainer",
    "DPO": "trl.trainer.dpo_trainer",
    "GRPO": "trl.trainer.grpo_trainer",
    "KTO": "trl.trainer.kto_trainer",
    "RLOO": "trl.trainer.rloo_trainer",
    "Reward": "trl.trainer.reward_trainer",
    "ORPO": "trl.experimental.orpo.orpo_trainer",
    "CPO": "trl.experimental.cpo.cpo_trainer",
    "OnlineDPO": "trl.experimental.online_dpo.online_dpo_trainer",
}


def _present(algorithm: str) -> bool:
    # The oldest TRL leg may lack a trainer: PatchFastRL() then reports it False (tested below), never crashes.
    try:
        return hasattr(importlib.import_module(ALL_NAMES[algorithm]), f"{algorithm}Trainer")
    except ImportError:
        return False


NAMES = {alg: module for alg, module in ALL_NAMES.items() if _present(alg)}
#: what PatchFastRL() with no argument returns on this TRL
ALL_PATCHED = {alg: alg in NAMES for alg in ALL_NAMES}
_GENERATING = ("_get_per_token_logps_and_entropies", "_generate_single_turn", "create_optimizer", "__init__")
#: methods each trainer's hooks replace (create_optimizer is inherited from transformers.Trainer)
HOOKED = {
    alg: hooked
    for alg, hooked in {
        "SFT": ("compute_loss", "create_optimizer", "__init__"),
        "DPO": ("compute_loss", "compute_ref_log_probs", "create_optimizer", "__init__"),
        "GRPO": _GENERATING,
        "KTO": ("compute_loss", "compute_ref_log_probs", "create_optimizer", "__init__"),
        "RLOO": _GENERATING,
        "Reward": ("create_optimizer", "__init__"),
        **{alg: ("concatenated_forward", "create_optimizer", "__init__") for alg in ("ORPO", "CPO")},
        "OnlineDPO": ("_forward", "create_optimizer", "__init__"),
    }.items()
    if alg in NAMES
}


def _pauses_checkpointing(algorithm: str) -> bool:
    """Whether the row's TRL module has ``disable_gradient_checkpointing`` (GRPO, RLOO, DPO, KTO): PatchFastRL replaces
    it there with fastft's pause (one more patch per such row)."""
    return callable(getattr(importlib.import_module(NAMES[algorithm]), "disable_gradient_checkpointing", None))


def _patch_count(algorithm: str) -> int:
    """Patches PatchFastRL applies for one row: each hook, the module's checkpointing pause, the class marker."""
    return len(HOOKED[algorithm]) + _pauses_checkpointing(algorithm) + 1


def _all_names(algorithm):
    trl = importlib.import_module("trl")
    module = importlib.import_module(NAMES[algorithm])
    cls = f"{algorithm}Trainer"
    if not module.__name__.startswith("trl.trainer."):  # trl.experimental: one public name, its own module's
        return getattr(module, cls), getattr(importlib.import_module(module.__name__.rsplit(".", 1)[0]), cls)
    return getattr(trl, cls), getattr(trl.trainer, cls), getattr(module, cls)


def _own_methods(cls):
    return {
        name: vars(cls).get(name)
        for name in (
            "compute_loss",
            "compute_ref_log_probs",
            "create_optimizer",
            "_get_per_token_logps_and_entropies",
            "_generate_single_turn",
            "concatenated_forward",
            "_forward",
            "__init__",
        )
    }


pytestmark = pytest.mark.usefixtures("fresh_patches")


def test_patch_in_place_reaches_names_bound_before_then_unpatch():
    from trl import GRPOTrainer as grpo_before  # bound before PatchFastRL: the same class object, so it is fast too

    classes = {alg: _all_names(alg)[0] for alg in NAMES}
    before = {alg: _own_methods(cls) for alg, cls in classes.items()}
    modules = {alg: importlib.import_module(NAMES[alg]) for alg in NAMES if _pauses_checkpointing(alg)}
    pauses = {alg: module.disable_gradient_checkpointing for alg, module in modules.items()}
    assert {"GRPO", "DPO"} <= set(pauses)
    assert fastft.PatchFastRL() == ALL_PATCHED
    for alg, module in modules.items():
        assert module.disable_gradient_checkpointing is not pauses[alg], f"{alg}: TRL's checkpointing pause not hooked"
    for alg, cls in classes.items():
        assert all(name is cls for name in _all_names(alg)), "a name was rebound instead of patched in place"
        assert patched_algorithm(cls) == alg
        for method in HOOKED[alg]:
            assert vars(cls)[method] is not before[alg][method], f"{alg}.{method} not hooked"
    assert patched_algorithm(grpo_before) == "GRPO"
    assert fastft.unpatch() == sum(_patch_count(alg) for alg in HOOKED)
    for alg, cls in classes.items():
        assert _own_methods(cls) == before[alg] and patched_algorithm(cls) is None
    for alg, module in modules.items():
        assert module.disable_gradient_checkpointing is pauses[alg]


def test_idempotent_and_case_insensitive():
    assert fastft.PatchFastRL("grpo") == {"GRPO": True}
    hooked = vars(_all_names("GRPO")[0])["_get_per_token_logps_and_entropies"]
    assert fastft.PatchFastRL("GRPO") == {"GRPO": True}
    assert fastft.PatchFastRL("Grpo", FastModel=None) == {"GRPO": True}
    assert vars(_all_names("GRPO")[0])["_get_per_token_logps_and_entropies"] is hooked  # no wrapper on a wrapper
    assert fastft.unpatch() == _patch_count("GRPO")
    assert patched_algorithm(_all_names("GRPO")[0]) is None


def test_unknown_algorithm_says_did_you_mean_and_lists_supported():
    with pytest.raises(ValueError, match=r"did you mean 'GRPO'\?.*SFT, DPO, GRPO, KTO, RLOO"):
        fastft.PatchFastRL("GPRO")
    with pytest.raises(ValueError, match=r"did you mean 'RLOO'\?"):
        fastft.PatchFastRL("RLO")
    with pytest.raises(ValueError, match="SFT, DPO, GRPO, KTO, RLOO, Reward, ORPO, CPO, OnlineDPO"):
        fastft.PatchFastRL("PPO")
    with pytest.raises(ValueError, match=r"did you mean 'Reward'\?"):
        fastft.PatchFastRL("Rewrd")
    with pytest.raises(ValueError, match=r"did you mean 'OnlineDPO'\?"):
        fastft.PatchFastRL("online_dp")
    # spelling-free: any case, "_" / "-" ignored, a trailing "Trainer" allowed
    for spelling, row in (("reward", "Reward"), ("online_dpo", "OnlineDPO"), ("ORPOTrainer", "ORPO")):
        assert fastft.PatchFastRL(spelling) == {row: True}


def test_a_trainer_absent_from_this_trl_is_reported_not_raised(monkeypatch):
    import dataclasses

    from fastft.patches import trl as fast_trl

    spec = fast_trl._TRAINERS["KTO"]
    monkeypatch.setitem(fast_trl._TRAINERS, "KTO", dataclasses.replace(spec, module="trl.trainer.no_such_trainer"))
    monkeypatch.delitem(fast_trl._PATCHES, "KTO", raising=False)
    monkeypatch.setattr(fast_trl, "_ABSENT", {})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = fastft.PatchFastRL()
    assert result == {**ALL_PATCHED, "KTO": False}
    messages = [str(w.message) for w in caught if "PatchFastRL('KTO') skipped" in str(w.message)]
    assert len(messages) == 1 and "no trl.trainer.no_such_trainer.KTOTrainer" in messages[0]


def test_patch_before_trl_import_in_fresh_interpreter():
    # `import fastft` + PatchFastRL with trl never imported; then the user's `from trl import ...` sees the hooks.
    import subprocess

    code = (
        "import sys, fastft; assert 'trl' not in sys.modules; fastft.PatchFastRL('SFT'); "
        "from trl import SFTTrainer; from trl.trainer import SFTTrainer as B; "
        "from fastft.patches.trl import patched_algorithm as p; "
        "assert p(SFTTrainer) == 'SFT' and B is SFTTrainer; fastft.unpatch(); "
        "from trl import SFTTrainer as C; assert p(C) is None and C is SFTTrainer; print('ok')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "ok", out.stderr[-2000:]


def test_create_optimizer_goes_through_fastft_optim(tmp_path, monkeypatch):
    import fastft.optim

    calls = []
    real = fastft.optim.create_optimizer
    monkeypatch.setattr(fastft.optim, "create_optimizer", lambda model, args: calls.append(1) or real(model, args))
    fastft.PatchFastRL("SFT")
    from trl import SFTConfig, SFTTrainer

    trainer = SFTTrainer(
        model=build_tiny_model(),
        args=SFTConfig(**common_args(tmp_path, max_steps=1)),
        train_dataset=Dataset.from_list([{"text": "The quick brown fox."}] * 2),
        processing_class=build_tokenizer(),
        peft_config=lora_config(),
    )
    optimizer = trainer.create_optimizer()
    assert calls == [1] and optimizer is trainer.optimizer
    # NotImplementedError from fastft.optim defers to the parent's optimizer
    monkeypatch.setattr(
        fastft.optim, "create_optimizer", lambda model, args: (_ for _ in ()).throw(NotImplementedError("not this one"))
    )
    trainer.optimizer = None
    assert type(trainer.create_optimizer()).__name__ == "AdamW"


def _renamed_parameter(original):
    def compute_loss(self, model, batch, return_outputs=False, num_items_in_batch=None):
        return original(self, model, batch, return_outputs, num_items_in_batch)

    return compute_loss


class _FakeTrainer:
    """Just what the SFT hook reads before it hands an unknown argument to TRL."""

    model = ref_model = None
    args = type("Args", (), {"cast_lm_head_to_fp32": False})()


def test_a_new_upstream_parameter_is_passed_through_and_patched(monkeypatch):
    import trl.trainer.sft_trainer as sft_module

    seen = []

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None, new_upstream_arg=None):
        seen.append(new_upstream_arg)
        return "TRL's loss"

    monkeypatch.setattr(sft_module.SFTTrainer, "compute_loss", compute_loss)
    assert fastft.PatchFastRL("SFT") == {"SFT": True}
    assert vars(sft_module.SFTTrainer)["compute_loss"] is not compute_loss
    assert sft_module.SFTTrainer.compute_loss(_FakeTrainer(), None, {}, new_upstream_arg=5) == "TRL's loss"
    assert seen == [5]


def test_a_renamed_parameter_leaves_trainer_unpatched_and_working(tmp_path, monkeypatch):
    import trl.trainer.sft_trainer as sft_module

    original = sft_module.SFTTrainer.compute_loss
    before_init = vars(sft_module.SFTTrainer)["__init__"]
    monkeypatch.setattr(sft_module.SFTTrainer, "compute_loss", _renamed_parameter(original))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = fastft.PatchFastRL()
    assert result == {**ALL_PATCHED, "SFT": False}
    messages = [str(w.message) for w in caught if "SFTTrainer.compute_loss" in str(w.message)]
    assert len(messages) == 1 and "no longer takes inputs" in messages[0], [str(w.message) for w in caught]
    cls = _all_names("SFT")[0]
    assert patched_algorithm(cls) is None and "create_optimizer" not in vars(cls)  # not half-patched
    assert vars(cls)["__init__"] is before_init
    assert patched_algorithm(_all_names("GRPO")[0]) == "GRPO"

    fastft.unpatch()
    monkeypatch.undo()
    from trl import SFTConfig

    args = SFTConfig(**common_args(tmp_path, per_device_train_batch_size=2, max_steps=1))
    trainer = cls(
        model=build_tiny_model(),
        args=args,
        processing_class=build_tokenizer(),
        peft_config=lora_config(),
        train_dataset=Dataset.from_list([{"text": "The quick brown fox jumps."}] * 2),
    )
    trainer.train()
    assert trainer.state.log_history[0]["loss"] > 0


def test_trl_outside_the_tested_range_is_patched_when_the_contract_holds(monkeypatch, caplog):
    import logging

    from packaging.specifiers import SpecifierSet

    import fastft.versions

    ranges = dict(fastft.versions.declared_ranges())
    ranges["trl"] = SpecifierSet(">=9.0")
    monkeypatch.setattr(fastft.versions, "declared_ranges", lambda: ranges)
    with caplog.at_level(logging.INFO, logger="fastft"):
        assert fastft.PatchFastRL("DPO") == {"DPO": True}
    notes = [r.getMessage() for r in caplog.records if "outside the tested range" in r.getMessage()]
    assert len(notes) == 1 and "untested release" in notes[0] and "trl" in notes[0], notes
    assert patched_algorithm(_all_names("DPO")[0]) == "DPO"


class _FakeModel:
    def __init__(self, training):
        self.training = training

    def eval(self):
        self.training = False


def test_generation_hooks_restore_the_mode_they_found(monkeypatch):
    """GRPO generation runs between FastModel.for_inference and for_training, and a generation made during
    evaluation leaves the model in eval mode (TRL would otherwise compute the eval loss as a training loss)."""
    import trl.trainer.grpo_trainer as grpo_module

    events = []

    class FakeFastModel:
        @staticmethod
        def for_inference(model):
            events.append("inference")
            model.training = False

        @staticmethod
        def for_training(model):
            events.append("training")
            model.training = True

    monkeypatch.setattr(
        grpo_module.GRPOTrainer,
        "_generate_single_turn",
        lambda self, *a, **k: events.append(("generate", a, k)) or ([[1]], None),
    )
    from fastft.patches import trl_hooks

    # PatchFastRL sets the module global: undone at teardown (a monkeypatch.setattr made *after* it would restore the
    # fake there, leaking it into every later test of this worker)
    monkeypatch.setattr(trl_hooks, "_FAST_MODEL", None)
    fastft.PatchFastRL("GRPO", FastModel=FakeFastModel)
    try:
        cls = grpo_module.GRPOTrainer
        trainer = cls.__new__(cls)
        trainer.use_vllm = False
        trainer.accelerator = type("A", (), {"unwrap_model": staticmethod(lambda m: m)})()
        for training in (True, False):
            events.clear()
            trainer.model = _FakeModel(training)
            assert cls._generate_single_turn(trainer, [[1]], None, {}, 1, has_tool_images=False) == ([[1]], None)
            assert events == ["inference", ("generate", ([[1]], None, {}, 1), {"has_tool_images": False}), "training"]
            assert trainer.model.training is training
    finally:
        trl_hooks._FAST_MODEL = None


def test_max_seq_length_reaches_trl_unless_set_explicitly(tmp_path):
    """FastModel's max_seq_length becomes SFTConfig.max_length when that was left at TRL's default (examples of
    5,305 tokens used to train on TRL's 1,024, silently); an explicit max_length wins."""
    from trl import SFTConfig, SFTTrainer

    from fastft.model import FastModel
    from fastft.offline import save_tiny_model

    model_dir = save_tiny_model(str(tmp_path / "m"), "llama")
    assert fastft.PatchFastRL("SFT") == {"SFT": True}
    long_text = Dataset.from_list([{"text": " ".join(["fox"] * 1500)}] * 2)
    for asked, explicit, expected in ((2048, None, 2048), (2048, 64, 64), (None, None, 1024)):
        # FastModel's default (None: the model's 4,096 positions) hands nothing over: TRL's 1,024 stays
        model, tokenizer = FastModel.from_pretrained(model_dir, max_seq_length=asked)
        extra = {} if explicit is None else {"max_length": explicit}
        args = SFTConfig(**common_args(tmp_path / f"{asked}-{explicit}", max_steps=1, **extra))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer = SFTTrainer(
                model=model, args=args, train_dataset=long_text, processing_class=tokenizer, peft_config=lora_config()
            )
        assert trainer.args.max_length == expected
        assert max(len(row["input_ids"]) for row in trainer.train_dataset) == expected  # the text is longer
        said = [str(w.message) for w in caught if "max_seq_length" in str(w.message)]
        assert (len(said) == 1) == (explicit is None and asked is not None), said


@pytest.mark.parametrize(
    "fastmodel_choice,trl_flag,expected_on",
    [
        (None, False, False),  # the default follows TRL: an explicit gradient_checkpointing=False is honored
        (None, True, True),  # ... and True turns on fastft's checkpointing (standard on CPU)
        (False, True, False),  # an explicit FastModel choice wins over TRL's flag
        ("fastft", False, True),
    ],
)
def test_one_checkpointing_rule(fastmodel_choice, trl_flag, expected_on, tmp_path):
    from trl import SFTConfig, SFTTrainer

    from fastft.model import FastModel
    from fastft.offline import save_tiny_model

    model_dir = save_tiny_model(str(tmp_path / "m"), "llama")
    assert fastft.PatchFastRL("SFT") == {"SFT": True}
    model, tokenizer = FastModel.from_pretrained(model_dir)
    model = FastModel.get_peft_model(model, r=4, use_gradient_checkpointing=fastmodel_choice)
    args = SFTConfig(**common_args(tmp_path, max_steps=1, gradient_checkpointing=trl_flag, max_length=32))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = SFTTrainer(
            model=model,
            args=args,
            processing_class=tokenizer,
            train_dataset=Dataset.from_list([{"text": "The quick brown fox jumps."}] * 2),
        )
    said = [str(w.message) for w in caught if "gradient checkpointing:" in str(w.message)]
    assert len(said) == 1, said  # visible, once, without any log switch
    trainer.train()
    base = trainer.model.get_base_model()
    assert bool(base.is_gradient_checkpointing) is expected_on, said
    assert trainer.args.gradient_checkpointing is False  # fastft owns the mechanism; the Trainer did not replace it


def _counting(real, name, calls):
    def apply(*args):
        calls[name] += 1
        return real(*args)

    return apply


def test_trl_default_bf16_on_cpu_runs_the_fused_lora(tmp_path, monkeypatch):
    """TRL turns bf16 on by default wherever it is supported, CPU included: the fp32 model then runs under bf16
    autocast, and the fused LoRA MLP and projections must run there (they used to fall back to PEFT, at INFO)."""
    from trl import SFTConfig, SFTTrainer

    from fastft.kernels import lora
    from fastft.model import FastModel
    from fastft.offline import save_tiny_model

    calls = {"mlp": 0, "projections": 0}
    for name, cls in (("mlp", lora.LoRAMLP), ("projections", lora.LoRAProjections)):
        monkeypatch.setattr(cls, "apply", _counting(cls.apply, name, calls))
    model_dir = save_tiny_model(str(tmp_path / "m"), "llama")
    assert fastft.PatchFastRL("SFT") == {"SFT": True}
    model, tokenizer = FastModel.from_pretrained(model_dir)
    model = FastModel.get_peft_model(model, r=4)
    args = SFTConfig(**common_args(tmp_path, max_steps=1, max_length=32, bf16=True))
    trainer = SFTTrainer(
        model=model,
        args=args,
        processing_class=tokenizer,
        train_dataset=Dataset.from_list([{"text": "The quick brown fox jumps."}] * 2),
    )
    trainer.train()
    assert calls["mlp"] > 0 and calls["projections"] > 0, calls
    assert trainer.state.log_history[0]["loss"] > 0


def test_max_seq_length_sizes_grpo_generation_unless_set_explicitly(tmp_path):
    """GRPO: a max_seq_length shorter than TRL's default max_completion_length (512) caps it; an explicit value
    wins; FastModel's default hands nothing over."""
    from trl import GRPOConfig, GRPOTrainer

    from fastft.model import FastModel
    from fastft.offline import save_tiny_model

    model_dir = save_tiny_model(str(tmp_path / "m"), "llama")
    assert fastft.PatchFastRL("GRPO") == {"GRPO": True}
    prompts = Dataset.from_list([{"prompt": "What is 1+2?"}] * 4)
    for asked, explicit, expected in ((256, None, 256), (256, 64, 64), (None, None, 512)):
        model, tokenizer = FastModel.from_pretrained(model_dir, max_seq_length=asked)
        extra = {} if explicit is None else {"max_completion_length": explicit}
        args = GRPOConfig(
            **common_args(
                tmp_path / f"{asked}-{explicit}", max_steps=1, num_generations=2, per_device_train_batch_size=2, **extra
            )
        )
        trainer = GRPOTrainer(
            model=model,
            args=args,
            train_dataset=prompts,
            processing_class=tokenizer,
            reward_funcs=lambda completions, **_: [0.0] * len(completions),
        )
        assert trainer.args.max_completion_length == expected


def test_max_seq_length_gives_the_prompt_the_rest_where_trl_has_max_prompt_length():
    """Releases whose GRPOConfig has max_prompt_length (left at its default): prompt = max_seq_length - completion;
    an explicit prompt length is kept, and a sum over max_seq_length is logged."""
    import dataclasses

    from fastft.patches.trl import _apply_max_seq_length

    @dataclasses.dataclass
    class Config:
        max_prompt_length: int | None = 512
        max_completion_length: int = 256

    model = type("M", (), {"_fastft_asked_max_seq_length": 4096})()
    args = Config()
    _apply_max_seq_length(model, args)
    assert (args.max_prompt_length, args.max_completion_length) == (3840, 256)
    args = Config(max_prompt_length=4000)
    _apply_max_seq_length(model, args)
    assert (args.max_prompt_length, args.max_completion_length) == (4000, 256)
