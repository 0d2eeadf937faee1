"""``save_pretrained_gguf``: a FastModel (LoRA adapters merged in fp32 from the dequantized base) as one GGUF file
plus an Ollama Modelfile. Every check (quantization name, architecture row, config, tokenizer, k-quant backend,
tensor names) runs before the first byte is written; files are written under temporary names and renamed at the end.
"""

from __future__ import annotations

import logging
import os
import re
from typing import Any

import torch

from fastft.export.architectures import architecture_metadata, architecture_row, extra_tensors
from fastft.export.atomic import atomic_path, write_text_atomic
from fastft.export.errors import ExportError
from fastft.export.modelfile import modelfile_text
from fastft.export.quantize import (
    encode_tensor,
    needs_llama_cpp,
    quantize_with_llama_cpp,
    require_llama_cpp,
    resolve_quantization,
    tensor_type_for,
)
from fastft.export.tensor_names import gguf_tensors
from fastft.export.tokenizer import gguf_vocab, write_vocab
from fastft.merge import merged_state_dict
from fastft.patches.modes import base_model

logger = logging.getLogger("fastft")


def _write_gguf(
    path: str,
    arch: str,
    name: str,
    file_type: str,
    metadata: dict[str, Any],
    vocab,
    tensors: list[tuple[str, str, str, Any]],
    generation: dict[str, Any],
) -> None:
    import gguf

    writer = gguf.GGUFWriter(path, arch)
    writer.add_name(name)
    writer.add_file_type(int(gguf.LlamaFileType[file_type]))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for key, value in metadata.items():
        if isinstance(value, list):
            writer.add_array(key, value)
        elif isinstance(value, bool):
            writer.add_bool(key, value)
        elif isinstance(value, int):
            writer.add_uint32(key, value)
        elif isinstance(value, float):
            writer.add_float32(key, value)
        else:
            writer.add_string(key, str(value))
    for key, add in (
        ("temperature", writer.add_sampling_temp),
        ("top_p", writer.add_sampling_top_p),
        ("top_k", writer.add_sampling_top_k),
        ("min_p", writer.add_sampling_min_p),
        ("repetition_penalty", writer.add_sampling_penalty_repeat),
    ):
        if generation.get(key) is not None:
            add(generation[key])
    write_vocab(writer, vocab)
    for gguf_name, _hf, ttype, data in tensors:
        writer.add_tensor(gguf_name, data, raw_dtype=gguf.GGMLQuantizationType[ttype])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _general_name(name: str, tokens: list[str]) -> str:
    """``general.name``. llama.cpp keys token attributes on it: a name containing "phi3"/"phi-3" makes it look up
    ``</s> <unk> <s> <|endoftext|>`` and fail to load a vocabulary without them, so such a name is replaced."""
    if not name or (re.search(r"phi-?3", name.lower()) and not {"</s>", "<unk>", "<s>", "<|endoftext|>"} <= set(tokens)):
        if name:
            logger.info("fastft: GGUF general.name %r replaced: llama.cpp expects Phi-3's special tokens for it", name)
        return "fastft-export"
    return name


def _generation_defaults(model: Any) -> dict[str, Any]:
    gen = getattr(model, "generation_config", None)
    if gen is None or not getattr(gen, "do_sample", False):
        return {}
    # Only when sampling is the model's default: llama.cpp and Ollama sample unless told otherwise.
    return {k: getattr(gen, k, None) for k in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")}


def save_gguf(
    model: torch.nn.Module,
    save_directory: str,
    tokenizer: Any,
    quantization: str = "q8_0",
    file_name: str | None = None,
    modelfile: bool = True,
) -> str:
    """Write ``model`` (merged) as ``save_directory/<file_name>`` in GGUF; returns the GGUF file's path.

    ``quantization``: one of ``fastft.export.QUANTIZATIONS`` (f16, bf16, q8_0, ... written directly; k-quants such
    as q4_k_m through llama.cpp's quantizer, ``fastft[gguf]``). Weights are merged in fp32 and quantized per tensor:
    1-D tensors stay F32, matrices whose rows do not hold whole blocks fall back to F16 (logged by name).
    """
    if tokenizer is None:
        raise ExportError("save_pretrained_gguf needs the tokenizer: a GGUF file carries its vocabulary")
    quant = resolve_quantization(quantization)
    base = base_model(model)
    config = base.config
    row = architecture_row(getattr(config, "model_type", None))
    metadata = architecture_metadata(row, config)
    vocab = gguf_vocab(tokenizer, int(config.vocab_size))
    if needs_llama_cpp(quant):
        require_llama_cpp()
    state = merged_state_dict(model, torch.float32)
    named = gguf_tensors(row, config, state) + [(n, n, t) for n, t in extra_tensors(row, config)]
    staged = "F16" if needs_llama_cpp(quant) else None
    del state  # the fp32 tensors live in ``named`` only, and each is dropped once encoded (peak: one fp32 copy)
    tensors, fallbacks = [], []
    while named:
        gguf_name, hf_name, data = named.pop(0)
        # F32 as llama.cpp's converter writes them: 1-D tensors, biases (llama.cpp adds gpt-oss's 2-D expert biases
        # with an F32-only op) and MoE routers (ffn_gate_inp: a rounded router logit can flip the chosen experts)
        vector = data.dim() <= 1 or gguf_name.endswith(".bias") or ".ffn_gate_inp." in gguf_name
        if vector:
            ttype = "F32"
        else:
            ttype = tensor_type_for(quant, hf_name, tuple(data.shape)) if staged is None else staged
        if quant.tensor_type not in (None, "F32") and not vector and ttype != quant.tensor_type:
            fallbacks.append(gguf_name)
        tensors.append((gguf_name, hf_name, ttype, encode_tensor(data.detach().numpy(), ttype)))
    if fallbacks:
        logger.info(
            "fastft: GGUF %s: %d tensors whose rows do not hold whole blocks written as F16: %s",
            quant.name,
            len(fallbacks),
            ", ".join(fallbacks),
        )
    # Not forced to contain "mistral": transformers' GGUF reader would then look for a gguf-py arch "mistral",
    # which gguf 0.19 no longer has; llama.cpp runs Mistral as its llama arch either way.
    name = _general_name(os.path.basename(str(getattr(config, "_name_or_path", "") or "")), vocab.tokens)
    generation = _generation_defaults(base)

    file_name = file_name or f"model.{quant.name.upper()}.gguf"
    os.makedirs(save_directory, exist_ok=True)
    final = os.path.join(save_directory, file_name)
    with atomic_path(final) as temp:
        if staged is None:
            _write_gguf(temp, row.gguf_arch, name, quant.file_type, metadata, vocab, tensors, generation)
            logger.info("fastft: wrote %s (%s, written directly by the gguf package)", final, quant.name)
        else:
            staging = temp + ".f16"  # llama.cpp quantizes from a 16-bit file; it never takes the final name
            try:
                _write_gguf(staging, row.gguf_arch, name, "MOSTLY_F16", metadata, vocab, tensors, generation)
                quantize_with_llama_cpp(staging, temp, quant)
            finally:
                if os.path.exists(staging):
                    os.remove(staging)
            logger.info("fastft: wrote %s (%s, by llama.cpp's quantizer from an F16 file)", final, quant.name)
    if modelfile:
        eos = tokenizer.convert_ids_to_tokens(vocab.special_ids["eos"]) if "eos" in vocab.special_ids else None
        write_text_atomic(
            os.path.join(save_directory, "Modelfile"), modelfile_text(final, vocab.chat_template, eos, generation)
        )
    return final
