"""Datasets for ``fastft train``: load (local file, datasets name, or the built-in arithmetic task), detect the
format, check it fits the trainer, and translate ``data:`` options into TRL config fields.

Formats (TRL's own dataset conventions):
  text              a `text` column (or `data.text_field`)                        -> SFT
  messages          a `messages` column of chat turns                           -> SFT (chat template)
  prompt_completion `prompt` + `completion` columns (plain or conversational)   -> SFT
  preference        `chosen` + `rejected` (+ `prompt`, or an implicit shared prefix)  -> DPO
  prompt            `prompt` (+ any columns the reward functions read, e.g. `answer`) -> GRPO
"""

from __future__ import annotations

import os
import random
from typing import Any

from fastft.train.config import FORMATS_FOR_TRAINER, ConfigError

_LOCAL_BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
BUILTIN_PREFIX = "builtin:"
#: builtin:arithmetic (operands 0..20) or builtin:arithmetic:N (operands 0..N).
BUILTIN_DATASETS = ("arithmetic",)


def arithmetic_rows(n: int, kind: str, seed: int = 0, max_operand: int = 20) -> list[dict[str, Any]]:
    """``n`` synthetic "a+b=" problems with a checkable answer, as rows for ``kind`` = sft | dpo | grpo.

    sft: ``messages`` (user asks, assistant answers); dpo: ``prompt``/``chosen``/``rejected`` (a wrong sum is
    rejected); grpo: ``prompt`` + ``answer`` (read by the ``exact_answer`` reward).
    """
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(0, max_operand), rng.randint(0, max_operand)
        question, answer = f"{a}+{b}=", str(a + b)
        user = [{"role": "user", "content": question}]
        if kind == "sft":
            rows.append({"messages": user + [{"role": "assistant", "content": answer}]})
        elif kind == "dpo":
            wrong = str(a + b + rng.choice([-3, -2, -1, 1, 2, 3]))
            rows.append({"prompt": user, "chosen": [{"role": "assistant", "content": answer}],
                         "rejected": [{"role": "assistant", "content": wrong}]})
        elif kind == "grpo":
            rows.append({"prompt": user, "answer": answer})
        else:
            raise ValueError(f"kind must be sft, dpo or grpo, got {kind!r}")
    return rows


def _load_one(source: str, data: dict, split: str, trainer_type: str, count_default: int):
    import datasets

    if source.startswith(BUILTIN_PREFIX):
        name, _, arg = source[len(BUILTIN_PREFIX):].partition(":")
        if name not in BUILTIN_DATASETS or (arg and not arg.isdigit()):
            raise ConfigError([f"data.path: unknown built-in dataset {source!r}; built-ins: "
                               f"{', '.join(BUILTIN_PREFIX + b for b in BUILTIN_DATASETS)} (optionally :N, the "
                               "largest operand)"])
        n = data.get("max_samples") or count_default
        seed = data["seed"] + (0 if split == "train" else 1_000_003)  # eval problems drawn separately
        rows = arithmetic_rows(n, trainer_type, seed=seed, max_operand=int(arg) if arg else 20)
        return datasets.Dataset.from_list(rows)
    ext = os.path.splitext(source)[1].lower()
    if ext in _LOCAL_BUILDERS or os.path.exists(source):
        if not os.path.isfile(source):
            raise ConfigError([f"data.path: {source!r} does not exist (or is not a file)"])
        if ext not in _LOCAL_BUILDERS:
            raise ConfigError([f"data.path: {source!r}: unsupported file type {ext!r}; use "
                               f"{', '.join(_LOCAL_BUILDERS)}"])
        return datasets.load_dataset(_LOCAL_BUILDERS[ext], data_files=source, split="train")
    return datasets.load_dataset(source, data.get("name"), split=split)


def _rename(ds: Any, data: dict) -> Any:
    mapping = data.get("rename") or {}
    missing = [old for old in mapping if old not in ds.column_names]
    if missing:
        raise ConfigError([f"data.rename: no column {', '.join(map(repr, missing))} in {ds.column_names}"])
    return ds.rename_columns(mapping) if mapping else ds


