"""Modeled memory report: Llama-3.1-8B QLoRA r=32 (all linear layers), batch 1, padded sequences.

MODELED, not measured on a GPU: every figure is the peak of LiveBytesTracker over one training step run on meta
tensors by fastft.memory.step_model (see its docstring for what is modelled). Writes
benchmarks/results/memory_report.md and two PNG plots. Run: python benchmarks/bench_memory_report.py
"""

from __future__ import annotations

import time
from pathlib import Path

from fastft.memory.model_configs import load_config
from fastft.memory.plan import Planner
from fastft.memory.step_model import StepSpec

MODEL = "Llama-3.1-8B"
R = 32
OPTIM = "adamw_8bit"
GPUS_GB = [8, 12, 16, 24, 40, 48, 80]
SEQ_LENS = [1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072]
UNSLOTH = {8: 2972, 12: 21848, 16: 40724, 24: 78475, 40: 153977, 48: 191728, 80: 342733}
HF_FA2 = {8: None, 12: 932, 16: 2551, 24: 5789, 40: 12264, 48: 15502, 80: 28454}
RESERVE = 2**30  # fastft plan's default --reserve (CUDA context, workspaces, allocator slack)
COLAB_GPU, COLAB_HOST = 15_360 * 2**20, 12 * 10**9  # free Colab: T4 as nvidia-smi reports it, ~12 GB host RAM
OUT = Path(__file__).resolve().parent / "results"
VARIANTS = {  # name -> (StepSpec kwargs, fastft plan flags)
    "fastft": (dict(variant="fastft"), ""),
    "fastft+tiled": (dict(variant="fastft", tiled_mlp=True), " --tiled-mlp"),
    "fastft+tiled+emb": (
        dict(variant="fastft", tiled_mlp=True, offload_embeddings=True),
        " --tiled-mlp --offload-embeddings",
    ),
    "baseline": (dict(variant="baseline"), " --baseline"),
}
FAST = [v for v in VARIANTS if v.startswith("fastft")]
BEST = "fastft+tiled+emb"


