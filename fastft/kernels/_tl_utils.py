"""Triton helpers shared by fastft's kernels (``@triton.jit`` functions called from inside other kernels).

Import them inside a kernel module's ``if TRITON_AVAILABLE:`` block, as the kernels themselves are defined.
"""

from __future__ import annotations

from fastft.kernels._launch import TRITON_AVAILABLE

if TRITON_AVAILABLE:
    import triton
    import triton.language as tl

    @triton.jit
    def cast_rne(x, DTYPE: tl.constexpr):
        """fp32 -> DTYPE rounding to nearest even, identically on GPU and in the interpreter.

        The interpreter (triton 3.7/3.9) truncates fp32 -> bf16 casts (toward zero, even with
        ``fp_downcast_rounding="rtne"``) and mishandles subnormals, while GPUs round to nearest even; so bf16 is
        rounded here with integer ops (add 0x7FFF plus the lowest kept bit, keep the high half) and bitcast. Costs
        a few integer ops per element on GPU, free next to the memory traffic. NaN keeps a quiet-NaN pattern.
        """
        if DTYPE == tl.bfloat16:
            bits = x.to(tl.uint32, bitcast=True)
            rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
            rounded = tl.where(x == x, rounded, (bits >> 16) | 0x40)
            return rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)
        else:
            return x.to(DTYPE)
