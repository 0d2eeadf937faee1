"""Fused kernels. Each op: Triton kernel(s), a torch reference, a launcher, autograd, and a custom op with a fake impl.

See ``fastft.kernels._launch`` for the one dispatch rule (CUDA or TRITON_INTERPRET=1 -> Triton, else torch). The
rest of fastft (patches, memory models, benchmarks) reads the dispatch state through the names re-exported here, never
through the private modules.
"""

from fastft.kernels._launch import (
    INTERPRETER,
    TRITON_AVAILABLE,
    autocast_enabled,
    force_path,
    launch_hook,
    path_counts,
)
from fastft.kernels.cross_entropy import cross_entropy, cross_entropy_reference
from fastft.kernels.glu import geglu, geglu_reference, swiglu, swiglu_reference
from fastft.kernels.linear_cross_entropy import (
    chunk_loop_in_place,
    linear_cross_entropy,
    linear_cross_entropy_reference,
)
from fastft.kernels.nf4 import dequantize_nf4
from fastft.kernels.rms_norm import rms_norm, rms_norm_reference
from fastft.kernels.rope import apply_rope, apply_rope_reference
from fastft.kernels.selective_log_softmax import selective_log_softmax, selective_log_softmax_reference

__all__ = [
    "INTERPRETER",
    "TRITON_AVAILABLE",
    "autocast_enabled",
    "force_path",
    "launch_hook",
    "path_counts",
    "chunk_loop_in_place",
    "rms_norm",
    "rms_norm_reference",
    "swiglu",
    "swiglu_reference",
    "geglu",
    "geglu_reference",
    "apply_rope",
    "apply_rope_reference",
    "cross_entropy",
    "cross_entropy_reference",
    "linear_cross_entropy",
    "linear_cross_entropy_reference",
    "selective_log_softmax",
    "selective_log_softmax_reference",
    "dequantize_nf4",
]
