"""What ``fastft train`` would call for ``export: {gguf: q4_k_m}`` (wiring into fastft/train is the config owner's)."""

from __future__ import annotations

import os
from typing import Any

from fastft.export.errors import ExportError


def check_export_section(section: Any) -> dict[str, str]:
    """Validate a config's ``export:`` mapping at load time (before training): ``{"gguf": "<quantization>"}``."""
    from fastft.export.quantize import resolve_quantization

    if section is None:
        return {}
    if not isinstance(section, dict) or set(section) - {"gguf"}:
        raise ExportError(f"export must be a mapping with the key 'gguf', got {section!r}")
    return {"gguf": resolve_quantization(section["gguf"]).name} if "gguf" in section else {}


def export_after_training(model: Any, tokenizer: Any, output_dir: str, section: dict[str, str]) -> list[str]:
    """Run the exports a checked ``export:`` section asks for; returns the written paths."""
    from fastft.export.gguf_file import save_gguf

    if "gguf" not in section:
        return []
    return [save_gguf(model, os.path.join(output_dir, "gguf"), tokenizer, section["gguf"])]
