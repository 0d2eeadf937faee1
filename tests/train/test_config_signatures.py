"""The YAML schema comes from the signatures it feeds: FastModel.from_pretrained / for_training / get_peft_model
(and the peft.LoraConfig fields get_peft_model passes on), the TRL config dataclasses and fastft's EmbeddingLRMixin.
Nothing here loads a model."""

from __future__ import annotations

import inspect
import textwrap

import pytest

import fastft.train.config as config
from fastft.model import FastModel
from fastft.train.config import ConfigError, load_config, split_model_section, validate


def _base(model=None, lora=None, trainer=None, optim=None):
    return {
        "model": {"name": "tiny:llama", **(model or {}), "lora": {"r": 4, **(lora or {})}},
        "data": {"path": "builtin:arithmetic"},
        "trainer": {"type": "sft", "max_steps": 2, **(trainer or {})},
        **({"optim": optim} if optim else {}),
        "output_dir": "/tmp/unused",
    }


def _errors(raw) -> list[str]:
    with pytest.raises(ConfigError) as info:
        validate(raw)
    return info.value.errors


def test_every_named_parameter_of_the_called_functions_is_a_key():
    load, training = config.model_fields()
    expected = {
        n for n, p in inspect.signature(FastModel.from_pretrained).parameters.items() if p.kind is not p.VAR_KEYWORD
    } - {"model_name"}
    assert set(load) == {"name"} | expected
    assert "token" in load and "tiled_mlp" in load  # token: unknown to the hand-written schema this replaced
    assert set(training) == {"use_gradient_checkpointing"}
    own, passed_on = config.lora_fields()
    assert {"r", "lora_alpha", "target_modules", "offload_embeddings"} <= set(own)
    assert {"use_dora", "init_lora_weights", "layers_to_transform"} <= set(passed_on)
    assert not {"model", "use_gradient_checkpointing", "task_type"} & (set(own) | set(passed_on))


def test_token_reaches_from_pretrained_and_checkpointing_the_training_call(monkeypatch):
    import torch

    from fastft.train import run

    calls = {}

    def fake_from_pretrained(name, **kwargs):
        calls["from_pretrained"] = (name, kwargs)
        return torch.nn.Linear(2, 2), object()

    def fake_get_peft_model(model, **kwargs):
        calls["get_peft_model"] = kwargs
        return model

    cfg = validate(
        _base(model={"token": "hf_abc", "max_seq_length": 64, "tiled_mlp": 512}, lora={"use_dora": True, "lora_dropout": 0})
    )
    load, training = split_model_section({"name": "x", "use_gradient_checkpointing": False, "dtype": "bf16"})
    assert load == {"dtype": "bf16"} and training == {"use_gradient_checkpointing": False}
    split = split_model_section(cfg.model)  # by the real signatures, before the stand-ins below replace them
    monkeypatch.setattr(FastModel, "from_pretrained", staticmethod(fake_from_pretrained))
    monkeypatch.setattr(FastModel, "get_peft_model", staticmethod(fake_get_peft_model))
    monkeypatch.setattr(run, "split_model_section", lambda model: split)
    run.load_model(cfg, "/some/dir")
    assert calls["from_pretrained"] == ("/some/dir", {"token": "hf_abc", "max_seq_length": 64, "tiled_mlp": 512})
    assert calls["get_peft_model"] == {
        "r": 4,
        "use_dora": True,
        "lora_dropout": 0.0,
        "use_gradient_checkpointing": "fastft",
    }  # train's default, stated once


def test_a_parameter_added_to_from_pretrained_is_accepted_with_its_type(monkeypatch):
    original = FastModel.from_pretrained

    def from_pretrained(model_name: str, max_seq_length: int | None = None, new_knob: int = 0, **kwargs):
        return original(model_name, max_seq_length=max_seq_length, **kwargs)

    monkeypatch.setattr(FastModel, "from_pretrained", staticmethod(from_pretrained))
    assert validate(_base(model={"new_knob": 3})).model["new_knob"] == 3
    assert _errors(_base(model={"new_knob": "3"})) == ["model.new_knob: expected int, got str '3'"]
    assert _errors(_base(model={"dtype": "bf16"}))[0].startswith("model.dtype: unknown key")  # gone with it


@pytest.mark.parametrize(
    "section, key, value, expect",
    [
        ("model", "token", 123, "model.token: expected str or null, got int 123"),
        ("model", "tiled_mlp", "big", "model.tiled_mlp: expected bool or int, got str 'big'"),
        ("model", "use_gradient_checkpointing", 1.5, "model.use_gradient_checkpointing: expected bool or str or null"),
        ("lora", "use_dora", "yes", "model.lora.use_dora: expected bool, got str 'yes'"),
        ("lora", "layers_to_transform", "all", "model.lora.layers_to_transform: expected list[int] or int or null"),
        ("lora", "lora_alpha", 8.5, "model.lora.lora_alpha: expected int, got float 8.5"),
        ("trainer", "embedding_learning_rate", "fast", "trainer.embedding_learning_rate: expected float or null"),
        ("trainer", "report_to", 3, "trainer.report_to: expected "),
    ],
)
def test_wrong_type_is_rejected_naming_the_signature_type(section, key, value, expect):
    raw = _base(**{section: {key: value}})
    assert any(e.startswith(expect) for e in _errors(raw)), _errors(raw)


def test_lora_keys_owned_elsewhere_and_misspelt_passed_on_fields():
    errors = _errors(_base(lora={"use_gradient_checkpointing": True, "task_type": "SEQ_CLS", "use_dorra": True}))
    assert errors[0].startswith("model.lora.use_gradient_checkpointing: set by `model.use_gradient_checkpointing`")
    assert errors[1].startswith("model.lora.task_type: set by fastft")
    assert errors[2].startswith("model.lora.use_dorra: unknown key; did you mean `use_dora`?")
    assert "or a peft.LoraConfig field" in errors[2]


def test_yaml_exponent_floats_load_as_floats(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(
        textwrap.dedent("""\
        model: {name: "tiny:llama", lora: {r: 4, lora_dropout: 5e-2}}
        data: {path: "builtin:arithmetic", eval_size: 8}
        trainer: {type: sft, max_steps: 2}
        optim: {learning_rate: 2e-4, embedding_learning_rate: 1E-5}
        output_dir: /tmp/unused
        max_minutes: 1e1
    """)
    )
    cfg = load_config(path, ["optim.weight_decay=1e-2"])
    assert cfg.lora["lora_dropout"] == 0.05 and cfg.max_minutes == 10.0
    assert cfg.trainer_args["learning_rate"] == 2e-4 and cfg.trainer_args["embedding_learning_rate"] == 1e-5
    assert cfg.trainer_args["weight_decay"] == 0.01
    assert cfg.data["eval_size"] == 8 and isinstance(cfg.data["eval_size"], int)  # a count stays a count
    with pytest.raises(ConfigError, match=r"trainer.max_steps: expected int, got float 100000.0"):
        load_config(path, ["trainer.max_steps=1e5"])
    # a version-like or name-like string is still a string
    assert config._yaml("v: 1e") == {"v": "1e"} and config._yaml("v: e5") == {"v": "e5"}
