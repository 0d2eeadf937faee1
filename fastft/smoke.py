"""A CPU smoke run of every fused kernel through both of its paths, printing what ran.

Until the full offline demo lands, this is what ``fastft demo`` runs: each kernel on small CPU tensors through the
torch path and through its Triton kernel under the Triton interpreter (in a child process, because the interpreter
must be switched on before triton is imported), compared with its reference.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import torch


def _check_all() -> list[tuple[str, float]]:
    from fastft.kernels import rms_norm, rms_norm_reference

    results = []
    torch.manual_seed(0)
    for gemma in (False, True):
        x = torch.randn(7, 1000, requires_grad=True)
        w = (torch.rand(1000) + 0.5).requires_grad_()
        y = rms_norm(x, w, gemma=gemma)
        y_ref = rms_norm_reference(x, w, gemma=gemma)
        g = torch.randn_like(y)
        dx, dw = torch.autograd.grad(y, (x, w), g)
        dx_ref, dw_ref = torch.autograd.grad(y_ref, (x, w), g)
        err = max((y - y_ref).abs().max().item(), (dx - dx_ref).abs().max().item(), (dw - dw_ref).abs().max().item())
        results.append((f"rms_norm(gemma={gemma}) fwd+bwd", err))
    return results


def _report(label: str) -> int:
    from fastft.kernels import path_counts

    start = time.perf_counter()
    results = _check_all()
    bad = 0
    for name, err in results:
        ok = err < 1e-4
        bad += not ok
        print(f"  [{label}] {name:<36} max |diff| vs reference = {err:.2e}  {'ok' if ok else 'MISMATCH'}")
    paths = ", ".join(f"{op}:{path}={n}" for (op, path), n in sorted(path_counts.items()))
    print(f"  [{label}] paths taken: {paths}  ({time.perf_counter() - start:.2f} s)")
    return bad


def run_smoke() -> int:
    print(f"fastft smoke run on CPU (torch {torch.__version__}); kernels vs their torch references")
    if os.environ.get("TRITON_INTERPRET") == "1":
        return 1 if _report("triton interpreter") else 0
    bad = _report("torch path")
    env = dict(os.environ, TRITON_INTERPRET="1")
    child = subprocess.run([sys.executable, "-c", "import sys, fastft.smoke as s; sys.exit(s.run_child())"], env=env)
    return 1 if bad or child.returncode else 0


def run_child() -> int:
    return 1 if _report("triton interpreter") else 0
