"""The model ``fastft plan`` plans for: its transformers config (a local directory, a config.json, or a config shipped
in ``fastft/data/configs/``, read offline), whether fastft's architecture table patches it, and the LoRA target
modules FastModel would give it."""

from __future__ import annotations

import difflib
import json
from pathlib import Path
from typing import Any

from fastft.memory.step_model import LINEAR_NAMES, linear_names

#: The configs fastft plan ships (offline: no hub call to plan a known model).
CONFIG_DIR = Path(__file__).resolve().parent.parent / "data" / "configs"


def known_models() -> list[str]:
    """The names of the configs shipped in ``CONFIG_DIR`` (their provenance: ``SOURCES.md`` there)."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.json"))


def load_config(model: str) -> Any:
    """A transformers config from a local model dir, a config.json path, or a shipped name (case-insensitive;
    "meta-llama/Llama-3.1-8B" and "Llama-3.1-8B" both work). Offline."""
    from transformers import CONFIG_MAPPING

    path = Path(model).expanduser()
    if path.is_dir() and (path / "config.json").is_file():
        path = path / "config.json"
    if path.is_file():
        data = json.loads(path.read_text())
    else:
        names = {name.lower(): name for name in known_models()}
        aliases = {n.removesuffix("-v0.3"): n for n in names}  # "mistral-7b" -> "mistral-7b-v0.3"
        key = _shipped_name(model, names, aliases)
        if key is None:
            raise ValueError(
                f"unknown model {model!r}: not a local directory with config.json, not a config.json "
                f"file, and not one of the known names: {', '.join(known_models())}"
            )
        data = json.loads((CONFIG_DIR / f"{names[key]}.json").read_text())
    model_type = data.get("model_type")
    if model_type not in CONFIG_MAPPING:
        raise ValueError(f"config for {model!r} has model_type {model_type!r}, which transformers does not know")
    return CONFIG_MAPPING[model_type].from_dict(data)


#: Suffixes/prefixes of hub names whose architecture is the shipped base model's (same sizes, same memory).
_VARIANT_SUFFIXES = ("-bnb-4bit", "-unsloth", "-v0.3", "-instruct", "-it", "-base", "-chat")


def _shipped_name(model: str, names: dict[str, str], aliases: dict[str, str]) -> str | None:
    """ "meta-llama/Meta-Llama-3.1-8B-Instruct", "unsloth/llama-3.2-1b-bnb-4bit", "google/gemma-2-9b-it" -> the shipped
    base config's key (instruct/chat/quantized repos share the base architecture)."""
    wanted = model.split("/")[-1].lower()
    for _ in range(3):
        if wanted in names:
            return wanted
        if wanted in aliases:
            return aliases[wanted]
        stripped = wanted.removeprefix("meta-")
        for suffix in _VARIANT_SUFFIXES:
            stripped = stripped.removesuffix(suffix)
        if stripped == wanted:
            return None
        wanted = stripped
    return None


def unpatched_reason(config: Any) -> str | None:
    """None when fastft patches this architecture; else why it is modeled UNPATCHED (``patch_model`` and the fused
    LoRA act only on rows of ``fastft.patches.architectures.ARCHITECTURES``; other models load as transformers
    wrote them)."""
    from fastft.patches.architectures import ARCHITECTURES

    model_type = getattr(config, "model_type", None)
    if model_type in ARCHITECTURES:
        return None
    return (
        f"model_type {model_type!r} is not in fastft's architecture table ({', '.join(ARCHITECTURES)}), so "
        "FastModel loads it without fused kernels, fused LoRA or the fused loss"
    )


def _linear_layer_names(config: Any) -> list[str]:
    """The linear layers' names in the decoder layers (the model built on meta: no memory, no weights)."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return linear_names(model)


def lora_targets(config: Any, requested: list[str] | None) -> tuple[tuple[str, ...], str | None]:
    """(LoRA target module names, a note saying where they came from or None). FastModel.get_peft_model's default
    is every usual projection present (LINEAR_NAMES); a model that has none of them (GPT-2: c_attn, c_proj, c_fc) is
    modeled with PEFT's own default for its model_type, and the note says FastModel needs target_modules for it."""
    if requested is None and unpatched_reason(config) is None:
        return LINEAR_NAMES, None  # every table architecture has all of them
    present = _linear_layer_names(config)
    if requested is not None:
        unknown = [n for n in requested if n not in present]
        if unknown:
            hints = "".join(
                f"; did you mean {close[0]!r} for {n!r}?"
                for n in unknown
                if (close := difflib.get_close_matches(n, present, n=1, cutoff=0.6))
            )
            raise ValueError(
                f"--target-modules: {', '.join(map(repr, unknown))} not among this model's linear "
                f"layers ({', '.join(present)}){hints}"
            )
        return tuple(requested), None
    usual = tuple(n for n in LINEAR_NAMES if n in present)
    if usual:
        return usual, None
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as PEFT_DEFAULTS

    default = PEFT_DEFAULTS.get(config.model_type)
    if default and set(default) <= set(present):
        return tuple(default), (
            f"{', '.join(default)} (PEFT's default for {config.model_type}: none of "
            f"{', '.join(LINEAR_NAMES)} exist here, so FastModel.get_peft_model needs "
            f"target_modules={list(default)!r} for this model; --target-modules to change)"
        )
    raise ValueError(
        f"none of the usual projections ({', '.join(LINEAR_NAMES)}) exist in this "
        f"{config.model_type} model and PEFT has no default for it; pass --target-modules, "
        f"one or more of: {', '.join(present)}"
    )
