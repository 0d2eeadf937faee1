"""``fastft train`` rejects a bad model path, data file, format or column before any model loads.

Every test replaces ``FastModel.from_pretrained`` with a function that fails the test if called: the error must come
from the checks that run first, and must say what was wrong, what is accepted, and the nearest valid name.
"""

from __future__ import annotations

import json
import os

import pytest
import yaml

from fastft.cli import main
from fastft.train.config import ConfigError, validate


@pytest.fixture(autouse=True)
def no_model_load(monkeypatch):
    import functools

    import fastft.model

    # Same signature as the real one (inspect.signature follows __wrapped__): the config binds model: against it.
    @functools.wraps(fastft.model.FastModel.from_pretrained)
    def boom(*args, **kwargs):
        raise AssertionError("a model was loaded before the config and data were checked")

    monkeypatch.setattr(fastft.model.FastModel, "from_pretrained", staticmethod(boom))


def _raw(tmp_path, *, model="tiny:llama", trainer="sft", data=None, **top):
    raw = {
        "model": {"name": model, "max_seq_length": 64, "lora": {"r": 4}},
        "data": data or {"path": "builtin:arithmetic"},
        "trainer": {"type": trainer, "max_steps": 1},
        "output_dir": str(tmp_path / "out"),
        **top,
    }
    if trainer == "grpo":
        raw.setdefault("rewards", ["exact_answer"])
        raw["trainer"].update(num_generations=2, per_device_train_batch_size=2, max_completion_length=4)
    return raw


def _errors(raw) -> str:
    with pytest.raises(ConfigError) as info:
        validate(raw)
    return "\n".join(info.value.errors)


