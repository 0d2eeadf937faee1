"""The prepared GPU check: one command, everything written to OUTDIR, under 8 minutes on one H200.

    benchmarks/gpu/check.sh OUTDIR [--dry-run]

1. environment: versions, GPU, and whether each fastft layer imports (torch 2.11 / triton 3.6 / transformers 5.17
   there, outside the tested ranges: the report says what imported, what came from the carried wheels);
2. the CUDA suite, in time-limited tiers (pass/fail/skip counts; logs beside the report);
3. per-kernel speed at Llama-3.1-8B shapes (kernel_bench);
4. the end-to-end LoRA / QLoRA SFT step on ~1B and 8B Llama-shaped random-weight configs (step_bench), with the
   modeled (roofline) step of fastft.memory.speed_model for the same rows beside it (benchmarks/gpu/modeled.py, on
   the CPU in the background from the start, so it costs no GPU time);
5. results.json and report.md.
Every stage has a time budget; what did not fit is listed as skipped, never left out silently.
``--dry-run``: the same code end to end on CPU (Triton interpreter, tiny shapes, CPU-collected suite) -- a CI test.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import importlib.metadata
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACKAGES = (
    "torch",
    "triton",
    "transformers",
    "peft",
    "accelerate",
    "trl",
    "datasets",
    "bitsandbytes",
    "liger-kernel",
    "numpy",
    "pytest",
    "pytest-xdist",
)
FASTFT_LAYERS = ("fastft.kernels", "fastft.model", "fastft.memory.step_model", "fastft.patches.trl")


def environment(carried: list[str]) -> dict:
    import torch

    env: dict = {"python": sys.version.split()[0]}
    for name in PACKAGES:
        try:
            env[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            env[name] = "not installed"
    env["carried wheels installed"] = ", ".join(carried) or "none"
    env["gpu"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
    env["cuda"] = torch.version.cuda or "none"
    for module in FASTFT_LAYERS:
        try:
            importlib.import_module(module)
            env[f"import {module}"] = "ok"
        except Exception as exc:  # noqa: BLE001 - the point of this line: say exactly why a layer cannot run here
            env[f"import {module}"] = f"FAILED {type(exc).__name__}: {exc}"[:300]
    return env


def importable(module: str) -> str | None:
    try:
        importlib.import_module(module)
        return None
    except Exception as exc:  # noqa: BLE001 - reported as the reason a column is skipped
        return f"{type(exc).__name__}: {exc}"[:200]


def step_plan(dry_run: bool) -> list[tuple[str, str, str, str]]:
    """(config, mode, impl, tokens) in priority order: the ~1B runs first, so a tight budget still yields a table."""
    if dry_run:
        return [("tiny", "lora", impl, "32") for impl in ("fastft", "baseline", "liger")]
    return [
        (cfg, mode, impl, "2048,8192")
        for cfg in ("1b", "8b")
        for mode in ("lora", "qlora")
        for impl in ("fastft", "baseline", "liger")
    ]


def run_steps(out: Path, dry_run: bool, deadline: float, notes: list[str]) -> list[dict]:
    runs = []
    missing = {"qlora": importable("bitsandbytes"), "liger": importable("liger_kernel.transformers")}
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p))
    if dry_run:
        env["TRITON_INTERPRET"] = "1"
    for cfg, mode, impl, tokens in step_plan(dry_run):
        base = {"config": cfg, "mode": mode, "impl": impl, "rows": []}
        reason = missing["qlora"] if mode == "qlora" else None
        reason = reason or (missing["liger"] if impl == "liger" else None)
        if reason:
            runs.append(
                {
                    **base,
                    "error": f"skipped: {'bitsandbytes' if mode == 'qlora' else 'liger_kernel'} does not import ({reason})",
                }
            )
            continue
        left = deadline - time.perf_counter()
        if left < 20:
            runs.append({**base, "error": "skipped: the check's step-benchmark time budget ran out"})
            continue
        path = out / f"step_{cfg}_{mode}_{impl}.json"
        cmd = [
            sys.executable,
            "-m",
            "benchmarks.gpu.step_bench",
            "--config",
            cfg,
            "--mode",
            mode,
            "--impl",
            impl,
            "--tokens",
            tokens,
            "--json",
            str(path),
        ]
        if dry_run:
            cmd += ["--steps", "1", "--warmup", "0"]
        log = out / f"step_{cfg}_{mode}_{impl}.log"
        try:
            with open(log, "w") as f:
                subprocess.run(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=left, check=False)
        except subprocess.TimeoutExpired:
            runs.append({**base, "error": f"stopped at the remaining budget ({left:.0f} s)"})
            continue
        if path.exists():
            runs.append(json.loads(path.read_text()))
        else:
            runs.append({**base, "error": f"no result: see {log.name}: " + log.read_text()[-300:]})
    losses = {}
    for r in runs:
        for row in r.get("rows", []):
            if row.get("losses"):
                losses.setdefault((r["config"], r["mode"], row["tokens"]), {})[r["impl"]] = row["losses"][0]
    for (cfg, mode, n), by_impl in sorted(losses.items()):
        if "fastft" in by_impl and len(by_impl) > 1:
            diffs = ", ".join(f"{k} {v:.5f}" for k, v in by_impl.items())
            notes.append(f"first-step loss, {cfg} {mode} {n} tokens (same weights, data, seed): {diffs}")
    return runs


def start_modeled(out: Path, dry_run: bool, gpu_name: str, notes: list[str]) -> tuple | None:
    """Start benchmarks/gpu/modeled.py in the background (CPU only, niced) -> (process, json path), or None."""
    from fastft.memory.speed_model import gpu_from_device_name

    gpu = "H200" if dry_run else getattr(gpu_from_device_name(gpu_name), "name", None)
    if gpu is None:
        notes.append(f"no modeled (roofline) step: GPU {gpu_name!r} is not in fastft.memory.speed_model.GPUS")
        return None
    path = out / "modeled.json"
    env = dict(
        os.environ,
        CUDA_VISIBLE_DEVICES="",
        PYTHONPATH=os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p),
    )
    cmd = [sys.executable, "-m", "benchmarks.gpu.modeled", "--gpu", gpu, "--json", str(path)]
    log = open(out / "modeled.log", "w")  # no `with`: the child writes it until finish_modeled
    proc = subprocess.Popen(
        cmd + (["--dry-run"] if dry_run else []),
        cwd=REPO,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        preexec_fn=lambda: os.nice(10),
    )
    return proc, path, log


def finish_modeled(started: tuple | None, wait_s: float, notes: list[str]) -> dict | None:
    """Wait up to ``wait_s`` for the modeled rows, stop the process, and return what it wrote."""
    if started is None:
        return None
    proc, path, log = started
    try:
        proc.wait(timeout=max(1.0, wait_s))
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        notes.append("modeled (roofline) rows: stopped at the check's deadline; rows not reached are blank")
    log.close()
    if proc.returncode not in (0, None) and not path.exists():
        notes.append(f"modeled (roofline) rows failed (exit {proc.returncode}): see modeled.log")
    return json.loads(path.read_text()) if path.exists() else None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="fastft's prepared GPU check")
    ap.add_argument("outdir")
    ap.add_argument("--dry-run", action="store_true", help="CPU, Triton interpreter, tiny shapes (the CI test)")
    ap.add_argument("--budget-s", type=float, default=450.0, help="total seconds (the check must end under 8 min)")
    ap.add_argument("--carried", default="", help="comma-separated wheels check.sh installed (for the report)")
    args = ap.parse_args(argv)
    out = Path(args.outdir)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    end = start + args.budget_s
    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    if not args.dry_run:
        os.environ.pop("TRITON_INTERPRET", None)
        import torch

        if not torch.cuda.is_available():
            sys.exit("benchmarks/gpu/check.sh: no CUDA GPU here; use --dry-run on a CPU machine")
    else:
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported (by environment())
    from benchmarks.gpu import kernel_bench, report, suite

    result: dict = {
        "dry_run": args.dry_run,
        "started": started,
        "command": " ".join(["benchmarks/gpu/check.sh", args.outdir] + (["--dry-run"] if args.dry_run else [])),
        "notes": [],
    }
    result["environment"] = environment([w for w in args.carried.split(",") if w])
    modeled = start_modeled(out, args.dry_run, result["environment"]["gpu"], result["notes"])
    device = "cpu" if args.dry_run else "cuda"
    if args.dry_run:
        # On CPU the CUDA tests must collect and skip cleanly; that is what the dry run checks.
        tiers = [("gpu", ["tests/gpu/test_kernels_8b.py", "tests/gpu/test_cuda_only.py"], 60, 1)]
    else:
        tiers = [("kernels+gpu", ["tests/gpu/test_kernels_8b.py", "tests/gpu/test_cuda_only.py", "tests/kernels"], 140, 4)]
    result["suite"] = [suite.run_tier(n, p, out, device=device, limit_s=lim, workers=w) for n, p, lim, w in tiers]
    kernel_deadline = time.perf_counter() + (60 if args.dry_run else 100)
    result["kernels"] = kernel_bench.run(args.dry_run, min(kernel_deadline, end))
    rest_tier_s = 0 if args.dry_run else 70
    result["steps"] = run_steps(out, args.dry_run, end - rest_tier_s, result["notes"])
    if not args.dry_run:
        left = end - time.perf_counter()
        if left > 30:
            result["suite"].append(
                suite.run_tier(
                    "models+trl+memory",
                    ["tests/patches", "tests/model", "tests/trl", "tests/memory", "tests/optim"],
                    out,
                    device=device,
                    limit_s=left,
                    workers=4,
                )
            )
        else:
            result["notes"].append("tier models+trl+memory not run: no time left in the budget")
    result["modeled"] = finish_modeled(modeled, min(60.0, end + 20 - time.perf_counter()), result["notes"])
    result["seconds"] = time.perf_counter() - start
    (out / "results.json").write_text(json.dumps(result, indent=1, default=str))
    (out / "report.md").write_text(report.render(result))
    print(f"wrote {out / 'report.md'} and {out / 'results.json'} in {result['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
