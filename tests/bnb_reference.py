"""NF4 oracles, and a PEFT + bitsandbytes baseline, that give the same answer on every CPU.

Why: bitsandbytes 0.50.2's native CPU ``dequantize_4bit`` takes an AVX-512 path on CPUs that have AVX-512F, and that
path picks the wrong absmax when a row of the weight does not hold whole blocks (last dimension a multiple of 16 but not
of the blocksize: a [64, 96] weight at blocksize 64 comes back with max error 0.20 against NF4's 0.045; see
docs/upstream/bitsandbytes-cpu-dequantize-4bit.md). With bitsandbytes as the oracle, or PEFT + bitsandbytes as the
unfused baseline, a test passed or failed by the CPU it ran on. So:

* :func:`dequantize_nf4_reference`: the NF4 format written out plainly, from the format alone;
* :func:`dequantize_nf4_bnb_default`: bitsandbytes' generic ``default`` backend (pure torch), called directly.
  The two are independent; tests/kernels/test_nf4.py checks that they agree bit for bit and that they reconstruct the
  original weight within NF4's quantization error.
* :func:`bitsandbytes_default_cpu_kernels`: while active, bitsandbytes' own entry points (``dequantize_4bit``,
  ``matmul_4bit``, ``Linear4bit``, PEFT's ``Linear4bit``) dequantize on CPU with that default backend instead of the
  native kernels; the ``bnb_default_cpu_kernels`` fixture (tests/conftest.py) wraps it around a test.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections import Counter
from collections.abc import Iterator
from typing import Any

import torch

from fastft.memory.standins.linear4bit import NF4_LEVELS

#: NF4's 16 levels as fp32 (fastft.memory.standins.linear4bit.NF4_LEVELS: the format's constants, checked against
#: bitsandbytes' own table in tests/kernels/test_nf4.py).
NF4_CODE = torch.tensor(NF4_LEVELS, dtype=torch.float32)


# ----------------------------------------------------------------------------------------------------------------
# Oracle 1: the format
# ----------------------------------------------------------------------------------------------------------------
def nf4_nibbles(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """int64 [numel]: the 4-bit code of each flat element. Two per byte, the first of each pair in the HIGH nibble;
    an odd numel leaves the last low nibble unused. ``packed`` may be stored in any dtype (quant_storage)."""
    data = packed.contiguous().view(torch.uint8).reshape(-1)
    nibbles = torch.empty(2 * data.numel(), dtype=torch.int64)
    nibbles[0::2] = data >> 4
    nibbles[1::2] = data & 0xF
    return nibbles[:numel]


def block_scales(quant_state: Any) -> torch.Tensor:
    """fp32 [n_blocks]: the absmax of each ``blocksize`` run of flat elements.

    Plain: stored as is. Nested (double quantization): uint8 codes q, one fp32 absmax2 per ``state2.blocksize`` (256)
    codes, the 256-entry ``state2.code`` map and an fp32 offset (the mean absmax); absmax = code2[q] * absmax2 + offset,
    a product and a sum, each rounded to fp32.
    """
    if not quant_state.nested:
        return quant_state.absmax.float()
    state2 = quant_state.state2
    q = quant_state.absmax.long()
    group = torch.arange(q.numel()) // state2.blocksize
    return state2.code.float()[q] * state2.absmax.float()[group] + quant_state.offset.float()


def dequantize_nf4_reference(packed: torch.Tensor, quant_state: Any) -> torch.Tensor:
    """[*quant_state.shape] in quant_state.dtype: flat element i is NF4_CODE[nibble i] * absmax[i // blocksize], the
    product in fp32, then one rounding to the output dtype."""
    numel = math.prod(quant_state.shape)
    block = torch.arange(numel) // quant_state.blocksize
    value = NF4_CODE[nf4_nibbles(packed, numel)] * block_scales(quant_state)[block]
    return value.to(quant_state.dtype).reshape(quant_state.shape)


# ----------------------------------------------------------------------------------------------------------------
# Oracle 2: bitsandbytes' generic backend
# ----------------------------------------------------------------------------------------------------------------
def _eager(fn):
    # bitsandbytes wraps its default kernels in torch.compile (functools.wraps keeps the function as __wrapped__).
    # Eager runs the same torch ops without inductor's per-ISA generated C++ -- and without a ~20 s compile per shape.
    return getattr(fn, "__wrapped__", fn)


def _dequantize_4bit_default(
    A: torch.Tensor, absmax: torch.Tensor, blocksize: int, quant_type: str, shape: list[int], dtype: torch.dtype
) -> torch.Tensor:
    """bitsandbytes::dequantize_4bit exactly as bitsandbytes/backends/default/ops.py implements it, eager."""
    from bitsandbytes.backends.default import ops as default_ops
    from bitsandbytes.backends.utils import _get_4bit_code

    if A.dtype != torch.uint8:
        A = A.view(torch.uint8)
    code = _get_4bit_code(quant_type, A.device)
    return _eager(default_ops._dequantize_4bit_compute)(A.reshape(-1), absmax, code, blocksize, shape, dtype)


def _dequantize_blockwise_default(
    A: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int, dtype: torch.dtype
) -> torch.Tensor:
    """bitsandbytes::dequantize_blockwise (the nested absmax) as the default backend implements it, eager."""
    from bitsandbytes.backends.default import ops as default_ops

    return _eager(default_ops._dequantize_blockwise_compute)(A.reshape(-1), absmax, code, blocksize, dtype).reshape(A.shape)


def dequantize_nf4_bnb_default(packed: torch.Tensor, quant_state: Any) -> torch.Tensor:
    """What ``bitsandbytes.functional.dequantize_4bit`` computes, through bitsandbytes' default backend only."""
    absmax = quant_state.absmax
    if quant_state.nested:
        state2 = quant_state.state2
        absmax = _dequantize_blockwise_default(absmax, state2.absmax, state2.code, state2.blocksize, torch.float32)
        absmax = absmax + quant_state.offset
    return _dequantize_4bit_default(
        packed, absmax.float(), quant_state.blocksize, quant_state.quant_type, list(quant_state.shape), quant_state.dtype
    )


# ----------------------------------------------------------------------------------------------------------------
# A PEFT + bitsandbytes baseline that is right on every CPU
# ----------------------------------------------------------------------------------------------------------------
# Calls of the routed kernels, so a test can check that its baseline really went through them.
routed_calls: Counter[str] = Counter()


def _routed_dequantize_4bit(*args):
    routed_calls["dequantize_4bit"] += 1
    return _dequantize_4bit_default(*args)


def _routed_dequantize_blockwise(*args):
    routed_calls["dequantize_blockwise"] += 1
    return _dequantize_blockwise_default(*args)


@contextlib.contextmanager
def bitsandbytes_default_cpu_kernels() -> Iterator[None]:
    """Until exit, bitsandbytes dequantizes on CPU with its generic backend, the same on every CPU.

    bitsandbytes 0.50.2 registers native CPU kernels (torch.library, dispatch key CPU) that win over its default
    backend (CompositeExplicitAutograd) for CPU tensors:
      * ``dequantize_4bit``: AVX-512 path wrong for rows that do not hold whole blocks (this module's docstring);
        routed here. MatMul4Bit's forward and backward, gemm_4bit and PEFT's merge all dequantize through it.
      * ``dequantize_blockwise`` (the nested absmax): a plain loop (NEON on ARM), right today; routed too, so no native
        dequantization is left in a baseline.
      * ``gemv_4bit``: only reached through ``Linear4bit``'s inference repacking, which on AVX512-BF16 CPUs (eval
        mode, input without grad) rewrites the weight into another layout, computes in bf16 whatever the compute
        dtype, and fails for out_features % 32 or in_features % blocksize != 0. Not routed (the default kernel would
        misread a repacked weight): instead ``Linear4bit`` layers built while this is active never repack.
      * ``quantize_blockwise`` (nested absmax codes), ``int8_linear_matmul`` (torch._int_mm, integer-exact) and the
        optimizer updates are left native: they make test data or exact integers, not a baseline's dequantization.
    The registrations live in a private torch.library.Library; destroying it on exit drops them and the dispatcher
    goes back to bitsandbytes' own CPU kernels.
    """
    import bitsandbytes.nn.modules as bnb_modules

    lib = torch.library.Library("bitsandbytes", "FRAGMENT")
    has_avx512bf16 = bnb_modules.has_avx512bf16
    try:
        with warnings.catch_warnings():  # overriding bitsandbytes' CPU kernel is the point
            warnings.filterwarnings("ignore", message="(?s).*Overriding a previously registered kernel")
            torch.library.register_kernel("bitsandbytes::dequantize_4bit", "cpu", _routed_dequantize_4bit, lib=lib)
            torch.library.register_kernel("bitsandbytes::dequantize_blockwise", "cpu", _routed_dequantize_blockwise, lib=lib)
        bnb_modules.has_avx512bf16 = lambda: False  # read by Linear4bit.__init__ (support_avx512bf16_for_cpu)
        yield
    finally:
        bnb_modules.has_avx512bf16 = has_avx512bf16
        lib._destroy()
