"""Config validation: every error names its dotted key, misspellings get the nearest valid key, nothing heavy loads."""

from __future__ import annotations

import pytest
import yaml

from fastft.train.config import ConfigError, apply_override, load_config, validate
from fastft.train.rewards import exact_answer, extract_answer, format_reward, resolve_reward
from tests.train.conftest import example


def _base(**changes):
    raw = {
        "model": {"name": "tiny:llama", "max_seq_length": 64, "lora": {"r": 4}},
        "data": {"path": "builtin:arithmetic"},
        "trainer": {"type": "sft", "max_steps": 2},
        "output_dir": "/tmp/unused",
    }
    for dotted, value in changes.items():
        apply_override(raw, f"{dotted}={yaml.safe_dump(value, default_flow_style=True).strip()}")
    return raw


def _errors(raw) -> list[str]:
    with pytest.raises(ConfigError) as info:
        validate(raw)
    return info.value.errors


def test_valid_config_maps_sections():
    cfg = validate(_base(**{"optim.learning_rate": "1e-4", "trainer.per_device_train_batch_size": 2}))
    assert cfg.trainer_type == "sft"
    assert cfg.lora == {"r": 4}
    assert cfg.model == {"name": "tiny:llama", "max_seq_length": 64}
    assert cfg.trainer_args == {"max_steps": 2, "learning_rate": 1e-4, "per_device_train_batch_size": 2}
    assert isinstance(cfg.trainer_args["learning_rate"], float)  # YAML 1.1 would read 1e-4 as a string
    assert validate(_base(**{"model.lora.offload_embeddings": True})).lora == {"r": 4, "offload_embeddings": True}
    assert "model.lora.offload_embeddings" in " ".join(_errors(_base(**{"model.lora.offload_embeddings": "yes"})))


@pytest.mark.parametrize(
    "dotted, value, expect",
    [
        ("trainer.learnig_rate", 1e-4, "trainer.learnig_rate: not a field of SFTConfig; did you mean `learning_rate`?"),
        ("model.lora.lora_alhpa", 8, "model.lora.lora_alhpa: unknown key; did you mean `lora_alpha`?"),
        ("model.max_seq_lenght", 8, "model.max_seq_lenght: unknown key; did you mean `max_seq_length`?"),
        (
            "data.train_on_response_only",
            True,
            "data.train_on_response_only: unknown key; did you mean `train_on_responses_only`?",
        ),
        ("optim.weight_decy", 0.1, "optim.weight_decy: unknown optimizer field; did you mean `weight_decay`?"),
        ("ouput_dir", "x", "ouput_dir: unknown key; did you mean `output_dir`?"),
    ],
)
def test_unknown_key_names_it_and_suggests(dotted, value, expect):
    errors = _errors(_base(**{dotted: value}))
    assert any(e.startswith(expect) for e in errors), errors


@pytest.mark.parametrize(
    "dotted, value, expect",
    [
        ("model.max_seq_length", "long", "model.max_seq_length: expected int or null, got str 'long'"),
        ("model.load_in_4bit", "yes please", "model.load_in_4bit: expected bool"),
        ("trainer.max_steps", 2.5, "trainer.max_steps: expected int, got float 2.5"),
        ("trainer.learning_rate", "fast", "trainer.learning_rate: expected float, got str 'fast'"),
        ("trainer.gradient_accumulation_steps", True, "trainer.gradient_accumulation_steps: expected int, got bool"),
        ("model.lora.r", "16", "model.lora.r: expected int, got str '16'"),
    ],
)
def test_wrong_type_names_the_key(dotted, value, expect):
    errors = _errors(_base(**{dotted: value}))
    assert any(e.startswith(expect) for e in errors), errors


def test_unknown_trainer_type():
    errors = _errors(_base(**{"trainer.type": "reinforce"}))
    assert errors == ["trainer.type: unknown trainer type 'reinforce'; supported: sft, dpo, grpo"]
    assert "did you mean `grpo`?" in _errors(_base(**{"trainer.type": "grp"}))[0]


def test_all_problems_reported_at_once_and_owned_fields_redirect():
    errors = _errors(
        _base(
            **{
                "trainer.packing": True,
                "trainer.output_dir": "/x",
                "model.dtype": 3,
                "trainer.type": "dpo",
                "rewards": ["exact_answer"],
            }
        )
    )
    joined = "\n".join(errors)
    assert "trainer.packing: set it with `data.packing`" in joined
    assert "trainer.output_dir: set it with the top-level `output_dir`" in joined
    assert "model.dtype: expected torch.dtype or str or null, got int 3" in joined
    assert "rewards: only trainer.type grpo uses reward functions (this is dpo)" in joined
    assert len(errors) == 4


def test_grpo_rewards_are_checked_before_training():
    raw = _base(**{"trainer.type": "grpo"})
    assert _errors(raw)[0].startswith("rewards: GRPO needs at least one reward function")
    raw["rewards"] = ["exact_answr", "json:no_such_function", {"function": "format", "wieght": 2}]
    errors = "\n".join(_errors(raw))
    assert "rewards[0].function: unknown reward 'exact_answr'" in errors
    assert "rewards[1].function: reward 'json:no_such_function': module 'json' has no attribute" in errors
    assert "rewards[2].wieght: unknown key; did you mean `weight`?" in errors
    raw["rewards"] = ["exact_answer", {"function": "json:dumps", "weight": 0.5}]
    assert [r["weight"] for r in validate(raw).rewards] == [1.0, 0.5]