def detect_format(columns: list[str], text_field: str = "text") -> str:
    cols = set(columns)
    if {"chosen", "rejected"} <= cols:  # with a prompt column, or TRL's implicit prompt (shared chat prefix)
        return "preference"
    if "messages" in cols:
        return "messages"
    if {"prompt", "completion"} <= cols:
        return "prompt_completion"
    if "prompt" in cols:
        return "prompt"
    if text_field in cols:
        return "text"
    raise ConfigError([f"data.path: cannot tell the format from columns {sorted(cols)}; expected `{text_field}`, "
                       "`messages`, `prompt`+`completion`, `prompt`+`chosen`+`rejected` or `prompt`"])


def _is_conversational(example: dict, fmt: str) -> bool:
    key = {"messages": "messages", "prompt_completion": "prompt", "preference": "chosen", "prompt": "prompt"}.get(fmt)
    return key is not None and isinstance(example.get(key), list)


def load_datasets(data: dict, trainer_type: str, tokenizer: Any) -> tuple[Any, Any, dict[str, Any], str]:
    """(train, eval or None, TRL config fields implied by ``data:``, detected format)."""
    train = _load_one(data["path"], data, data["split"], trainer_type, count_default=256)
    if data.get("max_samples"):
        train = train.select(range(min(data["max_samples"], len(train))))
    train = _rename(train, data)
    evaluation = None
    if data.get("eval_path"):
        evaluation = _rename(_load_one(data["eval_path"], data, "train", trainer_type, count_default=32), data)
    elif data.get("eval_split"):
        evaluation = _rename(_load_one(data["path"], data, data["eval_split"], trainer_type, count_default=32), data)
    elif data.get("eval_size"):  # held out from the (already renamed) train split
        size = data["eval_size"]
        parts = train.train_test_split(test_size=size if size < 1 else int(size), seed=data["seed"], shuffle=True)
        train, evaluation = parts["train"], parts["test"]

    fmt = data["format"]
    if fmt == "auto":
        fmt = detect_format(train.column_names, data["text_field"])
    if fmt not in FORMATS_FOR_TRAINER[trainer_type]:
        raise ConfigError([f"data: the dataset is in {fmt!r} format (columns {train.column_names}); trainer.type "
                           f"{trainer_type} takes {', '.join(FORMATS_FOR_TRAINER[trainer_type])}"])
    conversational = len(train) > 0 and _is_conversational(train[0], fmt)

    if data.get("chat_template"):
        template = data["chat_template"]
        if os.path.isfile(template):
            with open(template, encoding="utf-8") as fh:
                template = fh.read()
        tokenizer.chat_template = template
    if conversational and not getattr(tokenizer, "chat_template", None):
        raise ConfigError(["data.chat_template: the data is conversational but the tokenizer has no chat template; "
                           "set data.chat_template to a Jinja template (string or .jinja file)"])

    fields: dict[str, Any] = {}
    if trainer_type == "sft":
        fields["packing"] = bool(data.get("packing"))
        if fmt == "text" and data["text_field"] != "text":
            fields["dataset_text_field"] = data["text_field"]
        if data.get("train_on_responses_only"):
            if fmt == "text":
                raise ConfigError(["data.train_on_responses_only: plain `text` data has no response to isolate; use "
                                   "`messages` or `prompt`/`completion` data"])
            if fmt == "messages":
                if "generation" not in (tokenizer.chat_template or ""):
                    raise ConfigError(["data.train_on_responses_only: with `messages` data TRL masks non-assistant "
                                       "tokens via {% generation %} markers, which this chat template lacks; set "
                                       "data.chat_template to one that has them, or use prompt/completion data"])
                fields["assistant_only_loss"] = True
            else:
                fields["completion_only_loss"] = True
        elif fmt == "prompt_completion":
            fields["completion_only_loss"] = False
    return train, evaluation, fields, fmt
