"""CPU step time and measured peak of fastft's fused expert MLP vs transformers' own MoE block (torch path).

transformers is measured two ways: its eager loop over experts (what a block built standalone runs:
``config._experts_implementation`` None) and its grouped path, ``"grouped_mm"`` (transformers 5.24's default for a
model loaded with from_pretrained / from_config: sort, gather, grouped GEMM, reshape-sum). The table says whether the
grouped path ran torch's grouped_mm kernel or transformers' own fallback for it (``_can_use_grouped_mm``).

Not a test. Plain CPU, no interpreter: fastft takes its torch path (the per-expert loop in grouped_gemm's
_forward_torch, the same memory algorithm as the kernel), so this measures the algorithm's memory and CPU time, not a
GPU. Peak = fastft.memory.LiveBytesTracker peak over forward + backward, weights excluded.

    .venv/bin/python benchmarks/bench_moe_cpu.py [--out benchmarks/results/moe_cpu.md]
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from fastft.kernels import INTERPRETER, moe, path_counts
from fastft.memory import LiveBytesTracker


def _block(family: str, hidden: int, inter: int, experts: int, top_k: int):
    if family == "qwen3_moe":
        from transformers import Qwen3MoeConfig
        from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock as cls

        cfg = Qwen3MoeConfig(hidden_size=hidden, moe_intermediate_size=inter, num_experts=experts,
                             num_experts_per_tok=top_k)  # fmt: skip
    elif family == "mixtral":
        from transformers import MixtralConfig
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock as cls

        cfg = MixtralConfig(hidden_size=hidden, intermediate_size=inter, num_local_experts=experts,
                            num_experts_per_tok=top_k)  # fmt: skip
    else:
        from transformers import GptOssConfig
        from transformers.models.gpt_oss.modeling_gpt_oss import GptOssMLP as cls

        cfg = GptOssConfig(hidden_size=hidden, intermediate_size=inter, num_local_experts=experts,
                           num_experts_per_tok=top_k)  # fmt: skip
    torch.manual_seed(0)
    block = cls(cfg)
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn_like(p) * 0.02)
    return block


def _step(block, x, forward):
    x = x.detach().clone().requires_grad_()
    out = forward(x)
    out = out[0] if isinstance(out, tuple) else out
    out.float().square().mean().backward()


def _measure(block, x, forward, repeats: int):
    _step(block, x, forward)  # warm-up
    times = []
    for _ in range(repeats):
        block.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        _step(block, x, forward)
        times.append(time.perf_counter() - t0)
    block.zero_grad(set_to_none=True)
    with LiveBytesTracker() as tracker:
        _step(block, x, forward)
    return sorted(times)[len(times) // 2], tracker.peak_bytes


def _grouped_calls() -> tuple[dict[str, int], object]:
    """Count, per call of transformers' grouped GEMM, whether torch's grouped_mm kernel or the fallback ran."""
    import transformers.integrations.moe as tmoe

    counts = {"kernel": 0, "fallback": 0}
    original = tmoe._can_use_grouped_mm

    def counted(*args, **kwargs):
        usable = original(*args, **kwargs)
        counts["kernel" if usable else "fallback"] += 1
        return usable

    tmoe._can_use_grouped_mm = counted
    return counts, lambda: setattr(tmoe, "_can_use_grouped_mm", original)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=None)
    parser.add_argument("--note", default="", help="a line appended to the table (e.g. the machine's load)")
    args = parser.parse_args()
    if INTERPRETER:
        raise SystemExit("run without TRITON_INTERPRET=1: this benchmarks the torch path")
    shape = dict(hidden=512, inter=256, experts=16, top_k=4)
    rows = []
    for family in ("qwen3_moe", "mixtral", "gpt_oss"):
        block = _block(family, **shape)
        x = torch.randn(1, args.tokens, shape["hidden"])
        t_ref, p_ref = _measure(block, x, block, args.repeats)
        with torch.no_grad():
            want = block(x)
        block.experts.config._experts_implementation = "grouped_mm"
        counts, restore = _grouped_calls()
        try:
            with torch.no_grad():
                got = block(x)
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)  # the same function as the loop
            t_grp, p_grp = _measure(block, x, block, args.repeats)
        finally:
            restore()
            block.experts.config._experts_implementation = None
        assert counts["kernel"] + counts["fallback"] > 0, "transformers' grouped path did not run"
        grouped_via = (
            "torch grouped_mm" if not counts["fallback"] else ("transformers fallback" if not counts["kernel"] else "mixed")
        )
        path_counts.clear()
        t_fast, p_fast = _measure(block, x, lambda h, b=block: moe.fused_moe_forward(b, h), args.repeats)
        assert path_counts[("grouped_gemm", "torch")] > 0, "fastft's torch path did not run"
        rows.append((family, t_ref, t_grp, t_fast, p_ref, p_grp, p_fast, grouped_via))
    lines = [
        "# Fused expert MLP vs transformers' MoE block, CPU (torch path, measured)",
        "",
        f"Command: `.venv/bin/python benchmarks/bench_moe_cpu.py --tokens {args.tokens} --repeats {args.repeats}`",
        f"Shape: {args.tokens} tokens, hidden {shape['hidden']}, expert intermediate {shape['inter']}, "
        f"{shape['experts']} experts, top-{shape['top_k']}, fp32, forward + backward of mean(out^2); "
        f"{os.cpu_count()} CPU threads. Median of {args.repeats} steps; peak = LiveBytesTracker, activations and "
        "gradients (weights excluded). CPU figures, not GPU figures.",
        "",
        "| family | transformers loop step (ms) | transformers grouped_mm step (ms) | fastft step (ms) | "
        "loop peak (MiB) | grouped_mm peak (MiB) | fastft peak (MiB) | grouped path ran |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for family, t_ref, t_grp, t_fast, p_ref, p_grp, p_fast, via in rows:
        lines.append(
            f"| {family} | {t_ref * 1e3:.1f} | {t_grp * 1e3:.1f} | {t_fast * 1e3:.1f} | {p_ref / 2**20:.2f} | "
            f"{p_grp / 2**20:.2f} | {p_fast / 2**20:.2f} | {via} |"
        )
    if args.note:
        lines += ["", args.note]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
