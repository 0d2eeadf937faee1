"""Modeled step time beside modeled memory: a roofline over the ops of the step model's real training step.

:class:`~fastft.memory.step_model.StepModel` runs the actual training step on meta tensors. :class:`OpCounter` (a
``TorchDispatchMode``, entered inside the step model's memory tracker) sees every op that step dispatches and records,
per op call:

* FLOPs -- matrix products only: ``torch.utils.flop_counter``'s registry (mm, addmm, bmm, baddbmm, SDPA, ...) plus
  formulas for the GEMM-bearing custom ops it does not know (the step model's flash-attention stand-in, fastft's
  chunked linear cross-entropy and grouped GEMM). Elementwise arithmetic is taken as free beside its memory traffic
  (a few FLOPs per byte, far below every GPU's ridge point); a custom op with neither a formula nor a place in the
  elementwise list is reported in :attr:`OpCounter.no_flop_formula`, never silently zero.
* bytes -- what the kernel reads and writes in HBM: every tensor argument read once (arguments an op only writes,
  ``out=`` or ``copy_``'s destination, are not read), every output and mutated argument written once. fastft's fused
  custom ops (``fastft::...``) are recorded as ONE op with their real traffic -- their inputs and outputs -- because
  the counter sits inside the tracker and sees the op before the tracker runs its implementation, whose internal
  ops never reach the counter. Views, ``empty`` and ``detach`` move nothing and launch nothing.

:func:`roofline` turns the record into a time per op on a named GPU, ``max(flops / peak[dtype], bytes / bandwidth) +
launch overhead``, summed over the step: an optimistic bound (peak FLOP/s and bandwidth are never fully reached), so
every figure is labelled "modeled (roofline)". The first GPU run (benchmarks/gpu/check.sh) prints the measured step
beside it, which calibrates the model.

Not modelled: the CPU side (Python, the dispatcher: eager PyTorch can be CPU-bound for short kernels, which the
per-launch overhead only partly stands for), overlap between kernels, caches (a tensor re-read by the next kernel is
counted again), the offloaded checkpoint's device->host copies (on a side stream, overlapped; the copy back is
counted as a device copy), and sliding-window attention (attention is modelled causal over the whole sequence).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
from collections import Counter, defaultdict
from collections.abc import Callable
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

LABEL = "modeled (roofline)"
#: Fixed cost per kernel launch added to each op's roofline time. An assumption (a launch plus its tail is ~2-5 us on
#: recent GPUs; eager PyTorch's CPU dispatch is ~5-15 us per op and hides it only when kernels are long); the GPU
#: check's measured step calibrates it.
LAUNCH_OVERHEAD_S = 5e-6


@dataclasses.dataclass(frozen=True)
class GPU:
    """Published peaks of one GPU: dense TFLOP/s per dtype (None: no such tensor-core mode) and HBM bytes/s."""

    name: str
    tflops: dict[str, float | None]  # keys: fp32 (CUDA cores), tf32, fp16, bf16 (tensor cores, dense)
    bandwidth: float  # bytes/s
    memory_bytes: int  # total as nvidia-smi reports it (MiB * 2**20), the plan's ``--gpu-memory NAME`` presets
    description: str


# Provenance: NVIDIA's product datasheets (nvidia.com/en-us/data-center/<product>/), dense figures. Datasheets quote
# tensor-core TF32/FP16/BF16 "with sparsity" (marked *) for Ampere and later; the dense figure is half of it.
#   T4 (Turing, sm_75):   FP32 8.1; "mixed precision (FP16/FP32)" 65; no BF16, no TF32; GDDR6 320 GB/s.
#   L4 (Ada, sm_89):      FP32 30.3; TF32 120*, FP16 242*, BF16 242*; GDDR6 300 GB/s.
#   A100 SXM (sm_80):     FP32 19.5; TF32 156 (312*); FP16/BF16 312 (624*); 40GB HBM2 1,555 GB/s, 80GB HBM2e 2,039 GB/s.
#   H100 SXM5 (sm_90):    FP32 67; TF32 989*; FP16/BF16 1,979*; 80GB HBM3 3.35 TB/s.
#   H200 SXM (sm_90):     FP32 67; TF32 989*; FP16/BF16 1,979*; 141GB HBM3e 4.8 TB/s.
# Memory sizes are nvidia-smi's totals in MiB (before the CUDA context): 15,360 (T4), 23,034 (L4), 40,960 / 81,920
# (A100), 81,559 (H100 80GB HBM3), 143,771 (H200).
GPUS: dict[str, GPU] = {
    g.name: g
    for g in (
        GPU("T4", {"fp32": 8.1, "tf32": None, "fp16": 65.0, "bf16": None}, 320e9, 15_360 * 2**20, "NVIDIA T4 16GB (Turing)"),
        GPU(
            "L4",
            {"fp32": 30.3, "tf32": 120 / 2, "fp16": 242 / 2, "bf16": 242 / 2},
            300e9,
            23_034 * 2**20,
            "NVIDIA L4 24GB (Ada)",
        ),
        GPU(
            "A100-40GB",
            {"fp32": 19.5, "tf32": 156.0, "fp16": 312.0, "bf16": 312.0},
            1555e9,
            40_960 * 2**20,
            "NVIDIA A100 SXM4 40GB",
        ),
        GPU(
            "A100-80GB",
            {"fp32": 19.5, "tf32": 156.0, "fp16": 312.0, "bf16": 312.0},
            2039e9,
            81_920 * 2**20,
            "NVIDIA A100 SXM4 80GB",
        ),
        GPU(
            "H100",
            {"fp32": 67.0, "tf32": 989 / 2, "fp16": 1979 / 2, "bf16": 1979 / 2},
            3.35e12,
            81_559 * 2**20,
            "NVIDIA H100 SXM5 80GB",
        ),
        GPU(
            "H200",
            {"fp32": 67.0, "tf32": 989 / 2, "fp16": 1979 / 2, "bf16": 1979 / 2},
            4.8e12,
            143_771 * 2**20,
            "NVIDIA H200 SXM 141GB",
        ),
    )
}
_ALIASES = {
    "h100-sxm": "H100",
    "h100-sxm5": "H100",
    "h100-80gb": "H100",
    "h200-sxm": "H200",
    "tesla-t4": "T4",
    "a100-sxm4-40gb": "A100-40GB",
    "a100-sxm4-80gb": "A100-80GB",
}


def find_gpu(name: str, flag: str = "--gpu") -> GPU:
    """A GPU of :data:`GPUS` by name (case-insensitive, a few aliases); ValueError with a did-you-mean otherwise."""
    key = str(name).strip().lower().replace(" ", "-")
    table = {k.lower(): k for k in GPUS} | _ALIASES
    if key in table:
        return GPUS[table[key]]
    close = difflib.get_close_matches(key, list(table), n=3, cutoff=0.4)
    hint = sorted({table[c] for c in close})
    did = f"did you mean {' or '.join(hint)}? " if hint else ""
    raise ValueError(f"{flag} {name}: not a GPU in the roofline table; {did}known GPUs: {', '.join(GPUS)}")


def gpu_from_device_name(device_name: str) -> GPU | None:
    """``torch.cuda.get_device_name()`` ("NVIDIA H200", "NVIDIA A100-SXM4-80GB", "Tesla T4") -> its table row."""
    n = device_name.upper()
    if "A100" in n:
        return GPUS["A100-80GB" if "80G" in n else "A100-40GB"]
    for name in ("H200", "H100", "T4"):
        if name in n:
            return GPUS[name]
    return GPUS["L4"] if re.search(r"\bL4\b", n) else None  # not the L40 / L40S


# ---------------------------------------------------------------------------------------------------------------
# Counting
# ---------------------------------------------------------------------------------------------------------------

_aten = torch.ops.aten
#: Ops that allocate or relabel without a kernel: no bytes, no launch.
_FREE = {
    _aten.empty,
    _aten.empty_like,
    _aten.empty_strided,
    _aten.new_empty,
    _aten.new_empty_strided,
    _aten.detach,
    _aten.alias,
    _aten.lift_fresh,
    _aten._unsafe_view,
    _aten.set_,
    _aten.resize_,
}
#: In-place ops that overwrite ``self`` without reading it.
_WRITE_ONLY_SELF = {
    _aten.copy_,
    _aten.fill_,
    _aten.zero_,
    _aten.uniform_,
    _aten.normal_,
    _aten.random_,
    _aten.bernoulli_,
    _aten.index_put_,
}
#: fastft custom ops with no matrix product inside (memory-bound by construction: FLOPs not counted).
ELEMENTWISE_CUSTOM = {
    "fastft::rms_norm_forward",
    "fastft::rms_norm_backward",
    "fastft::rope_forward",
    "fastft::rope_backward",
    "fastft::swiglu_forward",
    "fastft::swiglu_backward",
    "fastft::geglu_forward",
    "fastft::geglu_backward",
    "fastft::glu_backward_inplace",
    "fastft::cross_entropy_forward",
    "fastft::cross_entropy_backward",
    "fastft::dequantize_nf4",
    "fastft::dequantize_nf4_out",
    "fastft_memmodel::dequantize_4bit",
}


def footprint(t: torch.Tensor) -> int:
    """Bytes a kernel touches reading/writing ``t``: broadcast (stride-0) dimensions are read once."""
    if t.numel() == 0:
        return 0
    return t.element_size() * math.prod(s for s, st in zip(t.shape, t.stride()) if st != 0)


def _attention_flops(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backward: bool) -> int:
    """Causal attention, q [B, H, T, D], k/v [B, Hkv, S, D]: QK^T and PV are 2*B*H*T*S*D each, halved by causality;
    FlashAttention-2's backward runs five such products (QK^T recomputed, dV, dP, dQ, dK)."""
    b, h, t, d = q.shape
    s = k.shape[2]
    forward = b * h * t * s * (d + v.shape[-1])  # (2 B H T S D + 2 B H T S Dv) / 2
    return forward * 5 // 2 if backward else forward


