"""A dispatch mode that records the name of every op it sees and runs each one unchanged: tests use it to ask
which ops a call reached (a ``fastft::`` custom op, or only aten), and, while it is active, ``call_op`` must take the
dispatcher (a dispatch mode is on), so it also exercises the dispatched route."""

from __future__ import annotations

from torch.utils._python_dispatch import TorchDispatchMode


class OpRecorder(TorchDispatchMode):
    """``with OpRecorder() as rec: ...``; ``rec.ops``: the ops seen, in order, as ``str(op)`` ("fastft.x.default")."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))
