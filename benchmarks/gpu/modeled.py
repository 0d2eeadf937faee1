"""The modeled (roofline) step for each row of the GPU check's step benchmark, so the report shows the measured step
beside the model's figure and the first GPU run calibrates fastft.memory.speed_model.

    python -m benchmarks.gpu.modeled --gpu H200 --json out.json [--dry-run]

Runs on the CPU only (meta tensors; CUDA hidden by the caller): for every (config, mode, impl, tokens) of
``check.step_plan`` whose impl the step model has (fastft, baseline -- not Liger), the step model is built with
step_bench's settings (the same Llama-shaped config, LoRA r16 alpha 16 on the seven projections, NF4 + double
quantization for QLoRA, AdamW, batch 1; fastft with offloaded checkpointing, the baseline with standard
checkpointing) and priced on ``--gpu``. The JSON is rewritten after every row, so a run stopped at the check's
deadline still leaves what it finished.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def rows(dry_run: bool) -> list[tuple[str, str, str, int]]:
    from benchmarks.gpu.check import step_plan

    out = []
    for cfg, mode, impl, tokens in step_plan(dry_run):
        if impl in ("fastft", "baseline"):
            out += [(cfg, mode, impl, int(t)) for t in tokens.split(",")]
    return out


def run(gpu_name: str, dry_run: bool, path: Path) -> None:
    from benchmarks.gpu.step_bench import LORA_TARGETS, llama_config
    from fastft.memory import speed_model
    from fastft.memory.step_model import StepModel, StepSpec

    gpu = speed_model.find_gpu(gpu_name)
    result: dict = {
        "gpu": gpu.name,
        "label": speed_model.LABEL,
        "launch_overhead_s": speed_model.LAUNCH_OVERHEAD_S,
        "rows": [],
    }
    models: dict[tuple[str, str, str], StepModel] = {}
    for cfg, mode, impl, tokens in rows(dry_run):
        t0 = time.perf_counter()
        row: dict = {"config": cfg, "mode": mode, "impl": impl, "tokens": tokens}
        try:
            key = (cfg, mode, impl)
            if key not in models:
                config = llama_config(cfg)
                spec = StepSpec(
                    variant=impl,
                    load_in_4bit=mode == "qlora",
                    lora_r=16,
                    lora_alpha=16,
                    target_modules=tuple(LORA_TARGETS),
                    optim="adamw",
                )
                models.clear()  # one model at a time (rows are grouped by model)
                models[key] = StepModel(config, spec)
            step, counter = speed_model.count_step(models[key], tokens)
            estimate = speed_model.roofline(counter, gpu, tokens)
            row.update(
                seconds_per_step=estimate.step_seconds,
                tokens_per_s=estimate.tokens_per_s,
                peak_gib=step.peak_bytes / 2**30,
                flops=estimate.flops,
                bytes=estimate.bytes,
                launches=estimate.launches,
                top_ops=[(o.op, o.seconds) for o in estimate.top_ops[:4]],
            )
        except Exception as exc:  # noqa: BLE001 - recorded: the report says which row has no model and why
            row["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
        row["model_seconds"] = round(time.perf_counter() - t0, 1)
        result["rows"].append(row)
        path.write_text(json.dumps(result, indent=1))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gpu", required=True, help="a GPU of fastft.memory.speed_model.GPUS")
    ap.add_argument("--dry-run", action="store_true", help="the dry run's tiny rows")
    ap.add_argument("--json", required=True)
    args = ap.parse_args(argv)
    run(args.gpu, args.dry_run, Path(args.json))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