def _jsonl(path, rows) -> str:
    with open(path, "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row) + "\n")
    return str(path)


def _train(tmp_path, raw, capsys) -> str:
    """Run ``fastft train`` on ``raw``; it must exit 2 without loading a model; returns stderr."""
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert main(["train", str(path)]) == 2
    assert not os.path.exists(tmp_path / "out" / ".fastft-tiny-model"), "the tiny model was built before the check"
    return capsys.readouterr().err


# -- model.name ------------------------------------------------------------------------------------------------------
def test_missing_relative_model_path_fails_at_once(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    err = _train(tmp_path, _raw(tmp_path, model="models/nope"), capsys)
    assert "model.name: 'models/nope' does not exist" in err
    assert "no user or organization called 'models'" in err  # why it is a path, not a hub name
    assert "a hub name like 'Qwen/Qwen2.5-0.5B'" in err  # the accepted values


@pytest.mark.parametrize("name", ["./checkpoints/run1", "/nonexistent/dir/model", "~/no-such-model-xyz", "a/b/c"])
def test_missing_local_model_paths(tmp_path, name):
    assert f"model.name: {name!r} does not exist" in _errors(_raw(tmp_path, model=name))


def test_model_path_did_you_mean_and_directory_checks(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models" / "tiny-llama").mkdir(parents=True)
    (tmp_path / "models" / "tiny-llama" / "config.json").write_text("{}")
    (tmp_path / "models" / "empty").mkdir()
    # models/ exists here, so models/... is a local path even without the reserved-name rule
    errors = _errors(_raw(tmp_path, model="models/tiny-lama"))
    assert "model.name: 'models/tiny-lama' does not exist" in errors and "did you mean 'models/tiny-llama'?" in errors
    assert "has no config.json" in _errors(_raw(tmp_path, model="models/empty"))
    assert "model.name" not in _errors(_raw(tmp_path, model="models/tiny-llama", trainer="nope"))


def test_hub_names_and_tiny_models_pass_the_check(tmp_path):
    for name in ("Qwen/Qwen2.5-1.5B-Instruct", "gpt2", "tiny:qwen2"):
        validate(_raw(tmp_path, model=name))
    assert "did you mean `tiny:llama`?" in _errors(_raw(tmp_path, model="tiny:lama"))


def test_model_numbers_must_be_positive(tmp_path):
    raw = _raw(tmp_path)
    raw["model"]["max_seq_length"] = 0
    raw["model"]["lora"]["r"] = 0
    errors = _errors(raw)
    assert "model.max_seq_length: must be >= 1, got 0" in errors and "model.lora.r: must be >= 1, got 0" in errors


# -- data.path (no data is read for these) -----------------------------------------------------------------------------
def test_missing_data_file_with_did_you_mean(tmp_path):
    _jsonl(tmp_path / "train.jsonl", [{"text": "hi"}])
    errors = _errors(_raw(tmp_path, data={"path": str(tmp_path / "trian.jsonl")}))
    assert f"data.path: {str(tmp_path / 'trian.jsonl')!r} does not exist" in errors
    assert f"did you mean {str(tmp_path / 'train.jsonl')!r}?" in errors


def test_data_file_without_or_with_unknown_extension(tmp_path):
    (tmp_path / "train").write_text('{"text": "hi"}\n')
    (tmp_path / "train.txt").write_text("hi\n")
    no_ext = _errors(_raw(tmp_path, data={"path": str(tmp_path / "train")}))
    assert "has no file extension" in no_ext and "Accepted: .jsonl, .json, .csv, .parquet" in no_ext
    txt = _errors(_raw(tmp_path, data={"path": str(tmp_path / "train.txt")}))
    assert "unsupported file type '.txt'" in txt and "Accepted: .jsonl, .json, .csv, .parquet" in txt
    typo = _errors(_raw(tmp_path, data={"path": "data/train.jsnol"}))
    assert "'data/train.jsnol' does not exist" in typo and "did you mean '.jsonl'?" in typo
    assert "is a directory" in _errors(_raw(tmp_path, data={"path": str(tmp_path)}))


def test_eval_path_and_builtin_names_are_checked(tmp_path):
    errors = _errors(_raw(tmp_path, data={"path": "builtin:arithmatic", "eval_path": str(tmp_path / "e.csv")}))
    assert "data.path: unknown built-in dataset 'builtin:arithmatic'" in errors
    assert "did you mean `builtin:arithmetic`?" in errors
    assert f"data.eval_path: {str(tmp_path / 'e.csv')!r} does not exist" in errors
    validate(_raw(tmp_path, data={"path": "trl-lib/Capybara"}))  # a datasets hub name passes through


def test_missing_chat_template_file(tmp_path):
    errors = _errors(_raw(tmp_path, data={"path": "builtin:arithmetic", "chat_template": "templates/chatml.jinja"}))
    assert "data.chat_template: 'templates/chatml.jinja' does not exist" in errors


# -- formats and columns (the data is read, the model is not) --------------------------------------------------------
def test_dpo_on_messages_only_data(tmp_path, capsys):
    path = _jsonl(
        tmp_path / "chat.jsonl", [{"messages": [{"role": "user", "content": "1+1="}, {"role": "assistant", "content": "2"}]}]
    )
    err = _train(tmp_path, _raw(tmp_path, trainer="dpo", data={"path": path}), capsys)
    assert "columns ['messages'] are `messages` data (chat turns), which trainer.type sft takes" in err
    assert "trainer.type dpo takes `chosen` + `rejected`" in err


def test_missing_column_did_you_mean_and_rename_hint(tmp_path, capsys):
    path = _jsonl(tmp_path / "pref.jsonl", [{"prompt": "1+1=", "choosen": "2", "rejected": "3"}])
    err = _train(tmp_path, _raw(tmp_path, trainer="dpo", data={"path": path}), capsys)
    assert "did you mean `choosen` for `chosen`? (data.rename: {choosen: chosen})" in err


def test_grpo_needs_prompt_and_the_reward_columns(tmp_path, capsys):
    path = _jsonl(tmp_path / "gsm.jsonl", [{"question": "1+1=", "solution_text": "2"}])
    err = _train(tmp_path, _raw(tmp_path, trainer="grpo", data={"path": path}), capsys)
    assert "trainer.type grpo takes `prompt`" in err and "did you mean `question` for `prompt`?" in err
    path = _jsonl(tmp_path / "prompts.jsonl", [{"prompt": "1+1=", "solution_text": "2"}])
    err = _train(tmp_path, _raw(tmp_path, trainer="grpo", data={"path": path}), capsys)
    assert "rewards[0].function: exact_answer reads the `answer` (or `solution`, `ground_truth`) column" in err


def test_explicit_format_and_rename_are_checked_against_the_columns(tmp_path, capsys):
    path = _jsonl(tmp_path / "pc.jsonl", [{"prompt": "1+1=", "response": "2"}])
    err = _train(tmp_path, _raw(tmp_path, data={"path": path, "format": "prompt_completion"}), capsys)
    assert "data.format prompt_completion needs the column `completion`" in err
    assert "did you mean `response` for `completion`?" in err
    err = _train(tmp_path, _raw(tmp_path, data={"path": path, "rename": {"respnse": "completion"}}), capsys)
    assert "data.rename: no column 'respnse'" in err and "did you mean `response`?" in err


def test_eval_file_must_fit_the_trainer_too(tmp_path, capsys):
    train = _jsonl(tmp_path / "t.jsonl", [{"text": "a b c"}] * 4)
    evaluation = _jsonl(tmp_path / "e.jsonl", [{"txt": "a b c"}] * 2)
    err = _train(tmp_path, _raw(tmp_path, data={"path": train, "eval_path": evaluation}), capsys)
    assert "data.eval_path: cannot tell the format from columns ['txt']" in err and "did you mean `txt`" in err
