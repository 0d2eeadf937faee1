"""Memory sizes and token counts as ``fastft plan`` reads and prints them: a size needs its unit ("16" is refused:
16 bytes is never what was meant, and GB and GiB differ by 7%), a GPU name stands for its memory, a token count takes
K/M/B/T suffixes."""

from __future__ import annotations

import difflib
import re

from fastft.memory import speed_model

#: Unit suffix (lower case) -> bytes; GB is 10^9, GiB 2^30; the bare "" is only accepted for 0.
_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
    "k": 10**3,
    "m": 10**6,
    "g": 10**9,
}


def parse_size(text: str, flag: str | None = None) -> int:
    """ "16 GB" -> 16e9, "16GiB" -> 16 * 2**30, "16000MB" -> 16e9 (GB = 1e9 bytes, GiB = 2**30); bytes as int.

    A number needs its unit ("16" is refused: 16 bytes is never what was meant, and GB vs GiB is 7% apart); only 0
    may stand alone. Bytes are written "B". ``flag`` names the option in the error.
    """
    where = f"{flag} {text}: " if flag else ""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    if not match or match.group(2).lower() not in _UNITS:
        raise ValueError(
            f"{where}cannot parse memory size {text!r}: use a number and a unit, e.g. '16GB', '16 GiB', "
            "'16000MB' (GB = 10^9 bytes, GiB = 2^30 bytes)"
        )
    number, unit = match.group(1), match.group(2).lower()
    if not unit and float(number) != 0:
        raise ValueError(
            f"{where}{number} what? write {number}GB or {number}GiB (GB = 10^9 bytes, GiB = 2^30 bytes; {number}B for bytes)"
        )
    return int(float(number) * _UNITS[unit])


#: Memory as nvidia-smi reports it (MiB, before the CUDA context), for ``--gpu-memory T4`` and the like; the GPU
#: table (with its sources) is fastft.memory.speed_model.GPUS.
GPU_PRESETS = {name: gpu.memory_bytes for name, gpu in speed_model.GPUS.items()}


def parse_gpu_memory(text: str) -> int:
    """A size (see :func:`parse_size`) or a GPU name from ``GPU_PRESETS`` (case-insensitive)."""
    presets = {k.lower(): v for k, v in GPU_PRESETS.items()}
    key = str(text).strip().lower()
    if key in presets:
        return presets[key]
    if not re.match(r"\s*[0-9.]", str(text)):  # not a number: a GPU name, perhaps misspelt
        close = difflib.get_close_matches(key, list(presets), n=2, cutoff=0.5)
        names = dict(zip(presets, GPU_PRESETS))
        hint = f"did you mean {' or '.join(names[c] for c in close)}? " if close else ""
        raise ValueError(
            f"--gpu-memory {text}: cannot parse memory size {text!r} and it is not a known GPU; "
            f"{hint}known GPUs: {', '.join(GPU_PRESETS)}; sizes look like 16GB or 16GiB"
        )
    return parse_size(text, "--gpu-memory")


def parse_tokens(text: str) -> int:
    """ "1e9", "2B", "500M", "1,000,000", "250k" -> a token count (K/M/B/T = 10^3/10^6/10^9/10^12)."""
    match = re.fullmatch(r"\s*([0-9][0-9_,]*\.?[0-9]*(?:e[0-9]+)?)\s*([kmbt]?)\s*", str(text).lower())
    if not match:
        raise ValueError(f"--tokens {text}: not a token count; write e.g. 1000000, 1e9, 500M or 2B")
    value = (
        float(match.group(1).replace(",", "").replace("_", ""))
        * {"": 1, "k": 1e3, "m": 1e6, "b": 1e9, "t": 1e12}[match.group(2)]
    )
    if value < 1:
        raise ValueError(f"--tokens {text}: must be at least 1 token")
    return int(value)


def format_bytes(n: int | float) -> str:
    """Decimal GB from 0.1 GB up, MB below (the units of every figure fastft plan prints)."""
    return f"{n / 1e9:.2f} GB" if abs(n) >= 10**8 else f"{n / 1e6:.2f} MB"
