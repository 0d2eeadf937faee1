"""Fused kernels. Each op: Triton kernel(s), a torch reference, a launcher, autograd, and a custom op with a fake impl.

See ``fastft.kernels._launch`` for the one dispatch rule (CUDA or TRITON_INTERPRET=1 -> Triton, else torch).
"""

from fastft.kernels._launch import force_path, path_counts
from fastft.kernels.rms_norm import rms_norm, rms_norm_reference

__all__ = ["force_path", "path_counts", "rms_norm", "rms_norm_reference"]
