"""Tolerances per dtype, stated once. Kernels accumulate in fp32, so errors are at the level of one rounding of the
output dtype (bf16 has 8 mantissa bits: 2**-8 = 3.9e-3 relative; fp16 has 11: 4.9e-4)."""

import torch

FORWARD = {
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.bfloat16: dict(rtol=1.6e-2, atol=1.6e-2),
    torch.float16: dict(rtol=2e-3, atol=2e-3),
}

# Backward formulas are evaluated in fp32 inside the kernel, while autograd of the reference rounds intermediates to
# the input dtype, so half-precision gradients differ by a few output ulps.
BACKWARD = {
    torch.float32: dict(rtol=1e-4, atol=1e-5),
    torch.bfloat16: dict(rtol=3e-2, atol=3e-2),
    torch.float16: dict(rtol=5e-3, atol=5e-3),
}


def assert_close(actual, expected, table, dtype, msg=""):
    torch.testing.assert_close(actual.float(), expected.float(), **table[dtype], msg=lambda m: f"{msg}\n{m}")
