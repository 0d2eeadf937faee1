"""GeGLU, ``gelu(gate, approximate) * up``: the names the rest of fastft imports. The kernels live in
:mod:`fastft.kernels.glu` (one elementwise kernel shared with SwiGLU, the activation picked by a constexpr).

Custom ops: ``torch.ops.fastft.geglu_forward(gate, up, approximate) -> h`` and
``torch.ops.fastft.geglu_backward(dh, gate, up, approximate) -> (dgate, dup)`` (does not modify its inputs), with
``approximate`` "none" | "tanh"; ``torch.ops.fastft.glu_backward_inplace(dh, gate, up, "gelu" | "gelu_tanh")``
overwrites gate/up with dgate/dup.
"""

from fastft.kernels.glu import (
    can_overwrite,
    geglu,
    geglu_backward,
    geglu_forward,
    geglu_reference,
    glu_backward_inplace,
)

__all__ = ["can_overwrite", "geglu", "geglu_backward", "geglu_forward", "geglu_reference", "glu_backward_inplace"]
