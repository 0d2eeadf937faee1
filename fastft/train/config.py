"""The ``fastft train`` YAML schema: load, apply ``--set`` overrides, validate -- all before anything heavy loads.

One file maps 1:1 to what it builds::

    model:    FastModel.from_pretrained(...) arguments, plus `lora:` (get_peft_model arguments, or null for none)
    data:     where the examples come from and how they are formatted
    trainer:  `type: sft|dpo|grpo` plus fields of trl.SFTConfig / DPOConfig / GRPOConfig, checked against the dataclass
    optim:    optimizer fields (optim, learning_rate, ...), forwarded to the same TRL config
    rewards:  GRPO reward functions: built-in names or "pkg.module:function"
    output_dir, resume (false | true | auto | a checkpoint dir), max_minutes

Every problem is reported at once, each naming its dotted key and, for a misspelt key, the nearest valid one.
Model and data paths are checked here too (fastft.train.sources: file system only, no hub call); formats and
columns need the data itself and are checked by fastft.train.data, still before any model loads.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import os
import types
import typing
from typing import Any

import yaml

from fastft.sources import (
    ACCEPTED_DATA_FILES,
    MODEL_NAME_FORMS,
    check_chat_template,
    check_data_source,
    check_model_name,
)

TRAINER_TYPES = ("sft", "dpo", "grpo")
DATA_FORMATS = ("auto", "text", "messages", "prompt_completion", "preference", "prompt")

# Which data formats each trainer consumes (see fastft.train.data.detect_format).
FORMATS_FOR_TRAINER = {
    "sft": ("text", "messages", "prompt_completion"),
    "dpo": ("preference",),
    "grpo": ("prompt",),
}

_OPT_STR = (str, type(None))
_LIST_OR_STR = (list, str, type(None))

#: model: key -> accepted Python types (after YAML parsing). "lora" is checked against LORA_SCHEMA.
MODEL_SCHEMA: dict[str, tuple[type, ...]] = {
    "name": (str,),
    "max_seq_length": (int,),
    "dtype": _OPT_STR,
    "load_in_4bit": (bool,),
    "load_in_8bit": (bool,),
    "full_finetuning": (bool,),
    "device_map": (str, dict, type(None)),
    "attn_implementation": _OPT_STR,
    "trust_remote_code": (bool,),
    "revision": _OPT_STR,
    "tiled_mlp": (bool, int),
    "use_gradient_checkpointing": (bool, str),
    "lora": (dict, bool, type(None)),
}
LORA_SCHEMA: dict[str, tuple[type, ...]] = {
    "r": (int,),
    "lora_alpha": (int, float),
    "lora_dropout": (float, int),
    "target_modules": _LIST_OR_STR,
    "bias": (str,),
    "use_rslora": (bool,),
    "modules_to_save": (list, type(None)),
    "random_state": (int,),
    "offload_embeddings": (bool,),
}
DATA_SCHEMA: dict[str, tuple[type, ...]] = {
    "path": (str,),                # local .jsonl/.json/.csv/.parquet, a datasets name, or builtin:arithmetic
    "name": _OPT_STR,              # datasets config name
    "split": (str,),
    "eval_path": _OPT_STR,         # a local eval file
    "eval_split": _OPT_STR,        # a split of the same dataset
    "eval_size": (float, int, type(None)),  # hold out this fraction (<1) or count (>=1) of the train split
    "format": (str,),
    "rename": (dict, type(None)),  # {old column: new column}, e.g. {question: prompt} for GSM8K
    "text_field": (str,),
    "chat_template": _OPT_STR,     # a Jinja template string or a path to a .jinja file
    "train_on_responses_only": (bool,),
    "packing": (bool,),
    "max_samples": (int, type(None)),
    "seed": (int,),
}
TOP_SCHEMA: dict[str, tuple[type, ...]] = {
    "model": (dict,),
    "data": (dict,),
    "trainer": (dict,),
    "optim": (dict, type(None)),
    "rewards": (list, type(None)),
    "output_dir": (str,),
    "resume": (bool, str),
    "max_minutes": (float, int, type(None)),
}
#: optim: fields of TrainingArguments that choose and tune the optimizer and schedule.
OPTIM_FIELDS = (
    "optim", "optim_args", "optim_target_modules", "learning_rate", "weight_decay", "adam_beta1", "adam_beta2",
    "adam_epsilon", "max_grad_norm", "lr_scheduler_type", "lr_scheduler_kwargs", "warmup_steps",
    "embedding_learning_rate",
)
#: TRL config fields this schema sets from elsewhere; naming them under trainer: is an error pointing there.
_OWNED_ELSEWHERE = {
    "output_dir": "the top-level `output_dir`",
    "resume_from_checkpoint": "the top-level `resume` (or --resume)",
    "packing": "`data.packing`",
    "completion_only_loss": "`data.train_on_responses_only`",
    "assistant_only_loss": "`data.train_on_responses_only`",
    "dataset_text_field": "`data.text_field`",
}
DEFAULT_DATA = {"split": "train", "format": "auto", "text_field": "text", "train_on_responses_only": False,
                "packing": False, "seed": 0}


class ConfigError(ValueError):
    """A config problem (or several); ``errors`` lists one message per problem, each starting with the dotted key."""

    def __init__(self, errors: list[str]):
        self.errors = list(errors)
        super().__init__("invalid fastft config:\n" + "\n".join(f"  - {e}" for e in self.errors))


def _suggest(key: str, valid: typing.Iterable[str]) -> str:
    close = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.6)
    return f"; did you mean `{close[0]}`?" if close else ""


def _type_names(types_: tuple[type, ...]) -> str:
    return " or ".join("null" if t is type(None) else t.__name__ for t in types_)


def _describe(value: Any) -> str:
    return f"{type(value).__name__} {value!r}" if value is not None else "null"


def _check_simple(value: Any, accepted: tuple[type, ...]) -> bool:
    if isinstance(value, bool):  # YAML `yes` is a bool; a bool is never an int/float here
        return bool in accepted
    if isinstance(value, int) and float in accepted:
        return True
    return isinstance(value, accepted)


def _check_at_least_one(section: dict, key: str, prefix: str, errors: list[str]) -> None:
    value = section.get(key)
    if isinstance(value, int) and not isinstance(value, bool) and value < 1:
        errors.append(f"{prefix}{key}: must be >= 1, got {value}")


def _check_section(section: dict, schema: dict[str, tuple[type, ...]], prefix: str, errors: list[str]) -> None:
    for key, value in section.items():
        if key not in schema:
            errors.append(f"{prefix}{key}: unknown key{_suggest(str(key), schema)} (valid: {', '.join(schema)})")
        elif not _check_simple(value, schema[key]):
            errors.append(f"{prefix}{key}: expected {_type_names(schema[key])}, got {_describe(value)}")


# ---------------------------------------------------------------------------------------------------------------------
# Dataclass field types (TRL configs annotate with real types: int, float | None, list[str], Enum | str, ...)
# ---------------------------------------------------------------------------------------------------------------------
def _coerce(value: Any, annotation: Any) -> tuple[bool, Any]:
    """(ok, value) for ``value`` against ``annotation``; YAML reads ``1e-4`` as a string, so numeric strings convert."""
    if annotation is Any or annotation is dataclasses.MISSING:
        return True, value
    if annotation is type(None) or annotation is None:
        return value is None, value
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        arms = typing.get_args(annotation)
        for arm in arms:  # exact matches first, so "steps" stays a str for `SaveStrategy | str`
            ok, out = _coerce(value, arm)
            if ok and not (isinstance(value, str) and arm in (int, float)):
                return True, out
        for arm in arms:
            ok, out = _coerce(value, arm)
            if ok:
                return True, out
        return False, value
    if origin is typing.Literal:
        return value in typing.get_args(annotation), value
    if annotation is bool:
        return isinstance(value, bool), value
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return True, float(value)
        if isinstance(value, str):
            try:
                return True, float(value)
            except ValueError:
                return False, value
        return False, value
    if annotation is str:
        return isinstance(value, str), value
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        values = {m.value for m in annotation}
        return (value in values) or isinstance(value, annotation), value
    if origin in (list, tuple) or annotation in (list, tuple):
        if not isinstance(value, (list, tuple)):
            return False, value
        args = typing.get_args(annotation)
        if args and args[0] in (int, float, str, bool):
            converted = []
            for item in value:
                ok, out = _coerce(item, args[0])
                if not ok:
                    return False, value
                converted.append(out)
            return True, converted
        return True, list(value)
    if origin is dict or annotation is dict:
        return isinstance(value, dict), value
    return True, value  # anything exotic: the dataclass's own __post_init__ has the last word


def _annotation_name(annotation: Any) -> str:
    return getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")


def trainer_config_class(trainer_type: str) -> type:
    """trl.SFTConfig / DPOConfig / GRPOConfig (imports trl's config module, not a model)."""
    import trl

    return {"sft": trl.SFTConfig, "dpo": trl.DPOConfig, "grpo": trl.GRPOConfig}[trainer_type]


def _check_trainer_fields(section: dict, cls: type, prefix: str, errors: list[str], out: dict) -> None:
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for key, value in section.items():
        if key == "type":
            continue
        if key in _OWNED_ELSEWHERE:
            errors.append(f"{prefix}{key}: set it with {_OWNED_ELSEWHERE[key]}, not under {prefix.rstrip('.')}")
            continue
        if key == "embedding_learning_rate":  # fastft.optim reads it as an attribute (not a TRL field)
            ok, out_value = _coerce(value, float)
            if not ok:
                errors.append(f"{prefix}{key}: expected float, got {_describe(value)}")
            out[key] = out_value
            continue
        if key not in fields:
            errors.append(f"{prefix}{key}: not a field of {cls.__name__}{_suggest(str(key), fields)}")
            continue
        ok, out_value = _coerce(value, fields[key].type)
        if not ok:
            errors.append(f"{prefix}{key}: expected {_annotation_name(fields[key].type)}, got {_describe(value)}")
        out[key] = out_value


# ---------------------------------------------------------------------------------------------------------------------
# Loading and overrides
# ---------------------------------------------------------------------------------------------------------------------
def apply_override(raw: dict, assignment: str) -> None:
    """Apply one ``--set dotted.key=value`` (value parsed with ``yaml.safe_load``) to ``raw`` in place."""
    if "=" not in assignment:
        raise ConfigError([f"--set {assignment!r}: expected KEY=VALUE, e.g. --set trainer.learning_rate=1e-4"])
    key, _, text = assignment.partition("=")
    parts = key.strip().split(".")
    if not key.strip() or any(not p for p in parts):
        raise ConfigError([f"--set {assignment!r}: empty key segment in {key!r}"])
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError([f"--set {key}: value {text!r} is not valid YAML ({exc.__class__.__name__})"]) from None
    node = raw
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        elif not isinstance(child, dict):
            raise ConfigError([f"--set {key}: `{'.'.join(parts[: i + 1])}` is {_describe(child)}, not a section"])
        node = child
    node[parts[-1]] = value


def load_raw(path: str | os.PathLike, overrides: typing.Sequence[str] = ()) -> dict:
    """Read a YAML config (safe_load only) and apply ``--set`` overrides."""
    try:
        with open(path, encoding="utf-8") as fh:
            raw = yaml.safe_load(fh)
    except FileNotFoundError:
        raise ConfigError([f"config file {str(path)!r} does not exist"]) from None
    except yaml.YAMLError as exc:
        raise ConfigError([f"{path}: not valid YAML: {exc}"]) from None
    raw = {} if raw is None else raw
    if not isinstance(raw, dict):
        raise ConfigError([f"{path}: the top level must be a mapping, got {_describe(raw)}"])
    for assignment in overrides:
        apply_override(raw, assignment)
    return raw


@dataclasses.dataclass
class TrainConfig:
    """A validated config. ``trainer_args`` are the TRL config fields (trainer + optim sections, type-coerced)."""

    trainer_type: str
    model: dict[str, Any]
    lora: dict[str, Any] | None
    data: dict[str, Any]
    trainer_args: dict[str, Any]
    rewards: list[dict[str, Any]]
    output_dir: str
    resume: bool | str
    max_minutes: float | None
    raw: dict[str, Any]


def validate(raw: dict) -> TrainConfig:
    """Check every section; raise :class:`ConfigError` listing all problems. Imports trl's config classes only."""
    errors: list[str] = []
    _check_section(raw, TOP_SCHEMA, "", errors)
    for required in ("model", "data", "trainer", "output_dir"):
        if required not in raw:
            errors.append(f"{required}: required section is missing")
    model = dict(raw.get("model") or {}) if isinstance(raw.get("model"), dict) else {}
    data = dict(raw.get("data") or {}) if isinstance(raw.get("data"), dict) else {}
    trainer = dict(raw.get("trainer") or {}) if isinstance(raw.get("trainer"), dict) else {}
    optim = dict(raw.get("optim") or {}) if isinstance(raw.get("optim"), dict) else {}

    _check_section(model, MODEL_SCHEMA, "model.", errors)
    if "name" not in model and isinstance(raw.get("model"), dict):
        errors.append(f"model.name: required ({MODEL_NAME_FORMS})")
    elif isinstance(model.get("name"), str):
        from fastft.offline import TINY_ARCHITECTURES

        problem = check_model_name(model["name"], tuple(TINY_ARCHITECTURES))
        if problem:
            errors.append(f"model.name: {problem}")
    _check_at_least_one(model, "max_seq_length", "model.", errors)
    lora_raw = model.pop("lora", {})
    lora: dict | None
    if lora_raw is None or lora_raw is False:
        lora = None
    elif lora_raw is True:
        lora = {}
    else:
        lora = dict(lora_raw) if isinstance(lora_raw, dict) else {}
        _check_section(lora, LORA_SCHEMA, "model.lora.", errors)
        _check_at_least_one(lora, "r", "model.lora.", errors)
    if model.get("full_finetuning") and lora is not None and isinstance(raw.get("model"), dict) \
            and "lora" in raw["model"]:
        errors.append("model.lora: full_finetuning trains every weight; set model.lora: null (or drop full_finetuning)")
    if model.get("full_finetuning"):
        lora = None

    _check_section(data, DATA_SCHEMA, "data.", errors)
    if "path" not in data and isinstance(raw.get("data"), dict):
        errors.append(f"data.path: required (a local {ACCEPTED_DATA_FILES} file, a datasets name, "
                      "or builtin:arithmetic)")
    for key in ("path", "eval_path"):
        problem = check_data_source(data[key]) if isinstance(data.get(key), str) else None
        if problem:
            errors.append(f"data.{key}: {problem}")
    if isinstance(data.get("chat_template"), str):
        problem = check_chat_template(data["chat_template"])
        if problem:
            errors.append(f"data.chat_template: {problem}")
    data = {**DEFAULT_DATA, **data}
    if isinstance(data.get("format"), str) and data["format"] not in DATA_FORMATS:
        errors.append(f"data.format: {data['format']!r} is not one of {', '.join(DATA_FORMATS)}"
                      f"{_suggest(data['format'], DATA_FORMATS)}")

    trainer_type = trainer.get("type")
    trainer_args: dict[str, Any] = {}
    if "trainer" in raw and trainer_type is None:
        errors.append(f"trainer.type: required; one of {', '.join(TRAINER_TYPES)}")
    elif trainer_type is not None and trainer_type not in TRAINER_TYPES:
        errors.append(f"trainer.type: unknown trainer type {trainer_type!r}; supported: {', '.join(TRAINER_TYPES)}"
                      f"{_suggest(str(trainer_type), TRAINER_TYPES)}")
        trainer_type = None
    if trainer_type is not None:
        cls = trainer_config_class(trainer_type)
        _check_trainer_fields(trainer, cls, "trainer.", errors, trainer_args)
        for key in optim:
            if key not in OPTIM_FIELDS:
                errors.append(f"optim.{key}: unknown optimizer field{_suggest(str(key), OPTIM_FIELDS)} "
                              f"(valid: {', '.join(OPTIM_FIELDS)})")
            elif key in trainer:
                errors.append(f"optim.{key}: also set as trainer.{key}; set it in one place")
        optim_args: dict[str, Any] = {}
        _check_trainer_fields({k: v for k, v in optim.items() if k in OPTIM_FIELDS}, cls, "optim.", errors,
                              optim_args)
        trainer_args.update(optim_args)
        if data.get("packing") and trainer_type != "sft":
            errors.append("data.packing: packing applies to trainer.type sft only")
        if data.get("train_on_responses_only") and trainer_type != "sft":
            errors.append("data.train_on_responses_only: DPO and GRPO already score responses only; "
                          "use it with trainer.type sft")
        fmt = data.get("format")
        if fmt not in (None, "auto") and fmt in DATA_FORMATS and fmt not in FORMATS_FOR_TRAINER[trainer_type]:
            errors.append(f"data.format: {fmt!r} does not fit trainer.type {trainer_type}; it takes "
                          f"{', '.join(FORMATS_FOR_TRAINER[trainer_type])}")

    rewards = _check_rewards(raw.get("rewards"), trainer_type, errors)

    resume = raw.get("resume", False)
    if isinstance(resume, str) and resume != "auto" and not os.path.isdir(resume):
        errors.append(f"resume: expected true, false, auto or an existing checkpoint directory, got {resume!r}")
    if errors:
        raise ConfigError(errors)
    max_minutes = raw.get("max_minutes")
    return TrainConfig(
        trainer_type=trainer_type, model=model, lora=lora, data=data, trainer_args=trainer_args, rewards=rewards,
        output_dir=str(raw["output_dir"]), resume=resume,
        max_minutes=float(max_minutes) if max_minutes is not None else None, raw=raw,
    )


def _check_rewards(rewards: Any, trainer_type: str | None, errors: list[str]) -> list[dict[str, Any]]:
    from fastft.train.rewards import BUILTIN_REWARDS, resolve_reward

    if rewards is None:
        if trainer_type == "grpo":
            errors.append(f"rewards: GRPO needs at least one reward function (built-ins: "
                          f"{', '.join(BUILTIN_REWARDS)}, or 'pkg.module:function')")
        return []
    if trainer_type is not None and trainer_type != "grpo":
        errors.append(f"rewards: only trainer.type grpo uses reward functions (this is {trainer_type})")
        return []
    out = []
    for i, entry in enumerate(rewards if isinstance(rewards, list) else []):
        key = f"rewards[{i}]"
        if isinstance(entry, str):
            entry = {"function": entry}
        if not isinstance(entry, dict):
            errors.append(f"{key}: expected a name string or {{function: ..., weight: ...}}, got {_describe(entry)}")
            continue
        for sub in entry:
            if sub not in ("function", "weight"):
                errors.append(f"{key}.{sub}: unknown key{_suggest(str(sub), ('function', 'weight'))} "
                              "(valid: function, weight)")
        weight = entry.get("weight", 1.0)
        if not _check_simple(weight, (float,)):
            errors.append(f"{key}.weight: expected float, got {_describe(weight)}")
        name = entry.get("function")
        if not isinstance(name, str):
            errors.append(f"{key}.function: expected a string, got {_describe(name)}")
            continue
        try:
            resolve_reward(name)
        except (ImportError, AttributeError, ValueError) as exc:
            errors.append(f"{key}.function: {exc}")
            continue
        out.append({"function": name, "weight": float(weight) if _check_simple(weight, (float,)) else 1.0})
    return out


def load_config(path: str | os.PathLike, overrides: typing.Sequence[str] = ()) -> TrainConfig:
    """``load_raw`` + ``validate``: the whole front door of ``fastft train``."""
    return validate(load_raw(path, overrides))
