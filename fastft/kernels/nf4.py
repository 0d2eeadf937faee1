"""NF4 dequantization in one pass, bit-for-bit equal to the NF4 format's own math (bitsandbytes' ``default`` backend).

Not bitsandbytes' native CPU kernel as the oracle: on AVX-512 CPUs bitsandbytes 0.50.2's native ``dequantize_4bit`` is
wrong when the last dimension is not a multiple of the blocksize (docs/upstream/bitsandbytes-cpu-dequantize-4bit.md).

QLoRA keeps frozen base weights as 4-bit NF4 codes and dequantizes them for every matmul, forward and backward. This
op does it in a single kernel, including the double-quantized ("nested") absmax, and can write into a reused buffer
so a fused LoRA layer does not allocate a fresh [out, in] weight per call.

Format (bitsandbytes 0.4x-0.50, read from its CPU/default backends)
    packed: the flattened weight, two 4-bit codes per byte, HIGH nibble first: element 2j is ``byte[j] >> 4``,
    element 2j+1 is ``byte[j] & 0xF``. Stored as [(numel+1)//2, 1] uint8 (``quant_storage`` may be another dtype of
    the same bytes; it is viewed as uint8).
    absmax: one scale per ``blocksize`` consecutive flat elements (blocksize in 32, 64, ..., 4096).
        plain:  fp32 [n_blocks];
        nested: uint8 codes q [n_blocks] with ``state2`` (fp32 ``state2.absmax`` per 256 codes, the 256-entry
                ``state2.code`` table) and fp32 ``offset``: absmax = code2[q] * absmax2[i // 256] + offset.
    value = code[nibble] * absmax   (fp32 product, then ONE rounding to quant_state.dtype).
All arithmetic is fp32 in the same order as bitsandbytes; the kernel is launched with FMA contraction disabled so the
nested ``code2 * absmax2 + offset`` is rounded twice on the GPU too, exactly as bitsandbytes does it.

Output: quant_state.shape in quant_state.dtype (fp32/bf16/fp16). No autograd: the weight is frozen.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from fastft.kernels._launch import TRITON_AVAILABLE, call_op, launch, use_triton

_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
_OUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_BLOCK = 1024  # output elements per program: 4 per thread at 8 warps, enough bytes in flight to be memory-bound


class NF4Parts(NamedTuple):
    """A quantized weight as the dequantization reads it (the module docstring's format): uint8 ``packed`` codes,
    ``absmax`` (fp32, or uint8 codes when nested), the fp32 16-entry ``code`` table, and for nested absmax only
    ``absmax2`` / ``code2`` / ``offset`` (fp32; None when plain); ``blocksize`` and ``blocksize2`` (1 when plain)."""

    packed: torch.Tensor
    absmax: torch.Tensor
    code: torch.Tensor
    absmax2: torch.Tensor | None
    code2: torch.Tensor | None
    offset: torch.Tensor | None
    blocksize: int
    blocksize2: int


#: NF4Parts as arguments of a custom op schema, in field order (both ops take the parts one by one).
_PARTS_SCHEMA = (
    "Tensor packed, Tensor absmax, Tensor code, Tensor? absmax2, Tensor? code2, Tensor? offset, SymInt blocksize, "
    "SymInt blocksize2"
)

if TRITON_AVAILABLE:
    import triton
    import triton.language as tl

    from fastft.kernels._tl_utils import cast_rne

    @triton.jit
    def _dequantize_nf4_kernel(
        OUT,
        PACKED,
        ABSMAX,
        CODE,
        ABSMAX2,
        CODE2,
        OFFSET,
        numel,
        blocksize,
        blocksize2,
        NESTED: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        pid = tl.program_id(0).to(tl.int64)
        idx = pid * BLOCK + tl.arange(0, BLOCK)  # int64: an 8B model's embedding has > 2**31 elements
        mask = idx < numel
        byte = tl.load(PACKED + idx // 2, mask=mask, other=0).to(tl.int32)
        # Even elements live in the high nibble (bitsandbytes packs the first element of each pair high).
        nibble = tl.where((idx % 2) == 0, byte >> 4, byte & 0xF)
        value = tl.load(CODE + nibble, mask=mask, other=0.0)
        block = idx // blocksize
        if NESTED:
            q = tl.load(ABSMAX + block, mask=mask, other=0).to(tl.int32)
            code2 = tl.load(CODE2 + q, mask=mask, other=0.0)
            scale = code2 * tl.load(ABSMAX2 + block // blocksize2, mask=mask, other=0.0)
            scale = scale + tl.load(OFFSET)
        else:
            scale = tl.load(ABSMAX + block, mask=mask, other=0.0)
        result = value * scale
        # bf16 rounds to nearest even on the bits: the interpreter's fp32->bf16 cast truncates, the GPU's rounds;
        # cast_rne gives torch's (and bitsandbytes') result on both.
        tl.store(OUT + idx, cast_rne(result, OUT.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------------------------
# Reference: the NF4 format written out plainly and bitsandbytes' pure-torch `default` backend are the oracles
# (tests/bnb_reference.py); this torch path is the same math in torch, used on plain CPU and checked bit for bit.
# ----------------------------------------------------------------------------------------------------------------
def _absmax_torch(q: NF4Parts) -> torch.Tensor:
    if q.absmax2 is None:
        return q.absmax.float()
    idx = torch.arange(q.absmax.numel(), device=q.absmax.device) // q.blocksize2
    return q.code2[q.absmax.long()] * q.absmax2[idx] + q.offset  # two fp32 roundings, as bitsandbytes


def _dequantize_torch(out: torch.Tensor, q: NF4Parts) -> None:
    numel = out.numel()
    flat = q.packed.reshape(-1)
    nibbles = torch.stack((flat >> 4, flat & 0xF), dim=1).reshape(-1)[:numel].long()
    scale = _absmax_torch(q)
    block = torch.arange(numel, device=out.device) // q.blocksize
    out.view(-1).copy_(q.code[nibbles] * scale[block])


def _dequantize_triton(out: torch.Tensor, q: NF4Parts) -> None:
    numel = out.numel()
    nested = q.absmax2 is not None
    dummy = q.code  # unused pointer arguments when not nested (the NESTED=False variant never loads them)
    launch(
        _dequantize_nf4_kernel,
        (triton.cdiv(numel, _BLOCK),),
        out,
        q.packed,
        q.absmax,
        q.code,
        q.absmax2 if nested else dummy,
        q.code2 if nested else dummy,
        q.offset if nested else dummy,
        numel,
        q.blocksize,
        q.blocksize2,
        NESTED=nested,
        BLOCK=_BLOCK,
        num_warps=8,
        enable_fp_fusion=False,
    )


# ----------------------------------------------------------------------------------------------------------------
# Custom ops (with fake impls, so torch.compile and the meta-tensor memory model can trace them); each takes the
# NF4Parts one by one (a schema cannot hold a tuple of mixed types).
# ----------------------------------------------------------------------------------------------------------------
def _dequantize_into(out: torch.Tensor, q: NF4Parts) -> None:
    if out.numel() == 0:
        return
    q = q._replace(packed=q.packed.reshape(-1))
    if use_triton("dequantize_nf4", q.packed):
        _dequantize_triton(out, q)
    else:
        _dequantize_torch(out, q)


@torch.library.custom_op(
    "fastft::dequantize_nf4_out", mutates_args=("out",), schema=f"(Tensor(a0!) out, {_PARTS_SCHEMA}) -> ()"
)
def dequantize_nf4_out(out: torch.Tensor, *parts: Any) -> None:
    """Write the dequantized weight into ``out`` (contiguous, quant_state.shape, quant_state.dtype)."""
    _dequantize_into(out, NF4Parts(*parts))


@dequantize_nf4_out.register_fake
def _(out, *parts):
    return None


@torch.library.custom_op(
    "fastft::dequantize_nf4", mutates_args=(), schema=f"({_PARTS_SCHEMA}, SymInt[] shape, ScalarType dtype) -> Tensor"
)
def dequantize_nf4_op(*parts_shape_dtype: Any) -> torch.Tensor:
    """A fresh [*shape] tensor of ``dtype`` from the NF4Parts."""
    *parts, shape, dtype = parts_shape_dtype
    out = torch.empty(shape, dtype=dtype, device=parts[0].device)
    _dequantize_into(out, NF4Parts(*parts))
    return out


@dequantize_nf4_op.register_fake
def _(packed, *parts_shape_dtype):
    *_, shape, dtype = parts_shape_dtype
    return torch.empty(shape, dtype=dtype, device=packed.device)


# ----------------------------------------------------------------------------------------------------------------
# Public function
# ----------------------------------------------------------------------------------------------------------------
def _unpack_state(packed: torch.Tensor, quant_state: Any) -> tuple[NF4Parts, list[int]]:
    if quant_state is None:
        raise ValueError("dequantize_nf4: quant_state is required")
    if quant_state.quant_type != "nf4":
        raise ValueError(f"dequantize_nf4: quant_type must be 'nf4', got {quant_state.quant_type!r}")
    if quant_state.blocksize not in _BLOCKSIZES:
        raise ValueError(f"dequantize_nf4: blocksize must be one of {_BLOCKSIZES}, got {quant_state.blocksize}")
    if quant_state.dtype not in _OUT_DTYPES:
        raise TypeError(f"dequantize_nf4: quant_state.dtype must be float32, float16 or bfloat16, got {quant_state.dtype}")
    if packed.dtype != torch.uint8:
        if not packed.is_contiguous():
            raise ValueError("dequantize_nf4: packed data stored in a non-uint8 quant_storage must be contiguous")
        packed = packed.view(torch.uint8)  # quant_storage=bf16 etc. (FSDP) holds the same bytes
    shape = list(quant_state.shape)
    numel = 1
    for s in shape:
        numel *= s
    if packed.numel() != (numel + 1) // 2:
        raise ValueError(
            f"dequantize_nf4: packed has {packed.numel()} bytes, quant_state.shape {tuple(shape)} needs {(numel + 1) // 2}"
        )
    n_blocks = -(-numel // quant_state.blocksize)
    if quant_state.absmax.numel() != n_blocks:
        raise ValueError(f"dequantize_nf4: absmax has {quant_state.absmax.numel()} entries, expected {n_blocks}")
    code = quant_state.code.to(device=packed.device, dtype=torch.float32)
    if quant_state.nested:
        s2 = quant_state.state2
        absmax = quant_state.absmax
        if absmax.dtype != torch.uint8:
            raise TypeError(f"dequantize_nf4: nested absmax must hold uint8 codes, got {absmax.dtype}")
        offset = quant_state.offset
        offset = torch.as_tensor(offset, dtype=torch.float32, device=packed.device).reshape(1)
        absmax2 = s2.absmax.to(torch.float32)
        code2 = s2.code.to(device=packed.device, dtype=torch.float32)
        blocksize2 = int(s2.blocksize)
    else:
        absmax, absmax2, code2, offset, blocksize2 = quant_state.absmax.to(torch.float32), None, None, None, 1
    return NF4Parts(packed, absmax, code, absmax2, code2, offset, int(quant_state.blocksize), blocksize2), shape


def dequantize_nf4(packed: torch.Tensor, quant_state: Any, out: torch.Tensor | None = None) -> torch.Tensor:
    """Dequantize an NF4 weight exactly as the format defines it (bitsandbytes' ``default`` backend; its native CPU
    kernel differs on AVX-512 CPUs at widths that are not a multiple of the blocksize, a bitsandbytes defect).

    Args:
        packed: the packed codes, [(numel+1)//2, 1] (``Params4bit.data``), uint8 or any quant_storage dtype.
        quant_state: ``bitsandbytes.functional.QuantState`` with quant_type "nf4", plain or nested absmax.
        out: optional buffer to reuse: contiguous, ``quant_state.shape``, ``quant_state.dtype``, same device.
    Returns:
        [*quant_state.shape] in quant_state.dtype (``out`` itself when given). Like bitsandbytes, a packed tensor
        of shape [1, n] (the legacy transposed form) returns the result transposed.
    """
    parts, shape = _unpack_state(packed, quant_state)
    if out is None:
        result = call_op(dequantize_nf4_op, *parts, shape, quant_state.dtype)
    else:
        if list(out.shape) != shape or out.dtype != quant_state.dtype:
            raise ValueError(
                f"dequantize_nf4: out must be {tuple(shape)} {quant_state.dtype}, got {tuple(out.shape)} {out.dtype}"
            )
        if not out.is_contiguous() or out.device != packed.device:
            raise ValueError("dequantize_nf4: out must be contiguous and on the packed tensor's device")
        torch.ops.fastft.dequantize_nf4_out(out, *parts)
        result = out
    if packed.dim() == 2 and packed.shape[0] == 1:  # bitsandbytes' backward-compatibility shim, kept for parity
        return result.t()
    return result


def compile_cases() -> None:
    """Every launch variant: output dtype x nested or plain absmax (blocksize is a runtime argument)."""
    from types import SimpleNamespace

    numel = 4096
    for dtype in _OUT_DTYPES:
        for nested in (False, True):
            packed = torch.empty(numel // 2, 1, dtype=torch.uint8)
            qs = SimpleNamespace(quant_type="nf4", blocksize=64, dtype=dtype, shape=(64, 64), code=torch.zeros(16))
            if nested:
                qs.absmax, qs.nested, qs.offset = torch.zeros(64, dtype=torch.uint8), True, torch.tensor(0.0)
                qs.state2 = SimpleNamespace(absmax=torch.ones(1), code=torch.zeros(256), blocksize=256)
            else:
                qs.absmax, qs.nested = torch.ones(64), False
            dequantize_nf4(packed, qs)