def _bind(func: Any, args: tuple, kwargs: dict) -> dict[str, Any]:
    """The op's arguments by schema name (positional and keyword-only alike)."""
    return {a.name: (args[i] if i < len(args) else kwargs.get(a.name)) for i, a in enumerate(func._schema.arguments)}


def _custom_flops(name: str, a: dict[str, Any]) -> int | None:
    """FLOPs of a GEMM-bearing custom op from its arguments by name; None when ``name`` has no formula here."""
    if name == "fastft_memmodel::flash_attention_forward":
        return _attention_flops(a["q"], a["k"], a["v"], backward=False)
    if name == "fastft_memmodel::flash_attention_backward":
        return _attention_flops(a["q"], a["k"], a["v"], backward=True)
    if name == "fastft::linear_cross_entropy_chunks":
        hidden, weight = a["hidden"], a["weight"]
        per = 2 * hidden.shape[0] * hidden.shape[1] * weight.shape[0]
        # gradients are computed when any upstream gradient is given (the argument names changed across versions)
        grads = any(a.get(k) is not None for k in ("dloss", "d_ce", "d_z", "d_entropy", "dent"))
        return per * (1 + (grads and bool(a.get("compute_dh"))) + (grads and bool(a.get("compute_dw"))))
    if name in ("fastft::grouped_gemm_forward", "fastft::grouped_gemm_backward"):
        x, w = a["x"], a["w"]
        n = w.shape[2] if a["transpose_w"] else w.shape[1]
        return 2 * x.shape[0] * x.shape[1] * n * (2 if name.endswith("backward") else 1)  # backward: dx and dw
    return None


