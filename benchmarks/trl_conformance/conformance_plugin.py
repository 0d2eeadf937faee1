"""pytest plugin for TRL's own trainer tests, offline: hub stand-ins, and PatchFastRL before each test when asked.

Loaded by ``benchmarks/trl_conformance/run.py`` with ``-p conformance_plugin`` into a pytest run of TRL's test files
(fetched to a temporary directory; nothing is written into this repository). It

* redirects ``from_pretrained`` of models, configs, tokenizers, processors and generation configs from the hub ids
  TRL's tests use (``trl-internal-testing/tiny-<Arch>For<Head>...``, ``Qwen/Qwen2.5-0.5B-Instruct``) to local tiny
  stand-ins of the same architecture and head (``fastft.offline`` configs: 2 layers, hidden 64, vocab 384; Qwen ids
  get TRL's own Qwen 2.5 chat template), built once per run under ``$FASTFT_CONFORMANCE_CACHE``;
* replaces ``datasets.load_dataset("trl-internal-testing/zen", <config>)`` with in-memory datasets of the same
  configs, columns and splits (train/test), streaming included;
* when ``$FASTFT_CONFORMANCE_PATCH`` names a PatchFastRL row, applies ``fastft.PatchFastRL(<row>)`` before each test
  and ``fastft.unpatch()`` after it (unset: fastft is never imported);
* fails a test that runs longer than ``$FASTFT_CONFORMANCE_TEST_TIMEOUT`` seconds (SIGALRM; default 300).

Ids with no stand-in (vision-language models, architectures fastft.offline has no tiny config for, other datasets)
are left to the hub, which is unreachable offline: those tests fail both ways and are reported as such.
"""

from __future__ import annotations

import functools
import os
import re
import signal
from typing import Any

import pytest

_ARCH = {
    "Qwen2": "qwen2",
    "Qwen3": "qwen3",
    "Qwen3Moe": "qwen3_moe",
    "Llama": "llama",
    "Mistral": "mistral",
    "Mixtral": "mixtral",
    "GptOss": "gpt_oss",
    "Olmo2": "olmo2",
    "Olmo3": "olmo3",
    "Gemma": "gemma",
    "Gemma2": "gemma2",
    "Glm4": "glm4",
    "Phi3": "phi3",
    "Granite": "granite",
    "SmolLM3": "smollm3",
}
_TINY = re.compile(
    r"^trl-internal-testing/tiny-(?P<arch>[A-Za-z0-9]+?)For(?P<head>CausalLM|SequenceClassification)"
    r"(?:-[0-9.]+)?$"
)
_ALIASES = {"Qwen/Qwen2.5-0.5B-Instruct": ("qwen2", "CausalLM")}


def _cache_dir() -> str:
    path = os.environ.get("FASTFT_CONFORMANCE_CACHE") or os.path.join(os.getcwd(), ".stand_ins")
    os.makedirs(path, exist_ok=True)
    return path


def _parse(repo_id: str) -> tuple[str, str] | None:
    if repo_id in _ALIASES:
        return _ALIASES[repo_id]
    match = _TINY.match(repo_id)
    if match is None or match["arch"] not in _ARCH:
        return None
    from fastft.offline import TINY_ARCHITECTURES

    model_type = _ARCH[match["arch"]]
    return (model_type, match["head"]) if model_type in TINY_ARCHITECTURES else None


@functools.cache
def stand_in(repo_id: Any) -> str | None:
    """The local directory standing in for hub id ``repo_id`` (built on first use), or None when there is none."""
    if not isinstance(repo_id, str) or os.path.isdir(repo_id):
        return None
    parsed = _parse(repo_id)
    if parsed is None:
        return None
    model_type, head = parsed
    directory = os.path.join(_cache_dir(), repo_id.replace("/", "--"))
    if os.path.exists(os.path.join(directory, "config.json")):
        return directory
    import torch
    import transformers

    from fastft.offline import build_tokenizer, tiny_config

    tokenizer = build_tokenizer()
    if model_type.startswith("qwen"):  # TRL recognizes its own template (assistant masks, tool calls)
        import trl

        template = os.path.join(os.path.dirname(trl.__file__), "chat_templates", "qwen2_5.jinja")
        with open(template) as f:
            tokenizer.chat_template = f.read()
    overrides = dict(
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id
    )
    if head == "SequenceClassification":
        overrides["num_labels"] = 1
    config = tiny_config(model_type, vocab_size=len(tokenizer), **overrides)
    auto = transformers.AutoModelForSequenceClassification if head != "CausalLM" else transformers.AutoModelForCausalLM
    torch.manual_seed(0)
    model = auto.from_config(config)
    tmp = directory + f".tmp{os.getpid()}"
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    os.replace(tmp, directory)
    return directory


def _redirect(cls: type, name: str = "from_pretrained") -> None:
    descriptor = cls.__dict__.get(name)
    func = getattr(descriptor, "__func__", None)
    if func is None or getattr(func, "_stand_in", False):
        return

    @functools.wraps(func)
    def from_pretrained(klass, *args, **kwargs):
        key = "pretrained_model_name_or_path"
        if args and stand_in(args[0]):
            args = (stand_in(args[0]), *args[1:])
        elif key in kwargs and stand_in(kwargs[key]):
            kwargs[key] = stand_in(kwargs[key])
        return func(klass, *args, **kwargs)

    from_pretrained._stand_in = True  # type: ignore[attr-defined]
    setattr(cls, name, classmethod(from_pretrained))


