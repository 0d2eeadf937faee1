"""``fastft smoke``: a CPU smoke run of four fused kernels (RMSNorm, RoPE, SwiGLU, GeGLU) through both paths.

Each runs on small CPU tensors through the torch path and through its Triton kernel under the Triton interpreter
(in a child process, because the interpreter must be switched on before triton is imported), compared with its
reference. The other ops (cross-entropy, linear cross-entropy, selective log-softmax, LoRA, NF4) are covered by
tests/kernels, not here.
"""

from __future__ import annotations

import functools
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
    results += _check_rope_and_glu()
    return results


def _check_rope_and_glu() -> list[tuple[str, float]]:
    """RoPE (GQA 4:2, head_dim 64, 7 positions) and the gated MLP activations: max |diff| of outputs and grads."""
    from fastft.kernels import apply_rope, apply_rope_reference, geglu, geglu_reference, swiglu, swiglu_reference

    def fwd_bwd_err(fn, ref, *inputs):
        outs, refs = fn(*inputs), ref(*inputs)
        outs, refs = (outs, refs) if isinstance(outs, tuple) else ((outs,), (refs,))
        leaves = [t for t in inputs if t.requires_grad]
        grads = [torch.randn_like(o) for o in outs]
        got, want = torch.autograd.grad(outs, leaves, grads), torch.autograd.grad(refs, leaves, grads)
        return max((a - b).abs().max().item() for a, b in zip((*outs, *got), (*refs, *want), strict=True))

    angles = torch.arange(7.0)[:, None] / 10000 ** (torch.arange(0, 64, 2) / 64)
    cos, sin = torch.cat((angles, angles), -1).cos()[None], torch.cat((angles, angles), -1).sin()[None]
    q, k = torch.randn(2, 4, 7, 64, requires_grad=True), torch.randn(2, 2, 7, 64, requires_grad=True)
    results = [("rope(GQA 4:2) fwd+bwd", fwd_bwd_err(apply_rope, apply_rope_reference, q, k, cos, sin))]
    gate, up = torch.randn(5, 1000, requires_grad=True), torch.randn(5, 1000, requires_grad=True)
    results.append(("swiglu fwd+bwd", fwd_bwd_err(swiglu, swiglu_reference, gate, up)))
    for approximate in ("none", "tanh"):
        err = fwd_bwd_err(
            functools.partial(geglu, approximate=approximate),
            functools.partial(geglu_reference, approximate=approximate),
            gate,
            up,
        )
        results.append((f"geglu(approximate={approximate}) fwd+bwd", err))
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
