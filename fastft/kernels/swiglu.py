"""SwiGLU, ``silu(gate) * up``: the names the rest of fastft imports. The kernels live in :mod:`fastft.kernels.glu`
(one elementwise kernel shared with GeGLU, the activation picked by a constexpr).

Custom ops: ``torch.ops.fastft.swiglu_forward(gate, up) -> h`` and
``torch.ops.fastft.swiglu_backward(dh, gate, up) -> (dgate, dup)`` (does not modify its inputs);
``torch.ops.fastft.glu_backward_inplace(dh, gate, up, "silu")`` overwrites gate/up with dgate/dup.
"""

from fastft.kernels.glu import (
    can_overwrite,
    glu_backward_inplace,
    swiglu,
    swiglu_backward,
    swiglu_forward,
    swiglu_reference,
)

__all__ = ["can_overwrite", "glu_backward_inplace", "swiglu", "swiglu_backward", "swiglu_forward", "swiglu_reference"]