def _flop_registry() -> dict:
    from torch.utils.flop_counter import flop_registry

    table = dict(flop_registry)
    table[_aten.addmm_] = flop_registry[_aten.addmm]  # fused LoRA's backward accumulates dX in place
    table[_aten.baddbmm_] = flop_registry[_aten.baddbmm]
    return table


@dataclasses.dataclass(frozen=True)
class OpKey:
    """One kind of op call; identical calls (same op, phase, dtype, FLOPs, bytes) are counted together."""

    op: str
    phase: str
    dtype: str  # the dtype whose peak applies to the FLOPs ("" when there are none)
    flops: int
    bytes: int
    launch: bool


class OpCounter(TorchDispatchMode):
    """Record FLOPs and bytes of every op dispatched inside it (see the module docstring). ``phase_of`` returns the
    current phase name (the step model points it at its tracker's phase)."""

    def __init__(self, device: str = "meta") -> None:
        super().__init__()
        self.device = torch.device(device).type  # ops with no tensor there run on the host (AdamW's CPU step count)
        self.calls: Counter[OpKey] = Counter()
        self.phase_of: Callable[[], str] = lambda: "step"
        self.no_flop_formula: set[str] = set()
        self._flops = _flop_registry()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        self.record(func, args, kwargs, out)
        return out

    def record(self, func: Any, args: tuple, kwargs: dict, out: Any) -> None:
        packet = func.overloadpacket
        if func.is_view or packet in _FREE or func.namespace == "profiler":
            return
        if not any(
            t.device.type == self.device for t in tree_flatten((args, kwargs, out))[0] if isinstance(t, torch.Tensor)
        ):
            return
        name = str(packet) if func.namespace == "aten" else func._schema.name
        reads = writes = 0
        written: set[int] = set()
        arg_storages: set[int] = set()
        for i, arg in enumerate(func._schema.arguments):
            value = args[i] if i < len(args) else kwargs.get(arg.name)
            tensors = [t for t in tree_flatten(value)[0] if isinstance(t, torch.Tensor)]
            if not tensors:
                continue
            mutated = arg.alias_info is not None and arg.alias_info.is_write
            write_only = mutated and (arg.name == "out" or (arg.name == "self" and packet in _WRITE_ONLY_SELF))
            for t in tensors:
                arg_storages.add(t.untyped_storage()._cdata)
                size = footprint(t)
                if not write_only:
                    reads += size
                if mutated:
                    writes += size
                    written.add(t.untyped_storage()._cdata)
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.untyped_storage()._cdata not in arg_storages:
                writes += footprint(t)
        flops, dtype = 0, ""
        if packet in self._flops:
            flops = int(self._flops[packet](*args, **kwargs, out_val=out))
        elif func.namespace != "aten":
            custom = _custom_flops(name, _bind(func, args, kwargs))
            if custom is None:
                custom = 0
                if name not in ELEMENTWISE_CUSTOM:
                    self.no_flop_formula.add(name)
            flops = custom
        if flops:
            first = next(t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor))
            dtype = str(first.dtype).removeprefix("torch.")
        self.calls[OpKey(name, self.phase_of(), dtype, flops, reads + writes, True)] += 1

    @property
    def flops(self) -> int:
        return sum(k.flops * n for k, n in self.calls.items())

    @property
    def bytes(self) -> int:
        return sum(k.bytes * n for k, n in self.calls.items())

    @property
    def launches(self) -> int:
        return sum(n for k, n in self.calls.items() if k.launch)


