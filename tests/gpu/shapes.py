"""Shapes and tolerances of the CUDA suite: Llama-3.1-8B's sizes, which the interpreter cannot afford.

GPU tolerances: the compiled kernels and the torch references both accumulate in fp32 on the GPU, but in different
orders (tree reductions, cuBLAS split-K), and the references round intermediates to the input dtype; at 8K tokens
x 128K vocab those differences add up over longer reductions than the CPU tests see, hence a looser fp32 bound.
"""

import torch

HIDDEN, INTERMEDIATE, VOCAB = 4096, 14336, 128256
HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128
TOKENS = 8192

FORWARD = {
    torch.float32: dict(rtol=1e-4, atol=1e-4),
    torch.bfloat16: dict(rtol=1.6e-2, atol=1.6e-2),
}
BACKWARD = {
    torch.float32: dict(rtol=1e-3, atol=1e-4),
    torch.bfloat16: dict(rtol=3e-2, atol=3e-2),
}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, table: dict, dtype: torch.dtype, msg: str = "") -> None:
    torch.testing.assert_close(actual.float(), expected.float(), **table[dtype], msg=lambda m: f"{msg}\n{m}")
