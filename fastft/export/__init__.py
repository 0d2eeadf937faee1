"""GGUF export for llama.cpp / Ollama / LM Studio: ``model.save_pretrained_gguf(dir, tokenizer, "q8_0")``."""

from fastft.export.architectures import ARCHITECTURES
from fastft.export.errors import ExportError
from fastft.export.gguf_file import save_gguf
from fastft.export.quantize import QUANTIZATIONS

__all__ = ["ARCHITECTURES", "ExportError", "QUANTIZATIONS", "save_gguf"]