def cmd(variant: str, gpu: str | None = None, seq: int = 8192, extra: str = "") -> str:
    mem = f" --gpu-memory {gpu}" if gpu else ""
    return (
        f"fastft plan --model {MODEL} --load-in-4bit --lora-r {R} --optim {OPTIM} --seq-len {seq}{mem}"
        f"{VARIANTS[variant][1]}{extra}"
    )


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    config = load_config(MODEL)
    planners = {
        v: Planner(config, StepSpec(load_in_4bit=True, lora_r=R, optim=OPTIM, **kw)) for v, (kw, _) in VARIANTS.items()
    }
    t0 = time.perf_counter()
    curve = {v: {t: p.step(t) for t in SEQ_LENS} for v, p in planners.items()}
    ctx = {v: {gb: p.max_context(gb * 2**30 - RESERVE) for gb in GPUS_GB} for v, p in planners.items()}
    base0 = {gb: planners["baseline"].max_context(gb * 2**30) for gb in GPUS_GB}  # tensor-only (reserve 0)
    colab = {v: planners[v].max_context(COLAB_GPU - RESERVE, COLAB_HOST) for v in planners}
    colab_gpu_only = {v: planners[v].max_context(COLAB_GPU - RESERVE) for v in planners}
    elapsed = time.perf_counter() - t0
    host = {gb: planners[BEST].step(ctx[BEST][gb]).host_bytes if ctx[BEST][gb] else 0 for gb in GPUS_GB}

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for v, style in (("fastft", "o-"), ("fastft+tiled", "v-"), ("fastft+tiled+emb", "^-"), ("baseline", "s--")):
        ax.plot(SEQ_LENS, [curve[v][t].peak_bytes / 2**30 for t in SEQ_LENS], style, label=v)
    for gb in (8, 16, 24, 40, 80):
        ax.axhline(gb, color="grey", lw=0.5)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log", base=2)
    ax.set_xlabel("sequence length (tokens)")
    ax.set_ylabel("modeled peak GPU tensor memory (GiB)")
    ax.set_title(f"{MODEL} QLoRA r={R}, batch 1 (MODELED, meta tensors)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(OUT / "memory_peak_vs_seq.png", dpi=120)

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    xs = range(len(GPUS_GB))
    series = [(f"{v} (modeled)", ctx[v]) for v in VARIANTS] + [
        ("Unsloth (published)", UNSLOTH),
        ("transformers+FA2 (published)", HF_FA2),
    ]
    width = 0.8 / len(series)
    for i, (name, vals) in enumerate(series):
        ax.bar([x + (i - (len(series) - 1) / 2) * width for x in xs], [vals[g] or 0 for g in GPUS_GB], width, label=name)
    ax.set_xticks(list(xs), [f"{g} GiB" for g in GPUS_GB])
    ax.set_yscale("log")
    ax.set_ylabel("max sequence length (tokens)")
    ax.set_title(f"{MODEL} QLoRA r={R}: max context per GPU size (1 GiB reserve)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(OUT / "max_context_per_gpu.png", dpi=120)

    gib = lambda b: f"{b / 2**30:.2f}"
    num = lambda n: "OOM" if not n else f"{n:,}"
    notes = sorted({n for p in planners.values() for n in p.model.notes})
    lines = [
        f"# Memory report: {MODEL}, 4-bit QLoRA r={R} on all linear layers, batch 1, {OPTIM} (MODELED)",
        "",
        "All figures are **modeled**: the peak of `fastft.memory.LiveBytesTracker` over one training step run on meta",
        "tensors by `fastft.memory.step_model` (real transformers model; FlashAttention-2-like attention memory; NF4",
        "weights as bitsandbytes stores them with double quantization; LoRA fp32 adapters used in bf16; gradient",
        "checkpointing per decoder layer; steady-state optimizer state). The step model agrees with the measured peak",
        "of the same step on real CPU tensors within 5% (exactly, at the sizes tested), fused kernels included",
        "(tests/memory/test_validation.py). Nothing here was run on a GPU. Generated by",
        f"`python benchmarks/bench_memory_report.py` in {elapsed:.0f} s of modeling (CPU).",
        "",
        "- **fastft**: what `FastModel` does by default: `patch_model` fused kernels (their fake impls), chunked",
        "  linear cross-entropy, fused LoRA MLP and q/k/v/o (`fastft.kernels.lora`'s autograd functions, NF4",
        "  dequantized into shared buffers), checkpointed layer inputs offloaded to host RAM.",
        "- **fastft+tiled**: plus `from_pretrained(tiled_mlp=True)` (`--tiled-mlp`): MLPs run in 4,096-token tiles",
        "  for longer sequences (one extra MLP forward per layer in the backward).",
        "- **fastft+tiled+emb**: plus `get_peft_model(offload_embeddings=True)` (`--offload-embeddings`): the frozen",
        "  input embedding (1.05 GB) in host RAM.",
        "- **baseline**: transformers + PEFT LoRA (with PEFT's 4-bit `clone()`), standard (non-offloaded)",
        "  checkpointing, full logits upcast to fp32 by transformers' loss, embed/lm_head upcast to fp32 by",
        "  `prepare_model_for_kbit_training`.",
        "",
        "Notes: " + "; ".join(notes),
        "",
        "## Peak vs sequence length (tensor peak, no reserve)",
        "",
        "![peak vs seq](memory_peak_vs_seq.png)",
        "",
        "| tokens | "
        + " | ".join(f"{v} (GiB)" for v in VARIANTS)
        + " | host RAM "
        + BEST
        + " (GiB) | "
        + " | ".join(f"{v} / baseline" for v in FAST)
        + " |",
        "|---:|" + "---:|" * (len(VARIANTS) + 1 + len(FAST)),
    ]
    for t in SEQ_LENS:
        base = curve["baseline"][t].peak_bytes
        lines.append(
            f"| {t:,} | "
            + " | ".join(gib(curve[v][t].peak_bytes) for v in VARIANTS)
            + f" | {gib(curve[BEST][t].host_bytes)} | "
            + " | ".join(f"{curve[v][t].peak_bytes / base:.1%}" for v in FAST)
            + " |"
        )
    lines += [
        "",
        "Commands: " + ", ".join(f"`{cmd(v, seq=8192)}`" for v in VARIANTS) + " (any `--seq-len`).",
        "",
        "Breakdown at 8,192 tokens (GiB, what is alive at the peak, by the phase that allocated it):",
        "",
    ]
    for v in VARIANTS:
        r = curve[v][8192]
        parts = ", ".join(f"{k} {gib(n)}" for k, n in sorted(r.breakdown.items(), key=lambda kv: -kv[1]) if n > 2**20)
        lines.append(f"- {v}: peak {gib(r.peak_bytes)}: {parts}")
    lines += [
        "",
        "## Max context per GPU size",
        "",
        "![max context](max_context_per_gpu.png)",
        "",
        "GPU sizes are GiB (2^30 bytes); the search leaves `fastft plan`'s default 1 GiB reserve (CUDA context,",
        "workspaces, allocator slack) and is not bounded by host RAM here (the host RAM the offloaded tensors",
        "need is given; see the Colab row below for a bounded search). `baseline, no reserve` is the",
        "tensor-only search. The published rows are Unsloth's table (unsloth.ai/blog/llama3-3, Dec 2024,",
        "measured on GPUs, so they include the CUDA context); both published rows are exactly linear in",
        "memory, so they were extrapolated from a few measurements.",
        "",
        "| GPU | " + " | ".join(VARIANTS) + f" | host RAM {BEST} | baseline, no reserve | Unsloth (published) "
        "| transformers+FA2 (published) | "
        + " | ".join(f"{v} / Unsloth" for v in FAST)
        + " | baseline / published HF (no reserve) | command |",
        "|---:|" + "---:|" * (len(VARIANTS) + 4 + len(FAST)) + "---|",
    ]
    for gb in GPUS_GB:
        b = ctx["baseline"][gb]
        hf = HF_FA2[gb]
        ratio = f"{b / hf:.2f} ({base0[gb] / hf:.2f})" if hf and b else ("both OOM" if not hf and not b else "-")
        lines.append(
            f"| {gb} GiB | "
            + " | ".join(num(ctx[v][gb]) for v in VARIANTS)
            + f" | {gib(host[gb])} GiB | {num(base0[gb])} | {UNSLOTH[gb]:,} | {num(hf)} | "
            + " | ".join(f"{ctx[v][gb] / UNSLOTH[gb]:.2f}x" for v in FAST)
            + f" | {ratio} | `{cmd(BEST, f'{gb}GiB')} --baseline` |"
        )
    lines += [
        "",
        "What dominates fastft's peak at its modeled max context (largest four phases; a shortfall vs",
        "1.2x Unsloth, if any, is marked):",
        "",
    ]
    for v in ("fastft", BEST):
        for gb in GPUS_GB:
            t = ctx[v][gb]
            if t:
                r = planners[v].step(t)
                top = sorted(r.breakdown.items(), key=lambda kv: -kv[1])[:4]
                short = " **(short of 1.2x Unsloth)**" if t < 1.2 * UNSLOTH[gb] else ""
                lines.append(f"- {v}, {gb} GiB at {t:,} tokens{short}: " + ", ".join(f"{k} {gib(n)} GiB" for k, n in top))
    lines += [
        "",
        "## A free Colab T4: 15,360 MiB GPU (as nvidia-smi reports it), ~12 GB host RAM",
        "",
        "| variant | max context, GPU only | max context, GPU and 12 GB host RAM | host RAM at that length |",
        "|---|---:|---:|---:|",
    ]
    for v in VARIANTS:
        n = colab[v]
        hb = planners[v].step(n).host_bytes if n else 0
        lines.append(f"| {v} | {num(colab_gpu_only[v])} | {num(n)} | {hb / 1e9:.2f} GB |")
    lines += [
        "",
        f"Command: `{cmd(BEST, 'T4')} --host-memory 12GB --baseline`. When host RAM is the limit,",
        "fastft's offloaded checkpoints (one bf16 [T, 4096] layer input per layer: 256 KiB per token for 32",
        "layers) are what fill it. The 12 GB is the issue's figure for the whole machine; the training process",
        "itself (torch, CUDA libraries, data) takes a few GB of it, so pass what is really free as `--host-memory`.",
    ]
    n_steps = sum(len(p.cache) for p in planners.values())
    lines += [
        "",
        f"Modeling time: {time.perf_counter() - t0:.0f} s for {n_steps} modeled steps (cache shared across "
        "GPU sizes), on a shared 2-core CPU.",
        "",
        "Measured (not modeled) CPU step time and peak bytes of a small model, fastft vs transformers+PEFT vs",
        "Liger-Kernel: [small_model_cpu.md](small_model_cpu.md).",
    ]
    (OUT / "memory_report.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
