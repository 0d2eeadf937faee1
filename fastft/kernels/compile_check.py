"""The compile gate: build every kernel, exactly as the code launches it, to cubin for real GPUs, with no GPU.

``python -m fastft.kernels.compile_check --arch 75,80,90`` runs each kernel module's ``compile_cases()`` (calls of the
public ops on small CPU tensors, covering every dtype and constexpr variant the code can launch) with a launch hook
installed. The hook turns each launch into ``triton.compile`` for the requested targets using the ptxas shipped in
the triton wheel, and ``ptxas -v`` reports registers and spills. One row per kernel variant and arch; exit status 1 if
anything failed to compile. It catches what the interpreter cannot (``tl.dot`` with blocks < 16, loop-carried dtype
changes, register blow-ups).

Outputs are not computed in this mode: the ops run their torch glue on uninitialized buffers.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import os
import re
import subprocess
import sys
import tempfile
import time
from typing import Any

#: Kernel modules whose ``compile_cases()`` the gate runs. A new kernel file adds itself here.
KERNEL_MODULES = [
    "fastft.kernels.rms_norm",
    "fastft.kernels.cross_entropy",
    "fastft.kernels.linear_cross_entropy",
    "fastft.kernels.selective_log_softmax",
    "fastft.kernels.glu",
    "fastft.kernels.rope",
    "fastft.kernels.nf4",
    "fastft.kernels.grouped_gemm",
]


@dataclasses.dataclass
class Launch:
    kernel: Any
    args: tuple
    kwargs: dict
    key: tuple


@dataclasses.dataclass
class Row:
    kernel: str
    variant: str
    arch: int
    ok: bool
    registers: int | None = None
    spill_bytes: int | None = None
    shared_bytes: int | None = None
    seconds: float = 0.0
    error: str = ""


def _describe(value: Any) -> str:
    import torch

    if isinstance(value, torch.Tensor):
        return str(value.dtype).replace("torch.", "")
    return type(value).__name__


def collect_launches(modules: list[str] | None = None) -> list[Launch]:
    """Run every module's compile cases under the launch hook; return the distinct launches."""
    import torch

    from fastft.kernels import _launch

    launches: dict[tuple, Launch] = {}

    def hook(kernel, grid, args, kwargs):
        sig = tuple(_describe(a) for a in args)
        consts = tuple(sorted((k, v) for k, v in kwargs.items()))
        key = (kernel.fn.__name__, sig, consts)
        launches.setdefault(key, Launch(kernel, args, dict(kwargs), key))

    with _launch.launch_hook(hook), torch.no_grad():
        for name in modules or KERNEL_MODULES:
            importlib.import_module(name).compile_cases()
    return list(launches.values())


def _ptxas(arch: int) -> str:
    """The ptxas triton itself uses for ``arch``: the wheel ships two (triton 3.9 assembles sm_90 with the newer one,
    whose PTX ISA the legacy ``bin/ptxas`` rejects), and ``get_ptxas(arch)`` says which."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        return get_ptxas(arch).path
    except (ImportError, AttributeError, TypeError):  # an older triton: one ptxas for every arch
        import triton

        return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")


def _ptxas_usage(ptx: str, arch: int) -> tuple[int, int]:
    """(registers, spill bytes) from ``ptxas -v`` on the PTX triton produced."""
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        suffix = "a" if arch == 90 else ""
        out = subprocess.run(
            [_ptxas(arch), "-v", f"--gpu-name=sm_{arch}{suffix}", src, "-o", os.path.join(tmp, "k.cubin")],
            capture_output=True,
            text=True,
            check=True,
        ).stderr
    regs = re.search(r"Used (\d+) registers", out)
    spills = [int(m) for m in re.findall(r"(\d+) bytes spill (?:stores|loads)", out)]
    return (int(regs.group(1)) if regs else -1), sum(spills)


def compile_launch(launch: Launch, arch: int) -> Row:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    kernel, args, kwargs = launch.kernel, launch.args, launch.kwargs
    name = kernel.fn.__name__
    consts = ",".join(f"{k}={v}" for k, v in launch.key[2])
    variant = f"({','.join(s for s in launch.key[1] if s != 'int' and s != 'float' and s != 'bool')}) {consts}"
    start = time.perf_counter()
    try:
        target = GPUTarget("cuda", arch, 32)
        backend = make_backend(target)
        binder = create_function_from_signature(kernel.signature, kernel.params, backend)
        bound, specialization, options = binder(*args, **kwargs)
        options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, specialization, options)
        compiled = triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=target, options=options.__dict__)
        regs, spills = _ptxas_usage(compiled.asm["ptx"], arch)
        return Row(name, variant, arch, True, regs, spills, compiled.metadata.shared, time.perf_counter() - start)
    except Exception as exc:  # noqa: BLE001 - report every failure, keep compiling the rest
        first = str(exc).strip().splitlines()
        return Row(
            name,
            variant,
            arch,
            False,
            seconds=time.perf_counter() - start,
            error=f"{type(exc).__name__}: {first[0] if first else ''}"[:300],
        )


def run(archs: list[int], modules: list[str] | None = None) -> list[Row]:
    rows = []
    for launch in collect_launches(modules):
        for arch in archs:
            rows.append(compile_launch(launch, arch))
    return rows


def format_table(rows: list[Row]) -> str:
    lines = [f"{'kernel':<34} {'variant':<58} {'arch':>5} {'regs':>5} {'spill':>6} {'smem':>7} {'s':>5}  status"]
    for r in rows:
        status = "ok" if r.ok else f"FAILED {r.error}"
        regs = "-" if r.registers is None else str(r.registers)
        spill = "-" if r.spill_bytes is None else str(r.spill_bytes)
        smem = "-" if r.shared_bytes is None else str(r.shared_bytes)
        lines.append(
            f"{r.kernel:<34} {r.variant[:58]:<58} {'sm_' + str(r.arch):>5} {regs:>5} {spill:>6} {smem:>7} "
            f"{r.seconds:5.2f}  {status}"
        )
    failed = sum(not r.ok for r in rows)
    kernels = len({(r.kernel, r.variant) for r in rows})
    lines.append(
        f"{kernels} kernel variants x {len({r.arch for r in rows})} archs: {len(rows) - failed} compiled, {failed} failed"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="75,80,90", help="comma-separated SM versions, e.g. 75,80,90")
    parser.add_argument("--module", action="append", help="only these kernel modules (default: all)")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        # Under the interpreter triton never builds JIT functions; re-run in a clean process.
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        return subprocess.call([sys.executable, "-m", "fastft.kernels.compile_check", *(argv or sys.argv[1:])], env=env)
    archs = [int(a) for a in args.arch.split(",") if a.strip()]
    rows = run(archs, args.module)
    print(format_table(rows))
    return 0 if rows and all(r.ok for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