# ---------------------------------------------------------------------------------------------------------------------
# trl-internal-testing/zen stand-in: the same configs, columns and splits, tiny content
# ---------------------------------------------------------------------------------------------------------------------
_FACTS = [
    ("The sky is", " blue.", " green."),
    ("Two plus two is", " four.", " five."),
    ("Water boils at", " one hundred degrees.", " ten degrees."),
    ("The capital of France is", " Paris.", " Rome."),
    ("Cats like to", " sleep.", " bark."),
    ("The sun rises in the", " east.", " west."),
    ("Ice is", " cold.", " hot."),
    ("A week has", " seven days.", " nine days."),
    ("Bees make", " honey.", " milk."),
    ("The opposite of up is", " down.", " left."),
    ("Fish live in", " water.", " trees."),
    ("Snow is", " white.", " black."),
    ("A triangle has", " three sides.", " four sides."),
    ("Birds can", " fly.", " swim only."),
    ("The moon orbits the", " earth.", " sun directly."),
    ("Fire is", " hot.", " wet."),
    ("Grass is", " green.", " purple."),
    ("Dogs say", " woof.", " meow."),
    ("Ten minus one is", " nine.", " eight."),
]


def _user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def _assistant(text: str) -> list[dict[str, str]]:
    return [{"role": "assistant", "content": text.strip()}]


def _zen_rows(config: str) -> list[dict[str, Any]]:
    form, _, kind = config.partition("_")
    conversational = form == "conversational"
    rows = []
    for i, (prompt, good, bad) in enumerate(_FACTS):
        p = _user(prompt) if conversational else prompt
        g, b = (_assistant(good), _assistant(bad)) if conversational else (good, bad)
        if kind == "language_modeling":
            rows.append({"messages": _user(prompt) + _assistant(good)} if conversational else {"text": prompt + good})
        elif kind == "prompt_only":
            rows.append({"prompt": p})
        elif kind == "prompt_completion":
            rows.append({"prompt": p, "completion": g})
        elif kind == "preference":
            rows.append({"prompt": p, "chosen": g, "rejected": b})
        elif kind == "implicit_prompt_preference":
            rows.append({"chosen": p + g, "rejected": p + b})
        elif kind == "unpaired_preference":
            rows.append({"prompt": p, "completion": g if i % 2 == 0 else b, "label": i % 2 == 0})
        elif kind == "stepwise_supervision" and not conversational:
            rows.append({"prompt": prompt, "completions": [good, " So it is.", bad], "labels": [True, True, False]})
        else:
            raise ValueError(f"stand-in trl-internal-testing/zen has no config {config!r}")
    return rows


def _zen(config: str, split: str | None = None, streaming: bool = False) -> Any:
    from datasets import Dataset, DatasetDict, IterableDatasetDict

    rows = _zen_rows(config)
    splits = {"train": Dataset.from_list(rows[:17]), "test": Dataset.from_list(rows[17:])}
    if streaming:
        splits = {name: data.to_iterable_dataset() for name, data in splits.items()}
    if split is None:
        return (IterableDatasetDict if streaming else DatasetDict)(splits)
    return splits[split]


def _install_stand_ins() -> None:
    import datasets
    import transformers
    from transformers import modeling_utils
    from transformers.models.auto import auto_factory

    for cls in (
        modeling_utils.PreTrainedModel,
        auto_factory._BaseAutoModelClass,
        transformers.AutoConfig,
        transformers.PretrainedConfig,
        transformers.AutoTokenizer,
        transformers.PreTrainedTokenizerBase,
        transformers.AutoProcessor,
        transformers.ProcessorMixin,
        transformers.GenerationConfig,
    ):
        _redirect(cls)
    original = datasets.load_dataset

    @functools.wraps(original)
    def load_dataset(path, name=None, *args, split=None, streaming=False, **kwargs):
        if path == "trl-internal-testing/zen" and not args:
            return _zen(name, split, streaming)
        return original(path, name, *args, split=split, streaming=streaming, **kwargs)

    datasets.load_dataset = load_dataset


def pytest_configure(config: pytest.Config) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # ids with no stand-in fail at once instead of retrying
    _install_stand_ins()


@pytest.fixture(autouse=True)
def _fastft_patch():
    row = os.environ.get("FASTFT_CONFORMANCE_PATCH")
    if not row:
        yield
        return
    import fastft

    result = fastft.PatchFastRL(row)
    assert all(result.values()), f"PatchFastRL({row!r}) did not patch: {result}"
    try:
        yield
    finally:
        fastft.unpatch()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item: pytest.Item):
    seconds = int(os.environ.get("FASTFT_CONFORMANCE_TEST_TIMEOUT", "300"))

    def expire(signum, frame):
        raise TimeoutError(f"test ran longer than {seconds} s (FASTFT_CONFORMANCE_TEST_TIMEOUT)")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
