"""Per-kernel speed at Llama-3.1-8B shapes: fastft vs torch eager vs torch.compile vs Liger-Kernel (where it imports).

Each op is timed forward alone and forward + backward with ``triton.testing.do_bench`` (median ms) on CUDA. Achieved
bandwidth is the op's ideal traffic (every input read once, every output written once: the fused minimum) divided
by the time, shown against the GPU's published HBM peak; the loss-with-LM-head ops are GEMM-bound, so they report
TFLOP/s instead. The torch.compile column compiles the reference (the same math, unfused).

``--dry-run`` (the CI test): tiny shapes on CPU under the Triton interpreter, wall-clock timing, torch.compile with the
cheap ``aot_eager`` backend; its figures exercise the code and mean nothing about speed.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch

#: Published HBM bandwidth, bytes/s (SXM parts where there are two).
PEAK_BANDWIDTH = {
    "H200": 4.8e12,
    "H100": 3.35e12,
    "A100-SXM4-80GB": 2.039e12,
    "A100-SXM4-40GB": 1.555e12,
    "A100": 1.555e12,
    "L4": 0.3e12,
    "T4": 0.32e12,
}

SHAPES_8B = dict(
    tokens=8192, hidden=4096, intermediate=14336, vocab=128256, heads=32, kv_heads=8, head_dim=128, ce_tokens=4096
)
SHAPES_DRY = dict(tokens=16, hidden=96, intermediate=176, vocab=1000, heads=4, kv_heads=2, head_dim=16, ce_tokens=16)


def peak_bandwidth(name: str) -> float | None:
    for key in sorted(PEAK_BANDWIDTH, key=len, reverse=True):
        if key.replace("-", " ").lower() in name.replace("-", " ").lower():
            return PEAK_BANDWIDTH[key]
    return None


def _timer(dry_run: bool) -> Callable[[Callable[[], Any], list[torch.Tensor]], float]:
    if not dry_run:
        from triton.testing import do_bench

        def median_ms(fn, leaves):
            # warmup/rep are milliseconds of GPU time; grad_to_none keeps gradients from accumulating across reps
            result = do_bench(fn, warmup=10, rep=40, grad_to_none=leaves or None, quantiles=[0.5])
            return float(result[0] if isinstance(result, (list, tuple)) else result)

        return median_ms

    def wall(fn, leaves):
        # one call: the dry run proves the code path, and its time (interpreter, CPU) is no speed figure anyway
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3

    return wall


def _ops(s: dict, device: str) -> list[dict]:
    """Each op: make() -> (inputs needing grad, other args), the implementations, traffic bytes or FLOPs."""
    from fastft import kernels as K

    bf16 = torch.bfloat16
    T, H, F, V = s["tokens"], s["hidden"], s["intermediate"], s["vocab"]
    ct = s["ce_tokens"]

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, device=device) * scale).to(bf16)

    def liger(name):
        def get():
            if name == "rms_norm":
                from liger_kernel.transformers.rms_norm import LigerRMSNorm

                def fn(x, w):
                    m = LigerRMSNorm(H, eps=1e-5).to(device=device, dtype=bf16)
                    m.weight = torch.nn.Parameter(w, requires_grad=w.requires_grad)
                    return m(x)

                return fn
            if name == "swiglu":
                from liger_kernel.ops.swiglu import LigerSiLUMulFunction

                return LigerSiLUMulFunction.apply
            if name == "rope":
                from liger_kernel.transformers.rope import liger_rotary_pos_emb

                return liger_rotary_pos_emb
            if name == "cross_entropy":
                from liger_kernel.transformers.cross_entropy import LigerCrossEntropyLoss

                return LigerCrossEntropyLoss()
            if name == "linear_cross_entropy":
                from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss

                loss = LigerFusedLinearCrossEntropyLoss()
                return lambda h, w, y: loss(w, h, y)
            raise KeyError(name)

        return get

    pos = torch.arange(T, device=device).float()
    inv = 1.0 / (500000.0 ** (torch.arange(0, s["head_dim"], 2, device=device).float() / s["head_dim"]))
    emb = torch.cat([torch.outer(pos, inv)] * 2, -1)[None]
    cos, sin = emb.cos().to(bf16), emb.sin().to(bf16)
    labels = torch.randint(0, V, (ct,), device=device)
    q_el = s["heads"] * T * s["head_dim"]
    k_el = s["kv_heads"] * T * s["head_dim"]
    return [
        dict(
            name="rms_norm",
            shape=f"[{T}, {H}] bf16",
            make=lambda: ([rnd(T, H, scale=3.0)], [(1 + torch.randn(H, device=device) * 0.1).to(bf16)]),
            fastft=lambda x, w: K.rms_norm(x, w, 1e-5),
            eager=lambda x, w: K.rms_norm_reference(x, w, 1e-5),
            liger=liger("rms_norm"),
            fwd_bytes=2 * T * H * 2,
            bwd_bytes=3 * T * H * 2,
        ),
        dict(
            name="swiglu",
            shape=f"[{T}, {F}] bf16",
            make=lambda: ([rnd(T, F), rnd(T, F)], []),
            fastft=K.swiglu,
            eager=K.swiglu_reference,
            liger=liger("swiglu"),
            fwd_bytes=3 * T * F * 2,
            bwd_bytes=5 * T * F * 2,
        ),
        dict(
            name="rope",
            shape=f"q [1, {s['heads']}, {T}, {s['head_dim']}], k [1, {s['kv_heads']}, ...] bf16",
            make=lambda: ([rnd(1, s["heads"], T, s["head_dim"]), rnd(1, s["kv_heads"], T, s["head_dim"])], [cos, sin]),
            fastft=K.apply_rope,
            eager=K.apply_rope_reference,
            liger=liger("rope"),
            fwd_bytes=2 * (q_el + k_el) * 2,
            bwd_bytes=2 * (q_el + k_el) * 2,
        ),
        dict(
            name="cross_entropy",
            shape=f"[{ct}, {V}] bf16 logits",
            make=lambda: ([rnd(ct, V, scale=4.0)], [labels]),
            fastft=K.cross_entropy,
            eager=K.cross_entropy_reference,
            liger=liger("cross_entropy"),
            fwd_bytes=ct * V * 2,
            bwd_bytes=2 * ct * V * 2,
        ),
        dict(
            name="linear_cross_entropy",
            shape=f"hidden [{ct}, {H}], lm_head [{V}, {H}] bf16 (frozen)",
            make=lambda: ([rnd(ct, H)], [rnd(V, H, scale=H**-0.5), labels]),
            fastft=K.linear_cross_entropy,
            eager=K.linear_cross_entropy_reference,
            liger=liger("linear_cross_entropy"),
            flops=4 * ct * H * V,
        ),
    ]


def _bench_one(fn: Callable, make: Callable, timer, backward: bool) -> float:
    grads, others = make()
    leaves = [g.detach().requires_grad_(backward) for g in grads]

    def forward():
        with torch.set_grad_enabled(backward):
            return fn(*leaves, *others)

    def fwd_bwd():
        out = forward()
        outs = out if isinstance(out, tuple) else (out,)
        torch.autograd.backward([o for o in outs], [torch.ones_like(o) for o in outs])

    return timer(fwd_bwd if backward else forward, leaves if backward else [])


def run(dry_run: bool, deadline: float) -> dict:
    device = "cpu" if dry_run else "cuda"
    shapes = SHAPES_DRY if dry_run else SHAPES_8B
    timer = _timer(dry_run)
    gpu = torch.cuda.get_device_name() if device == "cuda" else "cpu (dry run, Triton interpreter)"
    peak = peak_bandwidth(gpu) if device == "cuda" else None
    rows = []
    for op in _ops(shapes, device):
        impls: dict[str, Callable | None] = {"fastft": op["fastft"], "eager": op["eager"]}
        errors: dict[str, str] = {}
        try:
            impls["liger"] = op["liger"]()
        except Exception as exc:  # noqa: BLE001 - recorded in the report, never hidden
            errors["liger"] = f"does not import: {type(exc).__name__}: {exc}"[:300]
        # last: the slowest to set up (an inductor compile per graph), so a spent budget costs this column first
        impls["compile"] = torch.compile(op["eager"], backend="aot_eager" if dry_run else "inductor")
        for impl, fn in impls.items():
            for backward in (False, True):
                if op["name"] == "linear_cross_entropy" and not backward:
                    continue  # fastft computes the gradients inside the forward: only fwd+bwd compares like for like
                key = f"{impl}/{'fwd+bwd' if backward else 'fwd'}"
                if time.perf_counter() > deadline:
                    errors[key] = "skipped: the check's kernel-benchmark time budget ran out"
                    continue
                try:
                    ms = _bench_one(fn, op["make"], timer, backward)
                except Exception as exc:  # noqa: BLE001 - recorded in the report
                    errors[key] = f"{type(exc).__name__}: {exc}"[:300]
                    continue
                row = {
                    "op": op["name"],
                    "shape": op["shape"],
                    "impl": impl,
                    "pass": "fwd+bwd" if backward else "fwd",
                    "ms": round(ms, 4),
                }
                if "flops" in op:
                    row["tflops"] = round(op["flops"] / (ms * 1e-3) / 1e12, 1)
                else:
                    nbytes = op["fwd_bytes"] + (op["bwd_bytes"] if backward else 0)
                    row["gbps"] = round(nbytes / (ms * 1e-3) / 1e9, 1)
                    if peak:
                        row["pct_of_peak"] = round(100 * nbytes / (ms * 1e-3) / peak, 1)
                rows.append(row)
                if device == "cuda":
                    torch.cuda.empty_cache()
        if errors:
            rows.append({"op": op["name"], "errors": errors})
    return {
        "device": gpu,
        "peak_bandwidth_bytes_per_s": peak,
        "shapes": shapes,
        "timing": "wall clock, 1 call (dry run: not a speed figure)" if dry_run else "triton.testing.do_bench median",
        "rows": rows,
    }
