"""GRPO reward functions: built-ins and ``"pkg.module:function"`` resolution.

TRL calls each reward as ``f(prompts=..., completions=..., completion_ids=..., **dataset_columns)`` and wants one
float (or None) per completion. Conversational completions are ``[{"role": "assistant", "content": ...}]``.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable
from typing import Any

_NUMBER = r"-?\d[\d,]*(?:\.\d+)?"
_MARKED = [
    re.compile(r"####\s*(" + _NUMBER + ")"),
    re.compile(r"\\boxed\{\s*([^{}]*?)\s*\}"),
    re.compile(r"<answer>\s*(.*?)\s*</answer>", re.S),
]
_BARE_NUMBER = re.compile(r"^\s*(" + _NUMBER + r")\s*\.?\s*$")


def completion_text(completion: Any) -> str:
    """The text of one completion, conversational (list of messages) or plain."""
    if isinstance(completion, list):
        return "".join(m.get("content", "") for m in completion if isinstance(m, dict))
    return str(completion)


def extract_answer(text: str) -> str | None:
    """The final answer in ``text``: a marked one (``#### 19``, ``\\boxed{19}``, ``<answer>19</answer>``), a bare
    number, else the last number in the text; None if there is none."""
    for pattern in _MARKED:
        found = pattern.findall(text)
        if found:
            return found[-1].strip()
    numbers = re.findall(_NUMBER, text)
    return numbers[-1] if numbers else None


def _normalize(answer: Any) -> str:
    text = str(answer).strip().replace(",", "")
    if "####" in text:  # GSM8K-style reference solutions end with "#### 42"
        text = text.rsplit("####", 1)[-1].strip()
    try:
        number = float(text)
        return str(int(number)) if number.is_integer() else str(number)
    except ValueError:
        return text


def exact_answer(completions: list, answer: list | None = None, **kwargs: Any) -> list[float]:
    """1.0 when the completion's final answer equals the dataset's ``answer`` column (numbers compared by value)."""
    if answer is None:
        answer = kwargs.get("solution") or kwargs.get("ground_truth")
    if answer is None:
        raise ValueError("exact_answer needs an `answer` (or `solution`/`ground_truth`) column in the dataset")
    rewards = []
    for completion, truth in zip(completions, answer):
        got = extract_answer(completion_text(completion))
        rewards.append(1.0 if got is not None and _normalize(got) == _normalize(truth) else 0.0)
    return rewards


def format_reward(completions: list, **kwargs: Any) -> list[float]:
    """1.0 when the completion states its answer in a checkable form: a marked answer or just a number."""
    rewards = []
    for completion in completions:
        text = completion_text(completion)
        ok = any(p.search(text) for p in _MARKED) or bool(_BARE_NUMBER.match(text))
        rewards.append(1.0 if ok else 0.0)
    return rewards


BUILTIN_REWARDS: dict[str, Callable[..., list[float]]] = {"exact_answer": exact_answer, "format": format_reward}


def resolve_reward(name: str) -> Callable[..., list[float]]:
    """A built-in name or ``"pkg.module:function"`` -> the callable (clear errors for anything else)."""
    if name in BUILTIN_REWARDS:
        return BUILTIN_REWARDS[name]
    if ":" not in name:
        raise ValueError(f"unknown reward {name!r}: use a built-in ({', '.join(BUILTIN_REWARDS)}) or 'pkg.module:function'")
    module_name, _, attr = name.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ImportError(f"reward {name!r}: cannot import module {module_name!r} ({exc})") from None
    fn = getattr(module, attr, None)
    if fn is None:
        raise AttributeError(f"reward {name!r}: module {module_name!r} has no attribute {attr!r}")
    if not callable(fn):
        raise ValueError(f"reward {name!r}: {attr!r} is not callable")
    return fn
