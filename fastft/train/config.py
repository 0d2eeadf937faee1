"""The ``fastft train`` YAML schema: load, apply ``--set`` overrides, validate -- all before anything heavy loads.

One file maps 1:1 to what it builds::

    model:    FastModel.from_pretrained(...) and FastModel.for_training(...) arguments, plus `lora:`
              (FastModel.get_peft_model arguments and the peft.LoraConfig fields it passes on, or null for none)
    data:     where the examples come from and how they are formatted
    trainer:  `type: sft|dpo|grpo` plus fields of trl.SFTConfig / DPOConfig / GRPOConfig, checked against the dataclass
    optim:    optimizer fields (optim, learning_rate, ...), forwarded to the same TRL config
    rewards:  GRPO reward functions: built-in names or "pkg.module:function"
    export:   {gguf: q8_0 | q4_k_m | ...}: the trained model as a GGUF file under output_dir/gguf (fastft.export)
    output_dir, resume (false | true | auto | a checkpoint dir), max_minutes

The keys and types of model:, lora: and trainer: are read from those signatures and dataclasses themselves (names
from ``inspect.signature``, types from their annotations, checked by pydantic in strict mode), so a parameter added
there is accepted here with nothing to copy. YAML 1.2 floats (``1e-4``, which PyYAML's YAML 1.1 reads as a string)
load as floats. Every problem is reported at once, each naming its dotted key and, for a misspelt key, the nearest
valid one.
Model and data paths are checked here too (fastft.train.sources: file system only, no hub call); formats and
columns need the data itself and are checked by fastft.train.data, still before any model loads.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import inspect
import os
import re
import types
import typing
from typing import Any

import yaml
from pydantic import ConfigDict, PydanticUserError, TypeAdapter, ValidationError

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

#: The top level: section -> annotation. model:, data: and trainer: are checked key by key below.
TOP_SCHEMA: dict[str, Any] = {
    "model": dict,
    "data": dict,
    "trainer": dict,
    "optim": dict | None,
    "rewards": list | None,
    "output_dir": str,
    "resume": bool | str,
    "max_minutes": float | None,
    "export": dict | None,  # {gguf: <quantization>}: written after training (fastft.export.train_hook)
}
#: data: is fastft's own (read by fastft.train.data): key -> annotation.
DATA_SCHEMA: dict[str, Any] = {
    "path": str,  # local .jsonl/.json/.csv/.parquet, a datasets name, or builtin:arithmetic
    "name": str | None,  # datasets config name
    "split": str,
    "eval_path": str | None,  # a local eval file
    "eval_split": str | None,  # a split of the same dataset
    "eval_size": int | float | None,  # hold out this fraction (<1) or count (>=1) of the train split
    "format": str,
    "rename": dict | None,  # {old column: new column}, e.g. {question: prompt} for GSM8K
    "text_field": str,
    "chat_template": str | None,  # a Jinja template string or a path to a .jinja file
    "train_on_responses_only": bool,
    "packing": bool,
    "max_samples": int | None,
    "seed": int,
}
#: optim: fields of TrainingArguments that choose and tune the optimizer and schedule.
OPTIM_FIELDS = (
    "optim",
    "optim_args",
    "optim_target_modules",
    "learning_rate",
    "weight_decay",
    "adam_beta1",
    "adam_beta2",
    "adam_epsilon",
    "max_grad_norm",
    "lr_scheduler_type",
    "lr_scheduler_kwargs",
    "warmup_steps",
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
DEFAULT_DATA = {
    "split": "train",
    "format": "auto",
    "text_field": "text",
    "train_on_responses_only": False,
    "packing": False,
    "seed": 0,
}


class ConfigError(ValueError):
    """A config problem (or several); ``errors`` lists one message per problem, each starting with the dotted key."""

    def __init__(self, errors: list[str]):
        self.errors = list(errors)
        super().__init__("invalid fastft config:\n" + "\n".join(f"  - {e}" for e in self.errors))


def _suggest(key: str, valid: typing.Iterable[str]) -> str:
    close = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.6)
    return f"; did you mean `{close[0]}`?" if close else ""


def _describe(value: Any) -> str:
    return f"{type(value).__name__} {value!r}" if value is not None else "null"


def _check_at_least_one(section: dict, key: str, prefix: str, errors: list[str]) -> None:
    value = section.get(key)
    if isinstance(value, int) and not isinstance(value, bool) and value < 1:
        errors.append(f"{prefix}{key}: must be >= 1, got {value}")


# ---------------------------------------------------------------------------------------------------------------------
# Types: a value against an annotation (strict: no str -> int, no bool -> int; an int is a valid float)
# ---------------------------------------------------------------------------------------------------------------------
_STRICT = ConfigDict(strict=True, arbitrary_types_allowed=True)


def _new_adapter(annotation: Any) -> TypeAdapter:
    try:
        return TypeAdapter(annotation, config=_STRICT)
    except PydanticUserError:  # a dataclass / model type carries its own config (e.g. peft's LoraRuntimeConfig)
        return TypeAdapter(annotation)


_cached_adapter = functools.cache(_new_adapter)


def _adapter(annotation: Any) -> TypeAdapter:
    try:
        return _cached_adapter(annotation)
    except TypeError:  # an unhashable annotation (Annotated metadata): build it each time
        return _new_adapter(annotation)


def check_value(value: Any, annotation: Any) -> tuple[bool, Any]:
    """(ok, value) for ``value`` against a type annotation; the value comes back as validated (an int for a float
    field as a float, a dict for a dataclass field as that dataclass)."""
    try:
        return True, _adapter(annotation).validate_python(value)
    except ValidationError:
        return False, value


def _annotation_name(annotation: Any) -> str:
    """``int | None`` -> "int or null"; ``torch.dtype`` -> "torch.dtype"; ``Literal['a', 'b']`` -> "'a' or 'b'"."""
    if annotation is type(None) or annotation is None:
        return "null"
    if annotation is Any:
        return "any value"
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_annotation_name(arm) for arm in typing.get_args(annotation))
    if origin is typing.Literal:
        return " or ".join(repr(v) for v in typing.get_args(annotation))
    if isinstance(annotation, type) and origin is None:
        module = annotation.__module__.split(".")[0]
        return annotation.__qualname__ if module == "builtins" else f"{module}.{annotation.__qualname__}"
    return str(annotation).replace("typing.", "")


def signature_fields(func: Any, skip: typing.Iterable[str] = ()) -> dict[str, Any]:
    """``{parameter: annotation}`` for the named parameters of ``func`` (not ``*args``/``**kwargs``, not ``skip``)."""
    hints = typing.get_type_hints(func)
    named = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return {
        name: hints.get(name, Any)
        for name, param in inspect.signature(func).parameters.items()
        if param.kind in named and name not in set(skip)
    }


def dataclass_fields(cls: type, skip: typing.Iterable[str] = ()) -> dict[str, Any]:
    """``{field: annotation}`` for the ``__init__`` fields of a dataclass (TRL configs, peft.LoraConfig)."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints.get(f.name, Any) for f in dataclasses.fields(cls) if f.init and f.name not in set(skip)}


