"""Live-bytes tracker: the peak bytes of tensor storages alive, counted at the dispatcher, by phase.

Every tensor an op returns is charged to the phase that was current when it was allocated (``tracker.phase = ...``)
and released when its storage is freed (a finalizer on the storage). Views share their base's storage, so they cost
nothing. Works the same for real CPU tensors and for meta/fake tensors, which is what lets one code path both measure
a small run and model a large one.

fastft's own custom ops (namespace ``fastft``) are entered with the tracker still active, so the temporaries they
allocate inside (a chunk of logits, a dequantized weight) are counted too, not just their outputs.

Tensors that exist before the tracker starts are not counted unless passed to :meth:`LiveBytesTracker.add_existing`.
"""

from __future__ import annotations

import contextlib
import gc
import weakref
from collections import defaultdict
from collections.abc import Iterable, Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from fastft.kernels import INTERPRETER


class LiveBytesTracker(TorchDispatchMode):
    """Count live tensor-storage bytes; ``peak_bytes`` is the high-water mark and ``peak_breakdown`` its phases."""

    def __init__(self) -> None:
        super().__init__()
        self.phase = "other"
        self.live_bytes = 0
        self.peak_bytes = 0
        self.live_by_phase: dict[str, int] = defaultdict(int)
        self.peak_breakdown: dict[str, int] = {}
        self.peak_by_phase: dict[str, int] = defaultdict(int)  # high-water mark of live bytes while in each phase
        self._seen: dict[int, tuple[int, str]] = {}

    # -- accounting ---------------------------------------------------------------------------------------------
    def _charge(self, storage: torch.UntypedStorage, phase: str) -> None:
        key = storage._cdata
        if key in self._seen:
            return
        nbytes = storage.nbytes()
        self._seen[key] = (nbytes, phase)
        self.live_bytes += nbytes
        self.live_by_phase[phase] += nbytes
        weakref.finalize(storage, self._release, key)
        self._update_peak()

    def _release(self, key: int) -> None:
        nbytes, phase = self._seen.pop(key, (0, ""))
        self.live_bytes -= nbytes
        if phase:
            self.live_by_phase[phase] -= nbytes

    def _update_peak(self) -> None:
        if self.live_bytes > self.peak_bytes:
            self.peak_bytes = self.live_bytes
            self.peak_breakdown = {k: v for k, v in self.live_by_phase.items() if v}
        if self.live_bytes > self.peak_by_phase[self.phase]:
            self.peak_by_phase[self.phase] = self.live_bytes

    def add_existing(self, tensors: Iterable[torch.Tensor], phase: str = "weights") -> None:
        """Charge tensors that already exist (model weights, say) to ``phase``."""
        for t in tensors:
            if isinstance(t, torch.Tensor):
                self._charge(t.untyped_storage(), phase)

    def recharge(self, tensor: torch.Tensor | None, phase: str) -> None:
        """Move a live tensor's storage to ``phase`` (say, a parameter's ``.grad`` once accumulated -> "gradients")."""
        if not isinstance(tensor, torch.Tensor):
            return
        key = tensor.untyped_storage()._cdata
        if key not in self._seen:
            return
        nbytes, old = self._seen[key]
        self._seen[key] = (nbytes, phase)
        self.live_by_phase[old] -= nbytes
        self.live_by_phase[phase] += nbytes

    def transient(self, nbytes: int) -> None:
        """Count ``nbytes`` allocated and freed at once in the current phase (a replayed temporary high-water mark)."""
        if nbytes <= 0:
            return
        self.live_bytes += nbytes
        self.live_by_phase[self.phase] += nbytes
        self._update_peak()
        self.live_bytes -= nbytes
        self.live_by_phase[self.phase] -= nbytes

    @contextlib.contextmanager
    def local_peak(self) -> Iterator[list[int]]:
        """Yield a list that receives the high-water mark of live bytes reached inside the block."""
        saved = (self.peak_bytes, self.peak_breakdown)
        self.peak_bytes = self.live_bytes
        result: list[int] = []
        try:
            yield result
        finally:
            result.append(self.peak_bytes)
            if saved[0] >= self.peak_bytes:
                self.peak_bytes, self.peak_breakdown = saved

    @contextlib.contextmanager
    def in_phase(self, phase: str) -> Iterator[None]:
        previous, self.phase = self.phase, phase
        try:
            yield
        finally:
            self.phase = previous

    def reset_peak(self) -> None:
        self.peak_bytes = self.live_bytes
        self.peak_breakdown = {k: v for k, v in self.live_by_phase.items() if v}
        self.peak_by_phase = defaultdict(int)

    # -- dispatch -----------------------------------------------------------------------------------------------
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        inputs, _ = tree_flatten((args, kwargs))
        if func.namespace == "fastft":
            # Re-enter so the op's inner allocations are seen; the op itself is below us and will not recurse.
            with self:
                out = _custom_op_impl(func, args, kwargs)
                if INTERPRETER and any(isinstance(t, torch.Tensor) and not t.is_meta for t in inputs):
                    # Triton's interpreter leaves the launched tensors in reference cycles, so on real tensors their
                    # storages would outlive their last use until the next gc run (a GPU launch holds nothing). Collect
                    # the young generation now so the measured lifetimes are the GPU's, not the interpreter's.
                    gc.collect(0)
        else:
            out = func(*args, **kwargs)
        # Outputs that share an input's storage (views, no-op casts) allocate nothing: never charge them, or a view of
        # an untracked tensor (a weight created before the tracker) would be counted as new memory.
        input_storages = {t.untyped_storage()._cdata for t in inputs if isinstance(t, torch.Tensor)}
        flat, _ = tree_flatten(out)
        for t in flat:
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                if storage._cdata not in input_storages:
                    self._charge(storage, self.phase)
        return out


def _custom_op_impl(func, args, kwargs):
    """Call the Python implementation of a fastft custom op directly (fake impl for meta/fake tensors)."""
    from torch._library.custom_ops import OPDEFS
    from torch._subclasses.fake_tensor import FakeTensor

    opdef = OPDEFS[func._schema.name]
    flat, _ = tree_flatten((args, kwargs))
    tensors = [t for t in flat if isinstance(t, torch.Tensor)]
    if any(isinstance(t, FakeTensor) or t.is_meta for t in tensors):
        return opdef._abstract_fn(*args, **kwargs)
    device = tensors[0].device.type if tensors else "cpu"
    impl = opdef._backend_fns.get(device) or opdef._init_fn
    return impl(*args, **kwargs)
