"""Export a saved LoRA run to GGUF without the training script: ``fastft export --adapter DIR --gguf q8_0``."""

from __future__ import annotations

import argparse
import json
import os
import sys

from fastft.export.errors import ExportError


def export_adapter(adapter_dir: str, quantization: str, output_dir: str | None = None, base_model: str | None = None) -> str:
    """Load ``adapter_dir`` (a PEFT LoRA save) on its base (local path from adapter_config.json, or ``base_model``),
    merge and write GGUF into ``output_dir`` (default ``adapter_dir/gguf``). Returns the GGUF path."""
    from fastft.export.quantize import needs_llama_cpp, require_llama_cpp, resolve_quantization

    quant = resolve_quantization(quantization)  # bad names fail before any model is loaded
    if needs_llama_cpp(quant):
        require_llama_cpp()
    config_path = os.path.join(adapter_dir, "adapter_config.json")
    if not os.path.isfile(config_path):
        raise ExportError(f"{adapter_dir!r} is not a saved LoRA adapter (no adapter_config.json)")
    with open(config_path, encoding="utf-8") as fh:
        base = base_model or json.load(fh).get("base_model_name_or_path")
    if not base or not os.path.isdir(base):
        raise ExportError(f"the adapter's base model {base!r} is not a local directory; pass --base PATH")
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fastft.export.gguf_file import save_gguf

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype="float32"), adapter_dir)
    has_tokenizer = os.path.isfile(os.path.join(adapter_dir, "tokenizer.json"))
    tokenizer = AutoTokenizer.from_pretrained(adapter_dir if has_tokenizer else base)
    return save_gguf(model, output_dir or os.path.join(adapter_dir, "gguf"), tokenizer, quant.name)


def _run(args: argparse.Namespace) -> int:
    try:
        path = export_adapter(args.adapter, args.gguf, args.output_dir, args.base)
    except ExportError as exc:
        print(f"fastft: {exc}", file=sys.stderr)
        return 2
    print(f"fastft: wrote {path}")
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("export", help="export a saved LoRA run (merged) to GGUF for llama.cpp / Ollama")
    p.add_argument("--adapter", required=True, help="the directory of a saved LoRA adapter")
    p.add_argument("--gguf", required=True, metavar="QUANT", help="f16, bf16, q8_0, q4_0, ... or a k-quant (q4_k_m)")
    p.add_argument("--output-dir", default=None, help="where to write (default: ADAPTER/gguf)")
    p.add_argument("--base", default=None, help="the base model directory (default: from adapter_config.json)")
    p.set_defaults(func=_run)