# ---------------------------------------------------------------------------------------------------------------
# Roofline
# ---------------------------------------------------------------------------------------------------------------

_DTYPE_PEAK = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


def peak_flops(gpu: GPU, dtype: str, tf32: bool = False) -> tuple[float, str | None]:
    """(FLOP/s, note or None) for matrix products in ``dtype`` ("bfloat16", "float16", "float32") on ``gpu``.

    fp32 runs on CUDA cores unless ``tf32`` (torch's default: ``allow_tf32`` off for matmuls). bf16 on a GPU without
    bf16 tensor cores (T4) is priced at its fp16 peak: fastft trains in fp16 there (same bytes), and says so.
    """
    kind = _DTYPE_PEAK.get(dtype)
    if kind is None:
        raise ValueError(f"no peak FLOP/s for matrix products in {dtype!r} (known: {', '.join(_DTYPE_PEAK)})")
    if kind == "fp32" and tf32 and gpu.tflops.get("tf32"):
        kind = "tf32"
    note = None
    if gpu.tflops.get(kind) is None and kind == "bf16":
        kind, note = (
            "fp16",
            f"{gpu.name} has no bf16 tensor cores: bf16 matmuls priced at its fp16 peak (fastft trains in fp16 there)",
        )
    value = gpu.tflops.get(kind)
    if value is None:
        raise ValueError(f"{gpu.name}: no published peak for {kind}")
    return value * 1e12, note


@dataclasses.dataclass
class OpTime:
    op: str
    calls: int
    flops: int
    bytes: int
    seconds: float
    compute_bound_calls: int