@pytest.mark.parametrize(
    "assignment, expect",
    [
        ("trainer.learning_rate", "expected KEY=VALUE"),
        ("=3", "empty key segment"),
        ("trainer..max_steps=3", "empty key segment"),
        ("model.name.sub=1", "`model.name` is str 'tiny:llama', not a section"),
        ("trainer.max_steps=[1", "is not valid YAML"),
    ],
)
def test_bad_set_override(assignment, expect):
    with pytest.raises(ConfigError) as info:
        apply_override(_base(), assignment)
    assert expect in str(info.value)


def test_set_overrides_parse_with_yaml(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(_base()))
    cfg = load_config(
        path,
        [
            "trainer.max_steps=7",
            "trainer.learning_rate=1e-4",
            "model.lora=null",
            "data.packing=true",
            "trainer.report_to=[]",
        ],
    )
    assert cfg.trainer_args["max_steps"] == 7 and cfg.trainer_args["learning_rate"] == 1e-4
    assert cfg.lora is None and cfg.data["packing"] is True and cfg.trainer_args["report_to"] == []


def test_yaml_is_loaded_safely(tmp_path):
    path = tmp_path / "evil.yaml"
    path.write_text("model: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path)


@pytest.mark.parametrize(
    "name", ["sft_tiny.yaml", "dpo_tiny.yaml", "grpo_tiny.yaml", "sft_qlora_t4.yaml", "dpo_t4.yaml", "grpo_t4.yaml"]
)
def test_examples_validate(name):
    cfg = load_config(example(name))
    assert cfg.trainer_type in name


def test_cli_reports_config_error_without_loading_a_model(tmp_path, monkeypatch, capsys):
    import fastft.model
    from fastft.cli import main

    def boom(*a, **k):
        raise AssertionError("the model must not load for an invalid config")

    monkeypatch.setattr(fastft.model.FastModel, "from_pretrained", staticmethod(boom))
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(_base(**{"trainer.learnig_rate": 1e-4})))
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err
    assert "trainer.learnig_rate: not a field of SFTConfig; did you mean `learning_rate`?" in err
    assert main(["train", str(path), "--set", "trainer.learnig_rate"]) == 2
    assert "expected KEY=VALUE" in capsys.readouterr().err


def test_rewards():
    assert extract_answer("so the answer is #### 1,234") == "1,234"
    assert extract_answer("\\boxed{42} and 7") == "42"
    assert extract_answer("<answer> 12 </answer>") == "12"
    assert extract_answer("3 then 19") == "19"
    assert extract_answer("none") is None
    completions = [[{"role": "assistant", "content": "19"}], [{"role": "assistant", "content": "18"}], "20", "#### 19.0"]
    assert exact_answer(completions, answer=["19", "19", "#### 19", "19"]) == [1.0, 0.0, 0.0, 1.0]
    assert format_reward(["19", "the sum is 19", "\\boxed{19}", " -3. "]) == [1.0, 0.0, 1.0, 1.0]
    with pytest.raises(ValueError, match="needs an `answer`"):
        exact_answer(["1"])
    assert resolve_reward("format") is format_reward
    with pytest.raises(ImportError, match="cannot import module"):
        resolve_reward("no_such_pkg_xyz.mod:fn")


def _mentioned_yaml(text: str) -> set[str]:
    import re

    return set(re.findall(r"\b([A-Za-z0-9_]+\.yaml)\b", text)) - {"CONFIG.yaml"}


def test_example_and_readme_references_point_at_existing_files():
    import glob
    import os

    from tests.train.conftest import EXAMPLES

    shipped = {os.path.basename(p) for p in glob.glob(os.path.join(EXAMPLES, "*.yaml"))}
    readme = os.path.join(EXAMPLES, "..", "README.md")
    for path in [*glob.glob(os.path.join(EXAMPLES, "*.yaml")), readme]:
        with open(path, encoding="utf-8") as fh:
            missing = _mentioned_yaml(fh.read()) - shipped
        assert not missing, f"{os.path.basename(path)} refers to {sorted(missing)}, not in examples/"


@pytest.mark.parametrize("name", ["sft_tiny.yaml", "dpo_tiny.yaml", "grpo_tiny.yaml"])
def test_tiny_examples_say_how_to_run_on_cpu_and_the_advice_validates(name):
    with open(example(name), encoding="utf-8") as fh:
        text = fh.read()
    assert "trainer.use_cpu=true" in text and "use_cpu: true" in text
    cfg = load_config(example(name), ["trainer.use_cpu=true", "model.device_map=cpu"])
    assert cfg.trainer_args["use_cpu"] is True and cfg.model["device_map"] == "cpu"


def test_readme_commands_say_a_cpu_run_needs_use_cpu():
    import os

    from tests.train.conftest import EXAMPLES

    with open(os.path.join(EXAMPLES, "..", "README.md"), encoding="utf-8") as fh:
        readme = fh.read()
    commands = readme.split("## Commands", 1)[1].split("\n## ", 1)[0]
    assert "trainer: {use_cpu: true}" in commands and "use_cpu=True" in commands
