"""Quantization names for GGUF export, and which tool writes each.

Two kinds: types the ``gguf`` package quantizes itself in Python (f32, f16, bf16, q8_0, q4_0, q4_1, q5_0, q5_1),
written directly tensor by tensor; and llama.cpp's k-quants (q4_k_m, q5_k_m, q6_k, ...), whose mixed per-tensor
recipe only llama.cpp implements, so they go through its quantizer (``llama_model_quantize`` from llama-cpp-python,
the optional extra ``fastft[gguf]``) applied to a 16-bit file written first.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass

import numpy as np

from fastft.export.errors import ExportError

#: Installing the k-quant backend: named in every error about it.
KQUANT_EXTRA = "pip install 'fastft[gguf]'  (llama-cpp-python, which compiles llama.cpp)"


@dataclass(frozen=True)
class Quantization:
    name: str  # the user-facing name, lowercase ("q4_k_m")
    file_type: str  # gguf.LlamaFileType member name ("MOSTLY_Q4_K_M")
    tensor_type: str | None  # gguf.GGMLQuantizationType member for direct writes; None: llama.cpp's quantizer
    block_elements: int = 1  # a row must hold whole blocks to take tensor_type


_DIRECT = [
    Quantization("f32", "ALL_F32", "F32"),
    Quantization("f16", "MOSTLY_F16", "F16"),
    Quantization("bf16", "MOSTLY_BF16", "BF16"),
    Quantization("q8_0", "MOSTLY_Q8_0", "Q8_0", 32),
    Quantization("q4_0", "MOSTLY_Q4_0", "Q4_0", 32),
    Quantization("q4_1", "MOSTLY_Q4_1", "Q4_1", 32),
    Quantization("q5_0", "MOSTLY_Q5_0", "Q5_0", 32),
    Quantization("q5_1", "MOSTLY_Q5_1", "Q5_1", 32),
]
_LLAMA_CPP = [
    Quantization(name, "MOSTLY_" + name.upper(), None)
    for name in ("q2_k", "q3_k_s", "q3_k_m", "q3_k_l", "q4_k_s", "q4_k_m", "q5_k_s", "q5_k_m", "q6_k")
]
QUANTIZATIONS: dict[str, Quantization] = {q.name: q for q in _DIRECT + _LLAMA_CPP}


def resolve_quantization(name: str) -> Quantization:
    """The :class:`Quantization` for ``name`` (case-insensitive); an :class:`ExportError` with did-you-mean if unknown."""
    if not isinstance(name, str):
        raise ExportError(f"quantization must be a string such as 'q8_0', got {type(name).__name__}")
    key = name.strip().lower().replace("-", "_")
    if key in QUANTIZATIONS:
        return QUANTIZATIONS[key]
    close = difflib.get_close_matches(key, list(QUANTIZATIONS), n=3, cutoff=0.5)
    hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    raise ExportError(f"unknown GGUF quantization {name!r}.{hint} Accepted: {', '.join(QUANTIZATIONS)}.")


def needs_llama_cpp(quant: Quantization) -> bool:
    return quant.tensor_type is None


def require_llama_cpp():
    """The ``llama_cpp`` module, or an :class:`ExportError` naming the extra to install (raised before any write)."""
    try:
        import llama_cpp
    except ImportError as exc:
        raise ExportError(
            f"k-quants are made by llama.cpp's own quantizer, and llama-cpp-python is not installed "
            f"({exc}). Install it with: {KQUANT_EXTRA}; or pick a type written directly: "
            f"{', '.join(q.name for q in _DIRECT)}."
        ) from exc
    return llama_cpp


def tensor_type_for(quant: Quantization, hf_name: str, shape: tuple[int, ...]) -> str:
    """The GGML type one tensor is written in, following llama.cpp's converter: 1-D tensors (norms, biases) stay
    F32; a matrix whose rows do not hold whole quantization blocks falls back to F16 (the caller logs which)."""
    if len(shape) <= 1:
        return "F32"
    if quant.block_elements > 1 and shape[-1] % quant.block_elements:
        return "F16"
    return quant.tensor_type or "F16"


def encode_tensor(data: np.ndarray, tensor_type: str) -> np.ndarray:
    """``data`` (fp32, any shape) in GGML type ``tensor_type``: a float array for F32/F16, packed bytes otherwise."""
    import gguf

    qtype = gguf.GGMLQuantizationType[tensor_type]
    return gguf.quants.quantize(np.ascontiguousarray(data, dtype=np.float32), qtype)


def quantize_with_llama_cpp(source: str, destination: str, quant: Quantization, threads: int = 0) -> None:
    """Run llama.cpp's quantizer (``llama_model_quantize``) from the 16-bit GGUF ``source`` to ``destination``."""
    import ctypes

    import gguf

    llama_cpp = require_llama_cpp()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = int(gguf.LlamaFileType[quant.file_type])
    params.nthread = threads  # 0: llama.cpp picks the number of hardware threads
    rc = llama_cpp.llama_model_quantize(source.encode(), destination.encode(), ctypes.byref(params))
    if rc != 0:
        raise ExportError(f"llama.cpp's quantizer failed (return code {rc}) making {quant.name} from {source}")