def _check_fields(
    section: dict,
    fields: dict[str, Any],
    prefix: str,
    errors: list[str],
    out: dict | None = None,
    *,
    unknown: str = "unknown key",
    valid: str | None = None,
) -> None:
    """Check each key of ``section`` against ``fields`` (name -> annotation); validated values go to ``out``."""
    for key, value in section.items():
        if key not in fields:
            listing = valid if valid is not None else f" (valid: {', '.join(fields)})"
            errors.append(f"{prefix}{key}: {unknown}{_suggest(str(key), fields)}{listing}")
            continue
        ok, checked = check_value(value, fields[key])
        if not ok:
            errors.append(f"{prefix}{key}: expected {_annotation_name(fields[key])}, got {_describe(value)}")
        elif out is not None:
            out[key] = checked


# ---------------------------------------------------------------------------------------------------------------------
# model: and model.lora: -- the signatures `fastft train` calls (fastft.train.run.load_model)
# ---------------------------------------------------------------------------------------------------------------------
#: What `fastft train` passes to FastModel.for_training / get_peft_model when model: does not say: checkpointing on,
#: fastft's mode (the API's own default, None, defers to TRL's gradient_checkpointing, which run.py turns off so
#: that FastModel owns it).
TRAINING_DEFAULTS: dict[str, Any] = {"use_gradient_checkpointing": "fastft"}
#: model.lora: keys set elsewhere: naming them there is an error pointing to the right place.
_LORA_OWNED_ELSEWHERE = {
    "use_gradient_checkpointing": "`model.use_gradient_checkpointing` (it applies with or without LoRA)",
    "task_type": "fastft (always CAUSAL_LM)",
}


