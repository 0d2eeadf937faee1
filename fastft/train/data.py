"""Datasets for ``fastft train``: load (local file, datasets name, or the built-in arithmetic task), detect the
format, check it fits the trainer, and translate ``data:`` options into TRL config fields.

Two steps, so a wrong file, format or column fails before any model loads: :func:`load_datasets` reads the data and
checks formats and columns (it needs no tokenizer); :func:`trainer_fields` does what needs the tokenizer (chat
template) once the model is loaded.

Formats (TRL's own dataset conventions):
  text              a `text` column (or `data.text_field`)                        -> SFT
  messages          a `messages` column of chat turns                           -> SFT (chat template)
  prompt_completion `prompt` + `completion` columns (plain or conversational)   -> SFT
  preference        `chosen` + `rejected` (+ `prompt`, or an implicit shared prefix)  -> DPO
  prompt            `prompt` (+ any columns the reward functions read, e.g. `answer`) -> GRPO
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import random
from collections.abc import Sequence
from typing import Any

from fastft.sources import BUILTIN_PREFIX, LOCAL_DATA_BUILDERS, check_data_source
from fastft.train.config import FORMATS_FOR_TRAINER, ConfigError

#: The columns each format needs (TRL's rules: SFTTrainer reads `messages`, `dataset_text_field` or
#: `prompt`+`completion`; DPOTrainer needs `chosen`+`rejected` and extracts an implicit prompt when `prompt` is absent;
#: GRPOTrainer needs `prompt`). "text" stands for ``data.text_field``.
FORMAT_COLUMNS: dict[str, tuple[str, ...]] = {
    "messages": ("messages",),
    "prompt_completion": ("prompt", "completion"),
    "text": ("text",),
    "preference": ("chosen", "rejected"),
    "prompt": ("prompt",),
}
_FORMAT_WORDS = {
    "messages": "`messages` (chat turns)",
    "prompt_completion": "`prompt` + `completion`",
    "text": "`{text}` (plain text)",
    "preference": "`chosen` + `rejected` (+ `prompt`, or a prompt shared as the start of both chats)",
    "prompt": "`prompt` (+ any columns the rewards read)",
}
#: Column names that usually mean one of ours (for the did-you-mean of a missing column).
_COLUMN_ALIASES = {
    "prompt": ("question", "query", "instruction", "input", "problem"),
    "completion": ("response", "output", "answer", "solution"),
    "text": ("content", "document"),
    "messages": ("conversations", "conversation", "chat", "dialog"),
}
#: Built-in rewards -> the dataset columns they read (any one of them), as fastft.train.rewards looks them up.
REWARD_COLUMNS = {"exact_answer": ("answer", "solution", "ground_truth")}


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
            rows.append(
                {
                    "prompt": user,
                    "chosen": [{"role": "assistant", "content": answer}],
                    "rejected": [{"role": "assistant", "content": wrong}],
                }
            )
        elif kind == "grpo":
            rows.append({"prompt": user, "answer": answer})
        else:
            raise ValueError(f"kind must be sft, dpo or grpo, got {kind!r}")
    return rows


def _load_one(source: str, data: dict, split: str, trainer_type: str, count_default: int, key: str):
    import datasets

    problem = check_data_source(source)  # validate() ran it too; a TrainConfig built by hand may skip validate()
    if problem:
        raise ConfigError([f"{key}: {problem}"])
    if source.startswith(BUILTIN_PREFIX):
        _, _, arg = source[len(BUILTIN_PREFIX) :].partition(":")
        n = data.get("max_samples") or count_default
        seed = data["seed"] + (0 if split == "train" else 1_000_003)  # eval problems drawn separately
        rows = arithmetic_rows(n, trainer_type, seed=seed, max_operand=int(arg) if arg else 20)
        return datasets.Dataset.from_list(rows)
    path = os.path.expanduser(source)
    try:
        if os.path.isfile(path):
            builder = LOCAL_DATA_BUILDERS[os.path.splitext(path)[1].lower()]
            return datasets.load_dataset(builder, data_files=path, split="train")
        return datasets.load_dataset(source, data.get("name"), split=split)
    except (OSError, ValueError, datasets.exceptions.DatasetGenerationError) as exc:
        # Not found on the hub, offline, unknown split or config, a malformed file: the user's input, so a
        # ConfigError naming the key (with datasets' own explanation), raised before the model loads.
        cause = f" ({type(exc.__cause__).__name__}: {exc.__cause__})" if exc.__cause__ is not None else ""
        raise ConfigError(
            [f"{key}: datasets could not load {source!r} (split {split!r}): {type(exc).__name__}: {exc}{cause}"]
        ) from exc


def _rename(ds: Any, data: dict, key: str) -> Any:
    mapping = data.get("rename") or {}
    missing = [old for old in mapping if old not in ds.column_names]
    if missing:
        hints = "".join(_suggest_column(old, ds.column_names) for old in missing)
        raise ConfigError(
            [f"data.rename: no column {', '.join(map(repr, missing))} in {key}'s columns {ds.column_names}{hints}"]
        )
    return ds.rename_columns(mapping) if mapping else ds


def _suggest_column(name: str, columns: Sequence[str]) -> str:
    close = difflib.get_close_matches(name, list(columns), n=1, cutoff=0.6)
    return f"; did you mean `{close[0]}`?" if close else ""


def _required(fmt: str, text_field: str) -> tuple[str, ...]:
    return (text_field,) if fmt == "text" else FORMAT_COLUMNS[fmt]


def _describe_format(fmt: str, text_field: str) -> str:
    return _FORMAT_WORDS[fmt].replace("{text}", text_field)


def detect_format(columns: Sequence[str], text_field: str = "text") -> str | None:
    """The TRL format ``columns`` are in, whatever the trainer (None if none): preference, messages,
    prompt_completion, prompt, then text -- the most specific first."""
    cols = set(columns)
    for fmt in ("preference", "messages", "prompt_completion", "prompt", "text"):
        if set(_required(fmt, text_field)) <= cols:
            return fmt
    return None


def _rename_hints(columns: Sequence[str], wanted: Sequence[str]) -> str:
    """ "did you mean `promt` for `prompt`? (data.rename: {promt: prompt})" for each wanted column that is missing
    and has a near or usual-alias column present."""
    hints = []
    unused = [c for c in columns if c not in wanted]
    for want in dict.fromkeys(wanted):
        if want in columns:
            continue
        close = difflib.get_close_matches(want, unused, n=1, cutoff=0.6)
        alias = [c for c in unused if c.lower() in _COLUMN_ALIASES.get(want, ())]
        candidate = close[0] if close else (alias[0] if alias else None)
        if candidate is not None:
            hints.append(f"; did you mean `{candidate}` for `{want}`? (data.rename: {{{candidate}: {want}}})")
    return "".join(hints)


def resolve_format(columns: Sequence[str], data: dict, trainer_type: str, key: str = "data.path") -> str:
    """The format of a dataset with ``columns`` for ``trainer_type``, or a ConfigError saying which columns are
    missing, which formats the trainer takes, and the nearest column names (TRL's column rules, see FORMAT_COLUMNS)."""
    text_field = data["text_field"]
    columns = list(columns)
    accepted = FORMATS_FOR_TRAINER[trainer_type]
    takes = f"trainer.type {trainer_type} takes " + " or ".join(_describe_format(f, text_field) for f in accepted)
    fmt = data["format"]
    if fmt != "auto":
        missing = [c for c in _required(fmt, text_field) if c not in columns]
        if missing:
            raise ConfigError(
                [
                    f"{key}: data.format {fmt} needs the column{'s' if len(missing) > 1 else ''} "
                    f"{', '.join(f'`{c}`' for c in missing)}; the data has columns {columns}"
                    f"{_rename_hints(columns, missing)}"
                ]
            )
        return fmt
    for candidate in accepted:  # the trainer's own formats first: GRPO data may carry a `completion` column too
        if set(_required(candidate, text_field)) <= set(columns):
            return candidate
    wanted = [c for f in accepted for c in _required(f, text_field)]
    hints = _rename_hints(columns, wanted)
    found = detect_format(columns, text_field)
    if found is None:
        raise ConfigError([f"{key}: cannot tell the format from columns {columns}; {takes}{hints}"])
    users = [t for t, formats in FORMATS_FOR_TRAINER.items() if found in formats]
    raise ConfigError(
        [
            f"{key}: columns {columns} are {_describe_format(found, text_field).replace(' (', ' data (', 1)}"
            f", which trainer.type {' or '.join(users)} takes; {takes}{hints}"
        ]
    )


def _check_reward_columns(columns: Sequence[str], rewards: Sequence[dict], key: str) -> list[str]:
    errors = []
    for i, reward in enumerate(rewards):
        needs = REWARD_COLUMNS.get(reward["function"])
        if needs and not set(needs) & set(columns):
            others = ", ".join(f"`{c}`" for c in needs[1:])
            errors.append(
                f"rewards[{i}].function: {reward['function']} reads the `{needs[0]}` (or {others}) column, "
                f"which {key} lacks (columns {list(columns)}){_rename_hints(columns, needs[:1])}"
            )
    return errors


def _is_conversational(example: dict, fmt: str) -> bool:
    key = {"messages": "messages", "prompt_completion": "prompt", "preference": "chosen", "prompt": "prompt"}.get(fmt)
    return key is not None and isinstance(example.get(key), list)


@dataclasses.dataclass
class Datasets:
    """The loaded, renamed and format-checked data; ``chat_template`` is ``data.chat_template``'s text, if set."""

    train: Any
    evaluation: Any | None
    fmt: str
    conversational: bool
    chat_template: str | None = None


def load_datasets(data: dict, trainer_type: str, rewards: Sequence[dict] = ()) -> Datasets:
    """Read the train (and eval) data and check it fits ``trainer_type`` and the ``rewards``; needs no model."""
    train = _load_one(data["path"], data, data["split"], trainer_type, count_default=256, key="data.path")
    if data.get("max_samples"):
        train = train.select(range(min(data["max_samples"], len(train))))
    train = _rename(train, data, "data.path")
    evaluation, eval_key = None, None
    if data.get("eval_path"):
        eval_key = "data.eval_path"
        evaluation = _load_one(data["eval_path"], data, "train", trainer_type, count_default=32, key=eval_key)
        evaluation = _rename(evaluation, data, eval_key)
    elif data.get("eval_split"):
        eval_key = "data.eval_split"
        evaluation = _load_one(data["path"], data, data["eval_split"], trainer_type, count_default=32, key=eval_key)
        evaluation = _rename(evaluation, data, eval_key)

    errors: list[str] = []
    fmt = None
    for key, ds in (("data.path", train), (eval_key, evaluation)):
        if ds is None:
            continue
        try:
            found = resolve_format(ds.column_names, data, trainer_type, key)
        except ConfigError as exc:
            errors.extend(exc.errors)
            continue
        if fmt is not None and found != fmt:
            errors.append(f"{key}: the eval data is {found!r} data, the train data {fmt!r}; use one format")
        fmt = fmt or found
        if trainer_type == "grpo":
            errors.extend(_check_reward_columns(ds.column_names, rewards, key))
    if trainer_type == "sft" and data.get("train_on_responses_only") and fmt == "text":
        errors.append(
            "data.train_on_responses_only: plain `text` data has no response to isolate; use `messages` "
            "or `prompt`/`completion` data"
        )
    if errors:
        raise ConfigError(errors)
    if evaluation is None and data.get("eval_size"):  # held out from the (already renamed) train split
        size = data["eval_size"]
        parts = train.train_test_split(test_size=size if size < 1 else int(size), seed=data["seed"], shuffle=True)
        train, evaluation = parts["train"], parts["test"]
    conversational = len(train) > 0 and _is_conversational(train[0], fmt)

    template = data.get("chat_template")
    if template and os.path.isfile(os.path.expanduser(template)):
        with open(os.path.expanduser(template), encoding="utf-8") as fh:
            template = fh.read()
    if template and data.get("train_on_responses_only") and fmt == "messages" and "generation" not in template:
        raise ConfigError([_NO_GENERATION_MARKERS])
    return Datasets(train, evaluation, fmt, conversational, template or None)


_NO_GENERATION_MARKERS = (
    "data.train_on_responses_only: with `messages` data TRL masks non-assistant tokens via "
    "{% generation %} markers, which this chat template lacks; set data.chat_template to one "
    "that has them, or use prompt/completion data"
)


def trainer_fields(data: dict, trainer_type: str, loaded: Datasets, tokenizer: Any) -> dict[str, Any]:
    """The TRL config fields implied by ``data:``; sets ``data.chat_template`` on the tokenizer. Runs after the model
    (and so the tokenizer) has loaded: the checks here need the tokenizer's own chat template."""
    fmt = loaded.fmt
    if loaded.chat_template:
        tokenizer.chat_template = loaded.chat_template
    if loaded.conversational and not getattr(tokenizer, "chat_template", None):
        raise ConfigError(
            [
                "data.chat_template: the data is conversational but the tokenizer has no chat template; "
                "set data.chat_template to a Jinja template (string or .jinja file)"
            ]
        )

    fields: dict[str, Any] = {}
    if trainer_type == "sft":
        fields["packing"] = bool(data.get("packing"))
        if fmt == "text" and data["text_field"] != "text":
            fields["dataset_text_field"] = data["text_field"]
        if data.get("train_on_responses_only"):  # `text` data was refused by load_datasets
            if fmt == "messages":
                if "generation" not in (tokenizer.chat_template or ""):
                    raise ConfigError([_NO_GENERATION_MARKERS])
                fields["assistant_only_loss"] = True
            else:
                fields["completion_only_loss"] = True
        elif fmt == "prompt_completion":
            fields["completion_only_loss"] = False
    return fields
