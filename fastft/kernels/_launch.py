"""The one dispatch rule, block sizing, and the launch hook the compile gate uses.

Dispatch rule (the only place it is decided): an op takes its Triton kernel when its tensors are on CUDA, or when
the Triton interpreter is on (``TRITON_INTERPRET=1`` before triton was imported), so CPU tests run the very kernels a
GPU would. Anything else (plain CPU, MPS, no triton installed) takes the op's torch path, which keeps the same memory
algorithm. Which path ran is counted in :data:`path_counts` and logged at DEBUG, so a broken fast path can never hide.

Every kernel launch goes through :func:`launch`. The compile gate (``fastft.kernels.compile_check``) installs a hook
there that turns each launch into an ahead-of-time compile for a chosen GPU arch, so it compiles exactly the
signatures and constexpr variants the code really launches.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch

from fastft._log import logger

try:  # triton is Linux-only; elsewhere every op takes its torch path
    import triton
    import triton.language as tl  # noqa: F401  (re-exported for kernel files)

    TRITON_AVAILABLE = True
except ImportError:  # pragma: no cover - exercised only on platforms without triton
    triton = None
    TRITON_AVAILABLE = False


def _interpreter_on() -> bool:
    if not TRITON_AVAILABLE:
        return False
    knobs = getattr(triton, "knobs", None)
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0") == "1"  # pragma: no cover - triton < 3.4


#: True when triton decorated our kernels as interpreted functions (decided when triton was imported).
INTERPRETER: bool = _interpreter_on()

#: (op name, "triton" | "torch") -> number of calls. Tests read it to prove which path ran.
path_counts: Counter[tuple[str, str]] = Counter()

_forced: str | None = None
_launch_hook: Callable[..., Any] | None = None


@contextlib.contextmanager
def force_path(path: str) -> Iterator[None]:
    """Force every op onto ``"torch"`` or ``"triton"`` inside the block (tests and the compile gate use it)."""
    global _forced
    if path not in ("torch", "triton"):
        raise ValueError(f"path must be 'torch' or 'triton', got {path!r}")
    if path == "triton" and not TRITON_AVAILABLE:
        raise RuntimeError("triton is not installed, cannot force the triton path")
    previous, _forced = _forced, path
    try:
        yield
    finally:
        _forced = previous


def use_triton(op: str, *tensors: torch.Tensor) -> bool:
    """Decide the path for one call of ``op`` on ``tensors`` and record it."""
    if _forced is not None:
        triton_path = _forced == "triton"
    elif not TRITON_AVAILABLE:
        triton_path = False
    else:
        triton_path = INTERPRETER or any(t.is_cuda for t in tensors)
    path = "triton" if triton_path else "torch"
    path_counts[(op, path)] += 1
    logger.debug("fastft.%s: %s path", op, path)
    return triton_path


def _plain(t: torch.Tensor) -> bool:
    # Not a subclass (FakeTensor, DTensor, functional wrappers) and on a device with real storage.
    return (type(t) is torch.Tensor or type(t) is torch.nn.Parameter) and not t.is_meta  # is_meta: no device object


def direct_call_ok(*tensors: torch.Tensor) -> bool:
    """Whether eager code may run a custom op's body directly instead of dispatching through ``torch.library``.

    The custom ops (with their fake impls) exist so that torch.compile, fake/meta tensors and dispatch modes see one
    opaque op with known output shapes. Plain eager tensors need none of that, and on small tensors the dispatcher's
    per-call cost (schema parsing, the autograd and ADInplaceOrView redispatch: ~40-50 us per call on CPU) outweighs
    the op itself. Direct calls run the very same Python body, so results are bitwise identical and the path counts
    (:func:`use_triton`) are recorded exactly as before.
    """
    if (
        torch.compiler.is_compiling()
        or torch._C._len_torch_dispatch_stack() > 0
        or torch._C._are_functorch_transforms_active()
    ):
        return False
    return all(_plain(t) for t in tensors)


def call_op(op: Any, *args: Any, **kwargs: Any) -> Any:
    """``op(*args, **kwargs)`` for a ``torch.library.custom_op`` ``op``: its body directly when :func:`direct_call_ok` on the
    tensor arguments, else through the dispatcher (tracing, fake tensors, dispatch modes). Ops that mutate an argument
    always dispatch: the dispatcher bumps the mutated tensors' version counters, which is what makes autograd refuse
    a second backward through a graph whose saved tensors were overwritten (a Triton kernel's store does not)."""
    if not op._opoverload._schema.is_mutable and direct_call_ok(*(a for a in args if isinstance(a, torch.Tensor))):
        # keyword arguments are never tensors in fastft's schemas (options and plans only)
        return op._init_fn(*args, **kwargs)
    return op(*args, **kwargs)


def needs_grad(*tensors: torch.Tensor) -> bool:
    """True when autograd would record a graph for these inputs (grad mode on and one of them requires grad). When
    False an ``autograd.Function`` records nothing, so its forward body can run without ``Function.apply``."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def launch(kernel: Any, grid: tuple[int, ...], *args: Any, **kwargs: Any) -> None:
    """Launch ``kernel[grid](*args, **kwargs)``, or hand it to the compile gate's hook when one is installed."""
    if _launch_hook is not None:
        _launch_hook(kernel, grid, args, kwargs)
        return
    kernel[grid](*args, **kwargs)


@contextlib.contextmanager
def launch_hook(hook: Callable[..., Any]) -> Iterator[None]:
    """Route every :func:`launch` to ``hook(kernel, grid, args, kwargs)`` instead of running it."""
    global _launch_hook
    previous, _launch_hook = _launch_hook, hook
    try:
        with force_path("triton"):
            yield
    finally:
        _launch_hook = previous


def next_power_of_2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


#: Largest row a single-pass row kernel holds in registers (64K fp32 elements = 256 KiB spread over the warps).
MAX_FUSED_ROW = 65536


def row_block(n_cols: int) -> tuple[int, int]:
    """Block size and warp count for a kernel that keeps one whole row of ``n_cols`` in registers.

    Warps grow with the block so each thread holds at most ~32 fp32 values (no spills on sm_75's 255 registers).
    """
    block = next_power_of_2(n_cols)
    if block > MAX_FUSED_ROW:
        raise ValueError(f"row of {n_cols} elements exceeds the fused-row limit of {MAX_FUSED_ROW}")
    num_warps = 4
    if block >= 2048:
        num_warps = 8
    if block >= 8192:
        num_warps = 16
    if block >= 32768:
        num_warps = 32
    return block, num_warps


def autocast_enabled(device_type: str) -> bool:
    """``torch.is_autocast_enabled(device_type)``, False for device types with no autocast state at all ("meta":
    the memory model)."""
    try:
        return torch.is_autocast_enabled(device_type)
    except RuntimeError:
        return False


def check_floating(name: str, t: torch.Tensor) -> None:
    """Clear error for integer/bool/complex inputs before anything reaches a kernel."""
    if t.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")


# ----------------------------------------------------------------------------------------------------------------
# Non-tensor options of a custom op: one frozen dataclass per concept (the loss options, a chunk plan), whose fields
# become the op's keyword-only arguments. The schema is written from the fields, so the option list lives once.
# ----------------------------------------------------------------------------------------------------------------
#: Field annotation -> schema type, as torch.library infers it from a Python signature (int is SymInt there).
_SCHEMA_TYPES = {"int": "SymInt", "float": "float", "float | None": "float?", "bool": "bool"}


def option_schema(*option_types: type) -> str:
    """The keyword-only part of a custom op schema: every field of each frozen dataclass, in field order, e.g.
    ``"SymInt ignore_index, float? softcap"``. The op's body then takes them as ``**options``."""
    parts = []
    for cls in option_types:
        for field in dataclasses.fields(cls):
            annotation = field.type if isinstance(field.type, str) else field.type.__name__
            if annotation not in _SCHEMA_TYPES:
                raise TypeError(f"{cls.__name__}.{field.name}: no custom-op schema type for {annotation!r}")
            parts.append(f"{_SCHEMA_TYPES[annotation]} {field.name}")
    return ", ".join(parts)


def option_kwargs(*options: Any) -> dict[str, Any]:
    """The fields of option dataclasses as the op's keyword arguments (the inverse of :func:`option_schema`)."""
    # not dataclasses.asdict (a deepcopy); torch.compile traces this call
    return {field.name: getattr(o, field.name) for o in options for field in dataclasses.fields(o)}


def options_from_kwargs(kwargs: Mapping[str, Any], *option_types: type) -> tuple:
    """The option dataclasses back from an op's keyword arguments (the inverse of :func:`option_kwargs`)."""
    return tuple(cls(**{field.name: kwargs[field.name] for field in dataclasses.fields(cls)}) for cls in option_types)
