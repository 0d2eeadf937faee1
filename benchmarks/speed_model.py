"""Modeled (roofline) speedup of fastft over transformers + PEFT, per GPU: Llama-3.1-8B QLoRA r32 at 2K and 8K tokens.

    .venv/bin/python benchmarks/speed_model.py            # writes benchmarks/results/speed_model.md and .json

Nothing here runs on a GPU. For each variant (fastft; baseline = transformers + PEFT, standard checkpointing, full
fp32 logits) the step model (fastft.memory.step_model) runs one real training step on meta tensors with every layer
executed, and fastft.memory.speed_model counts each op's FLOPs and bytes; the roofline prices them on each GPU of its
table (published dense peaks, HBM bandwidth, a fixed per-launch overhead). Every figure is "modeled (roofline)": an
optimistic bound, to be calibrated by the measured step of benchmarks/gpu/check.sh.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from fastft.memory import speed_model  # noqa: E402
from fastft.memory.model_configs import load_config  # noqa: E402
from fastft.memory.step_model import StepModel, StepSpec  # noqa: E402

MODEL = "Llama-3.1-8B"
VARIANTS = ("fastft", "baseline")
TOP_GPUS = ("H200", "T4")  # whose top-op tables are printed: the check's GPU and the smallest


def measure(seq_lens: list[int], lora_r: int) -> dict:
    config = load_config(MODEL)
    runs = []
    for variant in VARIANTS:
        spec = StepSpec(variant=variant, load_in_4bit=True, lora_r=lora_r)
        t0 = time.perf_counter()
        model = StepModel(config, spec)
        build_s = time.perf_counter() - t0
        for n in seq_lens:
            t0 = time.perf_counter()
            result, counter = speed_model.count_step(model, n)
            count_s = time.perf_counter() - t0
            estimates = {g.name: dataclasses.asdict(speed_model.roofline(counter, g, n)) for g in speed_model.GPUS.values()}
            runs.append(
                {
                    "variant": variant,
                    "tokens": n,
                    "peak_bytes": result.peak_bytes,
                    "flops": counter.flops,
                    "bytes": counter.bytes,
                    "launches": counter.launches,
                    "build_seconds": round(build_s, 1),
                    "count_seconds": round(count_s, 1),
                    "estimates": estimates,
                    "notes": result.notes,
                }
            )
            print(f"{variant} {n} tokens: counted in {count_s:.1f} s (model built in {build_s:.1f} s)", flush=True)
    return {
        "model": MODEL,
        "mode": f"QLoRA r{lora_r} (NF4 + double quant, all linear layers), AdamW, batch 1",
        "label": speed_model.LABEL,
        "launch_overhead_s": speed_model.LAUNCH_OVERHEAD_S,
        "runs": runs,
        "gpus": {
            g.name: {"description": g.description, "tflops": g.tflops, "bandwidth": g.bandwidth}
            for g in speed_model.GPUS.values()
        },
    }


def render(data: dict, command: str, wall_s: float) -> str:
    runs = {(r["variant"], r["tokens"]): r for r in data["runs"]}
    lens = sorted({r["tokens"] for r in data["runs"]})
    label = data["label"]
    out = [
        f"# {label}: fastft vs transformers + PEFT, {data['model']} {data['mode']}",
        "",
        f"Command: `{command}` ({wall_s:.0f} s on a 2-core CPU, shared with other jobs; no GPU involved).",
        "",
        "Every number below is **modeled (roofline)**, not measured: the step model runs one real training step "
        "on meta tensors (every layer executed), each op's matrix-product FLOPs and HBM bytes are counted "
        "(fastft's fused ops as one op with their own inputs and outputs), and each op costs "
        "max(FLOPs / peak, bytes / bandwidth) + "
        f"{data['launch_overhead_s'] * 1e6:.0f} us launch overhead, at the GPU's published dense peak. Real "
        "kernels reach neither peak, and eager PyTorch adds CPU time per op, so real steps are slower; the ratio "
        "is the claim. benchmarks/gpu/check.sh prints the measured step beside this model for calibration.",
        "",
        "Baseline: transformers + PEFT LoRA on bitsandbytes NF4, standard gradient checkpointing, full logits "
        "upcast to fp32 (ForCausalLMLoss), fp32 embeddings/LM head (prepare_model_for_kbit_training). fastft: "
        "fused RMSNorm/RoPE/SwiGLU, fused LoRA with NF4 dequantized into shared buffers, chunked linear "
        "cross-entropy, offloaded checkpointing. Both: a FlashAttention-2-like attention, AdamW.",
        "",
        "## Modeled speedup per GPU",
        "",
        "Speedup = baseline s/step / fastft s/step. Where the baseline does NOT fit the GPU (modeled peak + 1 GiB "
        "reserve over its memory), its time is what it would take if it fitted: there, fastft is the only one "
        "of the two that runs at all.",
        "",
        "| GPU | tokens | fastft s/step | fastft tokens/s | baseline s/step | baseline tokens/s | speedup | "
        "modeled peak GB fastft / baseline |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name in data["gpus"]:
        for n in lens:
            f, b = runs[("fastft", n)], runs[("baseline", n)]
            fe, be = f["estimates"][name], b["estimates"][name]
            mem = speed_model.GPUS[name].memory_bytes - 2**30  # the plan's default 1 GiB reserve

            def fits(r: dict, mem: int = mem) -> str:
                return f"{r['peak_bytes'] / 1e9:.1f}" + ("" if r["peak_bytes"] <= mem else " (does NOT fit)")

            out.append(
                f"| {name} | {n:,} | {fe['step_seconds']:.3f} | {fe['tokens_per_s']:,.0f} | "
                f"{be['step_seconds']:.3f} | {be['tokens_per_s']:,.0f} | "
                f"**{be['step_seconds'] / fe['step_seconds']:.2f}x** | {fits(f)} / {fits(b)} |"
            )
    out += [
        "",
        "## What the step is made of (device-independent counts)",
        "",
        "| variant | tokens | TFLOP | GB moved | kernel launches | modeled peak memory GB | count time s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in data["runs"]:
        out.append(
            f"| {r['variant']} | {r['tokens']:,} | {r['flops'] / 1e12:.1f} | {r['bytes'] / 1e9:.1f} | "
            f"{r['launches']:,} | {r['peak_bytes'] / 1e9:.2f} | {r['count_seconds']} |"
        )
    out += ["", "## Which ops dominate (top 8 per variant, modeled time)", ""]
    for name in TOP_GPUS:
        for n in lens:
            for variant in VARIANTS:
                e = runs[(variant, n)]["estimates"][name]
                out += [
                    f"**{variant}, {n:,} tokens, {name}** ({label}: {e['step_seconds'] * 1e3:.1f} ms/step; "
                    f"compute-bound ops {e['compute_bound_seconds'] * 1e3:.1f} ms, memory-bound ops "
                    f"{e['memory_bound_seconds'] * 1e3:.1f} ms, launch overhead {e['overhead_seconds'] * 1e3:.1f} "
                    f"ms for {e['launches']:,} launches)",
                    "",
                    "| op | calls | TFLOP | GB | ms | share | compute-bound calls |",
                    "|---|---|---|---|---|---|---|",
                ]
                for o in e["top_ops"]:
                    out.append(
                        f"| {o['op']} | {o['calls']:,} | {o['flops'] / 1e12:.2f} | {o['bytes'] / 1e9:.2f} | "
                        f"{o['seconds'] * 1e3:.1f} | {o['seconds'] / e['step_seconds']:.0%} | "
                        f"{o['compute_bound_calls']:,} |"
                    )
                out.append("")
    notes = sorted({note for r in data["runs"] for e in r["estimates"].values() for note in e["notes"]})
    out += [
        "## Notes",
        "",
        *[f"- {n}" for n in notes],
        "- GPU table (dense peaks from NVIDIA's datasheets, sources in fastft/memory/speed_model.py): "
        + "; ".join(
            f"{k} {v['description']}: "
            + ", ".join(f"{d} {t:g}" for d, t in v["tflops"].items() if t)
            + f" TFLOP/s, {v['bandwidth'] / 1e12:.2f} TB/s"
            for k, v in data["gpus"].items()
        ),
        "- Not modelled: CPU-side dispatch time, kernel overlap, caches (re-reads count again), the offloaded "
        "checkpoints' device-to-host copies (side stream, overlapped), sliding-window attention. fastft's loss "
        "is modelled by the step model's chunked aten ops, which make more passes over each logits chunk than "
        "fastft's Triton cross-entropy: fastft's loss time is overestimated, not under.",
        "",
    ]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", default="2048,8192", help="comma-separated sequence lengths")
    ap.add_argument("--lora-r", type=int, default=32)
    ap.add_argument(
        "--out",
        default=str(REPO / "benchmarks" / "results" / "speed_model"),
        help="output path without suffix (.md and .json are written)",
    )
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    data = measure([int(t) for t in args.tokens.split(",") if t], args.lora_r)
    wall = time.perf_counter() - t0
    command = "python benchmarks/speed_model.py" + (
        "" if argv is None and len(sys.argv) == 1 else " " + " ".join(argv if argv is not None else sys.argv[1:])
    )
    data["command"], data["seconds"] = command, round(wall, 1)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(data, indent=1))
    out.with_suffix(".md").write_text(render(data, command, wall))
    print(f"wrote {out.with_suffix('.md')} and .json in {wall:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
