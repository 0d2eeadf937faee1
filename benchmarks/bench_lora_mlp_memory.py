"""Memory of one Llama MLP block with LoRA on gate/up/down: fused (fastft.kernels.lora) vs PEFT eager.

What is measured (CPU, fp32, the plain torch path of every fastft op -- not the Triton kernels, not a GPU):
  * peak live bytes over forward+backward, counted at the dispatcher by fastft.memory.LiveBytesTracker, with the
    weights and the input charged up front (so "peak - weights - input" is what the block itself allocates);
  * bytes saved for backward: the unique storages packed by torch.autograd.graph.saved_tensors_hooks during the
    forward, parameters excluded (the input X is included for every variant: each of them saves it);
  * CPU wall time of forward+backward (median of a few runs; a CPU figure, not a GPU one).

Run:  python benchmarks/bench_lora_mlp_memory.py [--tokens 2048 --hidden 1024 --intermediate 2816 --r 16]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

os.environ.pop("TRITON_INTERPRET", None)  # plain torch path: what a CPU user runs

import torch
import torch.nn as nn
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model

from fastft.kernels import path_counts
from fastft.memory import LiveBytesTracker
from fastft.patches.peft_lora import lora_mlp


class LlamaMLP(nn.Module):
    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x):  # Hugging Face LlamaMLP, verbatim math
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def saved_bytes(fn, x, params) -> int:
    param_storages = {p.untyped_storage()._cdata for p in params}
    seen: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        if s._cdata not in param_storages:
            seen[s._cdata] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = fn(x)
    del y
    return sum(seen.values())


def measure(name, fn, x, dy, params):
    saved = saved_bytes(fn, x, params)
    with LiveBytesTracker() as t:
        t.add_existing(params, "weights")
        t.add_existing([x, dy], "input")
        with t.in_phase("forward"):
            y = fn(x)
        fwd_peak = t.peak_bytes
        with t.in_phase("backward"):
            y.backward(dy)
        del y
    fixed = sum(t.untyped_storage().nbytes() for t in [*params, x, dy])
    times = []
    for _ in range(3):
        for p in params:
            p.grad = None
        x.grad = None
        start = time.perf_counter()
        fn(x).backward(dy)
        times.append(time.perf_counter() - start)
    return dict(
        name=name,
        saved=saved,
        peak=t.peak_bytes,
        peak_block=t.peak_bytes - fixed,
        fwd_peak_block=fwd_peak - fixed,
        seconds=statistics.median(times),
    )


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--intermediate", type=int, default=2816)
    ap.add_argument("--r", type=int, default=16)
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = get_peft_model(
        LlamaMLP(args.hidden, args.intermediate),
        LoraConfig(
            r=args.r,
            lora_alpha=2 * args.r,
            lora_dropout=0.0,
            init_lora_weights=False,
            target_modules=["gate_proj", "up_proj", "down_proj"],
        ),
    )
    mlp = model.base_model.model
    params = list(mlp.parameters())
    x = torch.randn(args.tokens, args.hidden, requires_grad=True)
    dy = torch.randn(args.tokens, args.hidden)

    rows = [measure("PEFT eager (HF LlamaMLP)", mlp, x, dy, params)]
    for mode in ("activation", "projections"):
        fused = lambda t, mode=mode: lora_mlp(mlp, t, "silu", recompute=mode)
        rows.append(measure(f"fused, recompute={mode}", fused, x, dy, params))
    assert path_counts[("swiglu", "torch")] > 0 and path_counts[("swiglu", "triton")] == 0  # plain torch path ran
    mib = 2**20
    ti = args.tokens * args.intermediate * 4
    xb = x.untyped_storage().nbytes()
    print(f"command: {' '.join([os.path.basename(sys.executable), *sys.argv])}")
    print(
        f"Llama MLP + LoRA r={args.r} on gate/up/down, tokens={args.tokens}, hidden={args.hidden}, "
        f"intermediate={args.intermediate}, fp32, CPU, plain torch path (no Triton), 1 thread"
    )
    print(f"one [tokens, intermediate] fp32 activation = {ti / mib:.1f} MiB; input X = {xb / mib:.1f} MiB")
    header = [
        "variant",
        "saved for bwd MiB",
        "vs PEFT",
        "excl. X",
        "peak fwd MiB",
        "peak fwd+bwd MiB",
        "incl. weights+X+dY MiB",
        "CPU s fwd+bwd",
    ]
    print(" | ".join(header))
    base = rows[0]["saved"]
    for r in rows:
        cells = [
            r["name"],
            f"{r['saved'] / mib:.1f}",
            f"{r['saved'] / base:.3f}",
            f"{(r['saved'] - xb) / (base - xb):.3f}",
            f"{r['fwd_peak_block'] / mib:.1f}",
            f"{r['peak_block'] / mib:.1f}",
            f"{r['peak'] / mib:.1f}",
            f"{r['seconds']:.3f}",
        ]
        print(" | ".join(cells))
    # How much of the fused backward peak is the activation op's own torch-path scratch (fp32 chunks it allocates on
    # CPU; the Triton kernel streams through registers and allocates none).
    g, u, dh = (torch.randn(args.tokens, args.intermediate) for _ in range(3))
    with LiveBytesTracker() as t:
        t.add_existing([g, u, dh], "input")
        torch.ops.fastft.glu_backward_inplace(dh, g, u, "silu")
    scratch = t.peak_bytes - 3 * ti
    print(
        f"of which the SwiGLU backward's torch-path scratch (absent on the Triton path): {scratch / mib:.1f} MiB "
        f"(measured: glu_backward_inplace alone on [{args.tokens}, {args.intermediate}])"
    )
    print(
        "saved for bwd: unique non-parameter storages packed by saved_tensors_hooks (includes X for every variant); "
        "peak fwd / fwd+bwd: fastft.memory.LiveBytesTracker peak minus weights, X and dY; CPU seconds are noisy "
        "(2 shared cores)."
    )


if __name__ == "__main__":
    main()