@dataclasses.dataclass
class SpeedEstimate:
    """Modeled (roofline) time of one training step on one GPU, with what it is made of."""

    gpu: str
    label: str
    tokens_per_step: int
    step_seconds: float
    tokens_per_s: float
    flops: int
    bytes: int
    launches: int
    compute_bound_seconds: float  # roofline time of the calls whose FLOPs, not bytes, set their time
    memory_bound_seconds: float
    overhead_seconds: float  # launches x launch_overhead_s
    launch_overhead_s: float
    by_phase: dict[str, float]
    top_ops: list[OpTime]
    notes: list[str]


def roofline(
    counter: OpCounter,
    gpu: GPU,
    tokens_per_step: int,
    launch_overhead_s: float = LAUNCH_OVERHEAD_S,
    tf32: bool = False,
    top: int = 8,
) -> SpeedEstimate:
    """Sum ``max(flops / peak[dtype], bytes / bandwidth) + launch_overhead_s`` over the counted calls."""
    compute = memory = overhead = 0.0
    by_op: dict[str, OpTime] = {}
    by_phase: dict[str, float] = defaultdict(float)
    notes: set[str] = set()
    for key, n in counter.calls.items():
        flop_s = 0.0
        if key.flops:
            peak, note = peak_flops(gpu, key.dtype, tf32)
            flop_s = key.flops / peak
            if note:
                notes.add(note)
        byte_s = key.bytes / gpu.bandwidth
        launch = launch_overhead_s if key.launch else 0.0
        if flop_s > byte_s:
            compute += n * flop_s
        else:
            memory += n * byte_s
        overhead += n * launch
        seconds = n * (max(flop_s, byte_s) + launch)
        row = by_op.setdefault(key.op, OpTime(key.op, 0, 0, 0, 0.0, 0))
        row.calls += n
        row.flops += n * key.flops
        row.bytes += n * key.bytes
        row.seconds += seconds
        row.compute_bound_calls += n if flop_s > byte_s else 0
        by_phase[key.phase] += seconds
    total = compute + memory + overhead
    if counter.no_flop_formula:
        notes.add(f"no FLOP formula for {', '.join(sorted(counter.no_flop_formula))}: timed by their bytes only")
    ranked = sorted(by_op.values(), key=lambda r: -r.seconds)[:top]
    return SpeedEstimate(
        gpu.name,
        LABEL,
        tokens_per_step,
        total,
        tokens_per_step / total if total else math.inf,
        counter.flops,
        counter.bytes,
        counter.launches,
        compute,
        memory,
        overhead,
        launch_overhead_s,
        dict(by_phase),
        ranked,
        sorted(notes),
    )


def training_time(step_seconds: float, tokens_per_step: int, total_tokens: int) -> tuple[int, float]:
    """(steps, seconds) to train ``total_tokens``: ceil(total / tokens per step) steps of ``step_seconds``."""
    if total_tokens < 1 or tokens_per_step < 1:
        raise ValueError(f"tokens must be >= 1, got total {total_tokens}, per step {tokens_per_step}")
    steps = -(-total_tokens // tokens_per_step)
    return steps, steps * step_seconds


def count_step(model: Any, seq_len: int, batch_size: int = 1) -> tuple[Any, OpCounter]:
    """Run ``model`` (a :class:`~fastft.memory.step_model.StepModel`) for one step under an :class:`OpCounter`, every
    layer executed (replayed layers dispatch nothing); returns (its StepResult, the counter)."""
    counter = OpCounter()
    result = model.step(seq_len, batch_size, replay_layers=False, counter=counter)
    return result, counter


def estimate(
    config: Any, spec: Any, seq_len: int, gpus: list[GPU], batch_size: int = 1, launch_overhead_s: float = LAUNCH_OVERHEAD_S
) -> dict[str, SpeedEstimate]:
    """Build the step model for ``spec`` on meta, count one step, and price it on each GPU -> {gpu name: estimate}."""
    from fastft.memory.step_model import StepModel

    _, counter = count_step(StepModel(config, spec), seq_len, batch_size)
    return {g.name: roofline(counter, g, seq_len * batch_size, launch_overhead_s) for g in gpus}


def format_duration(seconds: float) -> str:
    """3.2 s, 4.5 min, 13.9 h, 2.1 days."""
    if seconds < 120:
        return f"{seconds:.3g} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    if seconds < 3 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"