def model_fields() -> tuple[dict[str, Any], dict[str, Any]]:
    """(from_pretrained fields, for_training fields): model: takes both; ``name`` is ``model_name``."""
    from fastft.model import FastModel

    load = {"name": str, **signature_fields(FastModel.from_pretrained, skip=("model_name",))}
    return load, signature_fields(FastModel.for_training, skip=("model",))


def lora_fields() -> tuple[dict[str, Any], dict[str, Any]]:
    """(get_peft_model's own parameters, the peft.LoraConfig fields its ``**kwargs`` reach)."""
    from fastft.model import FastModel

    own = signature_fields(FastModel.get_peft_model, skip=("model", *_LORA_OWNED_ELSEWHERE))
    import peft

    return own, dataclass_fields(peft.LoraConfig, skip=(*own, *_LORA_OWNED_ELSEWHERE))


def split_model_section(model: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """A validated model: section -> (``FastModel.from_pretrained`` kwargs without the name, the kwargs for
    ``for_training`` / ``get_peft_model``, defaults from TRAINING_DEFAULTS filled in)."""
    load, training = model_fields()
    return (
        {k: v for k, v in model.items() if k in load and k != "name"},
        {**TRAINING_DEFAULTS, **{k: v for k, v in model.items() if k in training}},
    )


def _check_model(model: dict, errors: list[str]) -> None:
    load, training = model_fields()
    _check_fields(model, {**load, **training, "lora": dict | bool | None}, "model.", errors, model)


def _check_lora(lora: dict, errors: list[str]) -> None:
    own, passed_on = lora_fields()
    for key in [k for k in lora if k in _LORA_OWNED_ELSEWHERE]:
        errors.append(f"model.lora.{key}: set by {_LORA_OWNED_ELSEWHERE[key]}, not under model.lora")
        del lora[key]
    _check_fields(
        lora,
        {**own, **passed_on},
        "model.lora.",
        errors,
        lora,
        valid=f" (valid: {', '.join(own)}, or a peft.LoraConfig field)",
    )


def trainer_config_class(trainer_type: str) -> type:
    """trl.SFTConfig / DPOConfig / GRPOConfig (imports trl's config module, not a model)."""
    import trl

    return {"sft": trl.SFTConfig, "dpo": trl.DPOConfig, "grpo": trl.GRPOConfig}[trainer_type]


@functools.cache
def trainer_fields(cls: type) -> dict[str, Any]:
    """The fields trainer: and optim: may set: the TRL config's, plus fastft's ``embedding_learning_rate``
    (declared by fastft.optim's EmbeddingLRMixin; set as an attribute after construction by fastft.train.run)."""
    from fastft.optim.factory import EmbeddingLRMixin

    return {**dataclass_fields(cls), **dataclass_fields(EmbeddingLRMixin)}


def _check_trainer_fields(section: dict, cls: type, prefix: str, errors: list[str], out: dict) -> None:
    owned = [k for k in section if k in _OWNED_ELSEWHERE]
    for key in owned:
        errors.append(f"{prefix}{key}: set it with {_OWNED_ELSEWHERE[key]}, not under {prefix.rstrip('.')}")
    rest = {k: v for k, v in section.items() if k != "type" and k not in owned}
    _check_fields(rest, trainer_fields(cls), prefix, errors, out, unknown=f"not a field of {cls.__name__}", valid="")


# ---------------------------------------------------------------------------------------------------------------------
# Loading and overrides
# ---------------------------------------------------------------------------------------------------------------------
class _Loader(yaml.SafeLoader):
    """yaml.safe_load plus YAML 1.2's exponent floats: PyYAML implements YAML 1.1, where ``1e-4`` (no dot) is a
    string -- the usual way to write a learning rate."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789")
)


def _yaml(stream: Any) -> Any:
    return yaml.load(stream, Loader=_Loader)  # a SafeLoader subclass: no Python objects


def apply_override(raw: dict, assignment: str) -> None:
    """Apply one ``--set dotted.key=value`` (value parsed as YAML, safely) to ``raw`` in place."""
    if "=" not in assignment:
        raise ConfigError([f"--set {assignment!r}: expected KEY=VALUE, e.g. --set trainer.learning_rate=1e-4"])
    key, _, text = assignment.partition("=")
    parts = key.strip().split(".")
    if not key.strip() or any(not p for p in parts):
        raise ConfigError([f"--set {assignment!r}: empty key segment in {key!r}"])
    try:
        value = _yaml(text) if text.strip() else None
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
    """Read a YAML config (safe loading only) and apply ``--set`` overrides."""
    try:
        with open(path, encoding="utf-8") as fh:
            raw = _yaml(fh)
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
    export: dict[str, str] = dataclasses.field(default_factory=dict)  # checked ``export:`` (fastft.export)


def validate(raw: dict) -> TrainConfig:
    """Check every section; raise :class:`ConfigError` listing all problems. Imports trl's config classes only."""
    errors: list[str] = []
    _check_fields(raw, TOP_SCHEMA, "", errors)
    for required in ("model", "data", "trainer", "output_dir"):
        if required not in raw:
            errors.append(f"{required}: required section is missing")
    model = dict(raw.get("model") or {}) if isinstance(raw.get("model"), dict) else {}
    data = dict(raw.get("data") or {}) if isinstance(raw.get("data"), dict) else {}
    trainer = dict(raw.get("trainer") or {}) if isinstance(raw.get("trainer"), dict) else {}
    optim = dict(raw.get("optim") or {}) if isinstance(raw.get("optim"), dict) else {}

    _check_model(model, errors)
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
        _check_lora(lora, errors)
        _check_at_least_one(lora, "r", "model.lora.", errors)
    if model.get("full_finetuning") and lora is not None and isinstance(raw.get("model"), dict) and "lora" in raw["model"]:
        errors.append("model.lora: full_finetuning trains every weight; set model.lora: null (or drop full_finetuning)")
    if model.get("full_finetuning"):
        lora = None

    _check_fields(data, DATA_SCHEMA, "data.", errors, data)
    if "path" not in data and isinstance(raw.get("data"), dict):
        errors.append(f"data.path: required (a local {ACCEPTED_DATA_FILES} file, a datasets name, or builtin:arithmetic)")
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
        errors.append(
            f"data.format: {data['format']!r} is not one of {', '.join(DATA_FORMATS)}"
            f"{_suggest(data['format'], DATA_FORMATS)}"
        )

    trainer_type = trainer.get("type")
    trainer_args: dict[str, Any] = {}
    if "trainer" in raw and trainer_type is None:
        errors.append(f"trainer.type: required; one of {', '.join(TRAINER_TYPES)}")
    elif trainer_type is not None and trainer_type not in TRAINER_TYPES:
        errors.append(
            f"trainer.type: unknown trainer type {trainer_type!r}; supported: {', '.join(TRAINER_TYPES)}"
            f"{_suggest(str(trainer_type), TRAINER_TYPES)}"
        )
        trainer_type = None
    if trainer_type is not None:
        cls = trainer_config_class(trainer_type)
        _check_trainer_fields(trainer, cls, "trainer.", errors, trainer_args)
        for key in optim:
            if key not in OPTIM_FIELDS:
                errors.append(
                    f"optim.{key}: unknown optimizer field{_suggest(str(key), OPTIM_FIELDS)} "
                    f"(valid: {', '.join(OPTIM_FIELDS)})"
                )
            elif key in trainer:
                errors.append(f"optim.{key}: also set as trainer.{key}; set it in one place")
        optim_args: dict[str, Any] = {}
        _check_trainer_fields({k: v for k, v in optim.items() if k in OPTIM_FIELDS}, cls, "optim.", errors, optim_args)
        trainer_args.update(optim_args)
        if data.get("packing") and trainer_type != "sft":
            errors.append("data.packing: packing applies to trainer.type sft only")
        if data.get("train_on_responses_only") and trainer_type != "sft":
            errors.append(
                "data.train_on_responses_only: DPO and GRPO already score responses only; use it with trainer.type sft"
            )
        fmt = data.get("format")
        if fmt not in (None, "auto") and fmt in DATA_FORMATS and fmt not in FORMATS_FOR_TRAINER[trainer_type]:
            errors.append(
                f"data.format: {fmt!r} does not fit trainer.type {trainer_type}; it takes "
                f"{', '.join(FORMATS_FOR_TRAINER[trainer_type])}"
            )

    rewards = _check_rewards(raw.get("rewards"), trainer_type, errors)
    export = _check_export(raw.get("export"), errors)

    resume = raw.get("resume", False)
    if isinstance(resume, str) and resume != "auto" and not os.path.isdir(resume):
        errors.append(f"resume: expected true, false, auto or an existing checkpoint directory, got {resume!r}")
    if errors:
        raise ConfigError(errors)
    max_minutes = raw.get("max_minutes")
    return TrainConfig(
        trainer_type=trainer_type,
        model=model,
        lora=lora,
        data=data,
        trainer_args=trainer_args,
        rewards=rewards,
        output_dir=str(raw["output_dir"]),
        resume=resume,
        max_minutes=float(max_minutes) if max_minutes is not None else None,
        raw=raw,
        export=export,
    )


def _check_rewards(rewards: Any, trainer_type: str | None, errors: list[str]) -> list[dict[str, Any]]:
    from fastft.train.rewards import BUILTIN_REWARDS, resolve_reward

    if rewards is None:
        if trainer_type == "grpo":
            errors.append(
                f"rewards: GRPO needs at least one reward function (built-ins: "
                f"{', '.join(BUILTIN_REWARDS)}, or 'pkg.module:function')"
            )
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
                errors.append(
                    f"{key}.{sub}: unknown key{_suggest(str(sub), ('function', 'weight'))} (valid: function, weight)"
                )
        weight = entry.get("weight", 1.0)
        weight_ok, weight = check_value(weight, float)
        if not weight_ok:
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
        out.append({"function": name, "weight": weight if weight_ok else 1.0})
    return out


def _check_export(section: Any, errors: list[str]) -> dict[str, str]:
    """fastft.export's own check of ``export:``; a k-quant also needs llama.cpp now, not after the training."""
    if not isinstance(section, dict):
        return {}  # null, or already reported as not a mapping
    from fastft.export.errors import ExportError
    from fastft.export.quantize import needs_llama_cpp, require_llama_cpp, resolve_quantization
    from fastft.export.train_hook import check_export_section

    try:
        checked = check_export_section(section)
        if "gguf" in checked and needs_llama_cpp(resolve_quantization(checked["gguf"])):
            require_llama_cpp()
    except ExportError as exc:
        errors.append(f"export.gguf: {exc}" if set(section) == {"gguf"} else f"export: {exc}")
        return {}
    return checked


def load_config(path: str | os.PathLike, overrides: typing.Sequence[str] = ()) -> TrainConfig:
    """``load_raw`` + ``validate``: the whole front door of ``fastft train``."""
    return validate(load_raw(path, overrides))
