"""One LoRA training step of a small llama, measured on CPU: peak live bytes, step time, loss. Writes a markdown report.

Variants (same model weights, same token ids, LoRA r=16 on all seven linear projections, fp32, batch 1):

* ``baseline``: transformers + PEFT, standard (non-reentrant) gradient checkpointing, the model's own loss.
* ``fastft``: ``FastModel.from_pretrained`` + ``FastModel.get_peft_model`` ("fastft" checkpointing, which is standard
  checkpointing off CUDA). On plain CPU every fastft op takes its torch path (same memory algorithm, no Triton); under
  ``TRITON_INTERPRET=1`` it runs its Triton kernels in the interpreter. ``fastft.kernels.path_counts`` is
  reported, so the path that ran is proven, not assumed.
* ``liger``: Liger-Kernel's ``apply_liger_kernel_to_llama`` (applied before loading, as its docs do) on the same model,
  + PEFT + standard checkpointing. Liger's kernels are Triton-only; the script tries it on plain CPU and under the
  interpreter, records the error where it does not run, and probes its four llama kernels one by one to find a subset
  that does. Liger is not a fastft dependency: if it is missing, the script says so and continues.

Two paths, each variant in its own subprocess (fastft's RoPE patch is process-wide and must not leak into another
variant; ``TRITON_INTERPRET`` must be set before triton is imported):

* ``cpu``: plain CPU, ``--hidden/--seq/...`` shape. Peak bytes of step 1, then ``--warmup`` untimed steps and the
  median of ``--steps`` timed steps. These are CPU timings, not GPU timings.
* ``interpret``: ``TRITON_INTERPRET=1``, the smaller ``--interp-*`` shape. Peak bytes and loss of step 1 only; the
  interpreter's wall time is reported as a note, never as a speed figure.

A step is forward with labels + backward + ``zero_grad(set_to_none=True)``; no optimizer update (identical for all
variants: the same LoRA parameters). Peak live bytes come from ``fastft.memory.LiveBytesTracker``: the high-water mark
of tensor storages allocated during step 1 (activations, checkpoints, logits, LoRA gradients), on top of the weights,
which exist before and are not counted.

    python benchmarks/bench_model_step_memory.py                      # everything, writes results/small_model_cpu.md
    python benchmarks/bench_model_step_memory.py --only fastft --path cpu   # one row, printed, report not written
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

MIB = 2**20
HERE = Path(__file__).resolve().parent
REPORT = HERE / "results" / "small_model_cpu.md"
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LIGER_KERNELS = ("rope", "rms_norm", "swiglu", "fused_linear_cross_entropy")
VARIANTS = ("baseline", "fastft", "liger")
PATHS = ("cpu", "interpret")


# -- the measurement (runs inside one child process per variant and path) ------------------------------------------
@contextlib.contextmanager
def _interpreter_launches(counter: Counter[str]) -> Iterator[None]:
    """Under the interpreter, count kernel launches by name and collect the young gc generation after each.

    Triton's interpreter leaves the launched tensors in reference cycles, so a tensor whose last use was a kernel
    argument would otherwise outlive it until the next gc run (a GPU launch holds nothing). fastft's tracker already
    collects after its own ops; doing it after every launch gives Liger's kernels the same treatment. Restored on exit.
    """
    from triton.runtime import interpreter

    original = interpreter.GridExecutor.__call__

    def call(self, *args, **kwargs):
        counter[getattr(self.fn, "__name__", "?")] += 1
        try:
            return original(self, *args, **kwargs)
        finally:
            gc.collect(0)

    interpreter.GridExecutor.__call__ = call
    try:
        yield
    finally:
        interpreter.GridExecutor.__call__ = original


def _build(variant: str, model_dir: str, liger_kernels: list[str] | None):
    import torch

    lora = dict(r=16, lora_alpha=16, target_modules=LORA_TARGETS)
    if variant in ("baseline", "liger"):
        import peft
        from transformers import AutoModelForCausalLM

        if variant == "liger":
            from liger_kernel.transformers import apply_liger_kernel_to_llama

            chosen = LIGER_KERNELS if liger_kernels is None else liger_kernels
            apply_liger_kernel_to_llama(**{k: k in chosen for k in LIGER_KERNELS})
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")
        model = peft.get_peft_model(model, peft.LoraConfig(task_type="CAUSAL_LM", **lora))
        model.base_model.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return model
    if variant == "fastft":
        from fastft import FastModel

        model, _ = FastModel.from_pretrained(model_dir, dtype=torch.float32)
        return FastModel.get_peft_model(model, use_gradient_checkpointing="fastft", **lora)
    raise ValueError(f"unknown variant {variant!r}; known: {VARIANTS}")


def measure_step(
    variant: str, model_dir: str, seq: int, *, warmup: int = 1, steps: int = 5, liger_kernels: list[str] | None = None
) -> dict[str, Any]:
    """Measure one LoRA step of ``variant`` on the model saved in ``model_dir`` with ``seq`` random token ids.

    Returns ``peak_bytes`` (LiveBytesTracker high-water mark of step 1, weights excluded), ``breakdown`` (bytes by
    phase at the peak), ``loss`` (step 1), ``step_seconds`` (``steps`` untracked timed steps after ``warmup`` more;
    empty when ``steps`` is 0), ``tracked_seconds`` (wall time of the tracked step 1), ``fastft_paths`` (fastft op
    calls by path) and ``launches`` (Triton kernel launches by name, interpreter only). The process's torch thread
    count is used as set by the caller.
    """
    from fastft.kernels import INTERPRETER

    launches: Counter[str] = Counter()
    with _interpreter_launches(launches) if INTERPRETER else contextlib.nullcontext():
        result = _measure(variant, model_dir, seq, warmup, steps, liger_kernels)
    result["launches"] = dict(launches)
    return result


def _measure(
    variant: str, model_dir: str, seq: int, warmup: int, steps: int, liger_kernels: list[str] | None
) -> dict[str, Any]:
    import torch

    from fastft.kernels import INTERPRETER, path_counts
    from fastft.memory import LiveBytesTracker

    model = _build(variant, model_dir, liger_kernels)
    model.train()
    # Token ids from their own generator: FastModel.get_peft_model reseeds the global RNG for its LoRA init.
    ids = torch.randint(0, model.config.vocab_size, (1, seq), generator=torch.Generator().manual_seed(0))
    paths_before = Counter(path_counts)

    def step() -> float:
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        value = loss.item()
        del loss
        model.zero_grad(set_to_none=True)
        return value

    start = time.perf_counter()
    with LiveBytesTracker() as tracker:
        with tracker.in_phase("forward"):
            loss = model(input_ids=ids, labels=ids).loss
        with tracker.in_phase("backward"):
            loss.backward()
        loss_value = loss.item()
        del loss
    tracked_seconds = time.perf_counter() - start
    model.zero_grad(set_to_none=True)
    fastft_paths = Counter()
    for (_, path), n in (path_counts - paths_before).items():
        fastft_paths[path] += n

    seconds, losses = [], []
    for i in range(warmup + steps if steps else 0):
        start = time.perf_counter()
        losses.append(step())
        if i >= warmup:
            seconds.append(time.perf_counter() - start)
    return {
        "variant": variant,
        "peak_bytes": tracker.peak_bytes,
        "breakdown": dict(tracker.peak_breakdown),
        "loss": loss_value,
        "later_losses": losses,
        "step_seconds": seconds,
        "tracked_seconds": tracked_seconds,
        "fastft_paths": dict(fastft_paths),
        "threads": torch.get_num_threads(),
        "interpreter": INTERPRETER,
    }


def probe_liger() -> dict[str, str]:
    """Run each of Liger's llama kernels alone (forward + backward of a tiny LoRA llama); kernel -> "ok" or error."""
    import peft
    import torch
    from liger_kernel.transformers import apply_liger_kernel_to_llama
    from transformers.models.llama import modeling_llama

    from fastft.offline import build_tiny_model

    saved = {name: getattr(modeling_llama, name) for name in ("apply_rotary_pos_emb", "LlamaRMSNorm", "LlamaMLP")}
    saved_forward = modeling_llama.LlamaForCausalLM.forward
    out = {}
    for kernel in LIGER_KERNELS:
        try:
            apply_liger_kernel_to_llama(**{k: k == kernel for k in LIGER_KERNELS})
            model = build_tiny_model("llama", vocab_size=1000, hidden_size=128, intermediate_size=352).train()
            model = peft.get_peft_model(model, peft.LoraConfig(task_type="CAUSAL_LM", r=4, target_modules=LORA_TARGETS))
            ids = torch.randint(0, 1000, (1, 37), generator=torch.Generator().manual_seed(0))
            model(input_ids=ids, labels=ids).loss.backward()
            out[kernel] = "ok"
        except Exception as exc:  # noqa: BLE001 - recording why it does not run is the point
            out[kernel] = _error_text(exc)
        finally:
            for name, value in saved.items():
                setattr(modeling_llama, name, value)
            modeling_llama.LlamaForCausalLM.forward = saved_forward
    return out


def _error_text(exc: BaseException) -> str:
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if "liger_kernel" in f.filename]
    where = ""
    if frames:
        f = frames[-1]
        where = f" (at {f.filename.split('site-packages/')[-1]}:{f.lineno})"
    return f"{type(exc).__name__}: {exc}{where}"


# -- the driver ----------------------------------------------------------------------------------------------------
def _shape(args: argparse.Namespace, path: str) -> dict[str, int]:
    if path == "cpu":
        hidden, layers, seq = args.hidden, args.layers, args.seq
    else:
        hidden, layers, seq = args.interp_hidden, args.interp_layers, args.interp_seq
    heads = max(1, hidden // 64)
    return {
        "hidden": hidden,
        "layers": layers,
        "seq": seq,
        "vocab": args.vocab,
        "heads": heads,
        "kv_heads": max(1, heads // 4),
        "intermediate": 64 * round(hidden * 8 / 3 / 64),
    }


def _save_model(directory: str, shape: dict[str, int]) -> None:
    from fastft.offline import save_tiny_model

    save_tiny_model(
        directory,
        "llama",
        vocab_size=shape["vocab"],
        hidden_size=shape["hidden"],
        intermediate_size=shape["intermediate"],
        num_hidden_layers=shape["layers"],
        num_attention_heads=shape["heads"],
        num_key_value_heads=shape["kv_heads"],
        head_dim=64,
        max_position_embeddings=max(4096, shape["seq"]),
    )


def _child_env(path: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if path == "interpret":
        env["TRITON_INTERPRET"] = "1"
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    return env


def _run_child(argv: list[str], path: str) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, __file__, *argv], capture_output=True, text=True, env=_child_env(path))
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode == 0 and lines:
        return json.loads(lines[-1])
    tail = (proc.stderr or proc.stdout).strip().splitlines()
    return {"error": tail[-1] if tail else f"exit code {proc.returncode}"}


def _row_command(args: argparse.Namespace, variant: str, path: str, extra: str = "") -> str:
    shape = (
        f"--hidden {args.hidden} --layers {args.layers} --seq {args.seq} --steps {args.steps} --warmup {args.warmup}"
        if path == "cpu"
        else f"--interp-hidden {args.interp_hidden} --interp-layers {args.interp_layers} --interp-seq {args.interp_seq}"
    )
    return (
        f"python benchmarks/bench_model_step_memory.py --only {variant} --path {path} {shape} "
        f"--vocab {args.vocab} --threads {args.threads}{extra}"
    )


def _fmt_paths(res: dict[str, Any]) -> str:
    bits = []
    if res.get("fastft_paths"):
        bits.append("fastft ops: " + ", ".join(f"{n} {p}" for p, n in sorted(res["fastft_paths"].items())))
    if res.get("launches"):
        bits.append("Triton launches: " + ", ".join(f"{k} x{n}" for k, n in sorted(res["launches"].items())))
    return "; ".join(bits)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--interp-hidden", type=int, default=256)
    parser.add_argument("--interp-layers", type=int, default=2)
    parser.add_argument("--interp-seq", type=int, default=256)
    parser.add_argument("--steps", type=int, default=5, help="timed steps (median reported), cpu path")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps before the timed ones, cpu path")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads in every child")
    parser.add_argument("--only", choices=VARIANTS, help="run one variant (with --path) and print it; no report")
    parser.add_argument("--path", choices=PATHS)
    parser.add_argument("--liger-kernels", help="comma-separated subset of " + ",".join(LIGER_KERNELS))
    parser.add_argument("--out", type=Path, default=REPORT)
    parser.add_argument("--child", nargs=2, metavar=("VARIANT", "DIR"), help=argparse.SUPPRESS)
    parser.add_argument("--child-seq", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--probe-liger", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child or args.probe_liger:
        import torch

        torch.set_num_threads(args.threads)
        if args.probe_liger:
            print(json.dumps(probe_liger()))
            return
        kernels = args.liger_kernels.split(",") if args.liger_kernels else None
        steps = args.steps if os.environ.get("TRITON_INTERPRET") != "1" else 0
        res = measure_step(
            args.child[0], args.child[1], args.child_seq, warmup=args.warmup, steps=steps, liger_kernels=kernels
        )
        print(json.dumps(res))
        return

    if args.only and not args.path:
        parser.error("--only needs --path cpu|interpret")
    liger_installed = _liger_installed()
    if not liger_installed:
        print("liger: not installed (pip install liger-kernel)")
    jobs = [
        (v, p)
        for p in PATHS
        for v in VARIANTS
        if (not args.only or (v, p) == (args.only, args.path)) and (v != "liger" or liger_installed)
    ]
    wall_start = time.perf_counter()
    load_before = os.getloadavg()
    rows, probes = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for path in PATHS:
            path_jobs = [v for v, p in jobs if p == path]
            if not path_jobs:
                continue
            shape = _shape(args, path)
            model_dir = os.path.join(tmp, path)
            _save_model(model_dir, shape)
            common = [
                "--threads",
                str(args.threads),
                "--child-seq",
                str(shape["seq"]),
                "--steps",
                str(args.steps),
                "--warmup",
                str(args.warmup),
            ]
            for variant in path_jobs:
                if variant != "liger":
                    res = _run_child([*common, "--child", variant, model_dir], path)
                    rows.append((variant, path, "", res, _row_command(args, variant, path)))
                    _print_row(rows[-1])
                    continue
                # Liger: first as its users call it (all four llama kernels), then, where that fails, the subset of
                # kernels that run on their own here (probed one by one), so what it can do is still measured.
                requested = args.liger_kernels.split(",") if args.liger_kernels else list(LIGER_KERNELS)
                extra = f" --liger-kernels {','.join(requested)}" if args.liger_kernels else ""
                res = _run_child([*common, "--child", "liger", model_dir, "--liger-kernels", ",".join(requested)], path)
                rows.append(("liger", path, ",".join(requested), res, _row_command(args, "liger", path, extra)))
                _print_row(rows[-1])
                if "error" in res and not args.liger_kernels:
                    probes[path] = _run_child(["--threads", str(args.threads), "--probe-liger"], path)
                    print(f"liger kernels one by one on path {path}: {probes[path]}")
                    ok = [k for k in LIGER_KERNELS if probes[path].get(k) == "ok"]
                    if ok:
                        res = _run_child([*common, "--child", "liger", model_dir, "--liger-kernels", ",".join(ok)], path)
                        rows.append(
                            (
                                "liger",
                                path,
                                ",".join(ok),
                                res,
                                _row_command(args, "liger", path, f" --liger-kernels {','.join(ok)}"),
                            )
                        )
                        _print_row(rows[-1])
    elapsed = time.perf_counter() - wall_start
    if args.only:
        return
    report = _report(args, rows, probes, liger_installed, elapsed, load_before, os.getloadavg())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report)
    print(f"wrote {args.out} ({elapsed:.0f} s)")


def _liger_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("liger_kernel") is not None


def _print_row(row: tuple) -> None:
    variant, path, kernels, res, command = row
    name = variant + (f" [{kernels}]" if kernels else "")
    if "error" in res:
        print(f"{name:<60} {path:<10} did not run: {res['error']}")
        return
    timing = (
        f"median {statistics.median(res['step_seconds']):.2f} s/step"
        if res["step_seconds"]
        else f"(interpreter, tracked step {res['tracked_seconds']:.1f} s wall: not a speed figure)"
    )
    print(
        f"{name:<60} {path:<10} peak {res['peak_bytes'] / MIB:8.1f} MiB  loss {res['loss']:.6f}  {timing}  {_fmt_paths(res)}"
    )
    print(f"  command: {command}")


#: Kernels launched once per token chunk of the fused linear + cross-entropy (forward), by implementation.
_LOSS_CHUNK_KERNELS = {"_ce_stats_kernel": "fastft", "liger_cross_entropy_kernel": "Liger"}


def _loss_chunks(res: dict[str, Any], tokens: int) -> str:
    """How finely each fused loss chunked the tokens, read off the interpreter's launch counts (explains the peaks)."""
    for kernel, who in _LOSS_CHUNK_KERNELS.items():
        n = res.get("launches", {}).get(kernel)
        if n:
            return (
                f"{who}'s fused linear+CE ran {n} token chunks of ~{math.ceil(tokens / n)} rows "
                f"(a [rows, vocab] fp32 logits chunk each)"
            )
    return ""


def _report(args, rows, probes, liger_installed, elapsed, load_before, load_after) -> str:
    import platform

    import torch
    import transformers

    cpu, interp = _shape(args, "cpu"), _shape(args, "interpret")

    def shape_text(s: dict[str, int]) -> str:
        return (
            f"llama, {s['layers']} layers, hidden {s['hidden']}, intermediate {s['intermediate']}, "
            f"{s['heads']} heads / {s['kv_heads']} KV heads x 64, vocab {s['vocab']}, seq {s['seq']}, batch 1"
        )

    versions = f"torch {torch.__version__}, transformers {transformers.__version__}"
    try:
        import peft

        versions += f", peft {peft.__version__}"
        if liger_installed:
            from importlib.metadata import version

            versions += f", liger-kernel {version('liger-kernel')}"
        import triton

        versions += f", triton {triton.__version__}"
    except ImportError:
        pass
    lines = [
        "# One LoRA training step of a small model on CPU: fastft vs transformers+PEFT vs Liger-Kernel",
        "",
        "Generated by `" + " ".join(["python benchmarks/bench_model_step_memory.py", *sys.argv[1:]]) + "`"
        f" in {elapsed:.0f} s "
        f"({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}). **Measured on CPU, not GPU timings.**",
        "",
        "What was measured, and how:",
        f"- Machine: {platform.machine()}, {os.cpu_count()} cores shared with other jobs (load average "
        f"{load_before[0]:.2f} at start, {load_after[0]:.2f} at end), `torch.set_num_threads({args.threads})` "
        f"in every run; {versions}; fp32.",
        "- Model: randomly initialized (`fastft.offline.save_tiny_model`, seed 0), "
        "LoRA r=16, alpha 16 on q/k/v/o/gate/up/down; the same weights and token ids (`torch.Generator` seed 0, "
        "labels = input ids) for every variant, so step-1 losses must agree.",
        f"- `cpu` rows: {shape_text(cpu)}; plain CPU (no Triton anywhere).",
        f"- `interpret` rows: {shape_text(interp)}; `TRITON_INTERPRET=1` set before triton is imported, so "
        "fastft's and Liger's Triton kernels run in Triton's CPU interpreter.",
        "- A step = forward with labels (each variant's own loss path) + backward + `zero_grad(set_to_none=True)`; "
        "no optimizer update (the same for every variant). Each (variant, path) runs in its own process.",
        "- Peak MiB: `fastft.memory.LiveBytesTracker` high-water mark of tensor storages allocated during step 1 "
        "(activations, checkpoints, logits, loss temporaries, LoRA gradients), weights excluded. Under the "
        "interpreter the young gc generation is collected after every kernel launch for every variant (the "
        "interpreter keeps launched tensors in reference cycles; a GPU launch holds nothing).",
        f"- Step time: median (min-max) of {args.steps} untracked steps after {args.warmup} warmup step(s), "
        "CPU wall clock, `cpu` rows only. Interpreter wall time is not a speed figure and is only given in the "
        "notes below.",
        "- `baseline` = transformers + PEFT + standard non-reentrant checkpointing, the model's own loss "
        "(full logits). `fastft` = `FastModel.from_pretrained` + `FastModel.get_peft_model` (checkpointing "
        '"fastft" = standard checkpointing off CUDA); on plain CPU its ops take their torch path (same memory '
        "algorithm, no Triton), under the interpreter its Triton kernels (op counts by path in the notes). "
        "`liger` = `liger_kernel.transformers.apply_liger_kernel_to_llama(...)` before loading + PEFT + standard "
        "checkpointing; the kernels it was given are in brackets (the rest of the model runs transformers' own torch "
        "code).",
        "",
        "| variant | path | peak MiB | step time, s (median, min-max) | loss, step 1 | command |",
        "|---|---|---:|---|---:|---|",
    ]
    base_peak = {
        p: r[3]["peak_bytes"] for r in rows for p in PATHS if r[0] == "baseline" and r[1] == p and "error" not in r[3]
    }
    base_loss = {p: r[3]["loss"] for r in rows for p in PATHS if r[0] == "baseline" and r[1] == p and "error" not in r[3]}
    notes = []
    for variant, path, kernels, res, command in rows:
        name = f"{variant} [{kernels.replace(',', ', ')}]" if kernels else variant
        if "error" in res:
            lines.append(f"| {name} | {path} | did not run | - | - | `{command}` |")
            notes.append(f"- {name}, {path}: did not run: `{res['error']}`")
            continue
        peak = f"{res['peak_bytes'] / MIB:.1f}"
        if variant != "baseline" and path in base_peak:
            peak += f" ({res['peak_bytes'] / base_peak[path]:.0%} of baseline)"
        if res["step_seconds"]:
            s = res["step_seconds"]
            timing = f"{statistics.median(s):.2f} ({min(s):.2f}-{max(s):.2f})"
        else:
            timing = "- (interpreter)"
        loss = f"{res['loss']:.6f}"
        if variant != "baseline" and path in base_loss:
            loss += f" (diff {res['loss'] - base_loss[path]:+.1e})"
        lines.append(f"| {name} | {path} | {peak} | {timing} | {loss} | `{command}` |")
        detail = _fmt_paths(res)
        at_peak = ", ".join(f"{k} {v / MIB:.1f}" for k, v in sorted(res["breakdown"].items()))
        detail = (detail + "; " if detail else "") + f"MiB at the peak by phase allocated: {at_peak}"
        chunks = _loss_chunks(res, _shape(args, path)["seq"] - 1)
        if chunks:
            detail += "; " + chunks
        if path == "interpret":
            detail = (detail + "; " if detail else "") + (
                f"tracked step took {res['tracked_seconds']:.1f} s wall in the interpreter (not a speed figure)"
            )
        if res["later_losses"] and max(abs(x - res["loss"]) for x in res["later_losses"]) > 0:
            detail += (
                f"; later steps' losses differ from step 1 by up to "
                f"{max(abs(x - res['loss']) for x in res['later_losses']):.1e}"
            )
        if detail:
            notes.append(f"- {name}, {path}: {detail}.")
    if not liger_installed:
        notes.append("- liger: not installed (pip install liger-kernel); no Liger rows.")
    for path, probe in probes.items():
        if "error" in probe:
            notes.append(f"- Liger kernels one by one, {path}: the probe itself failed: `{probe['error']}`")
            continue
        notes.append(
            f"- Liger's llama kernels one by one (tiny LoRA llama, forward + backward), {path}: "
            + "; ".join(f"{k}: {'runs' if v == 'ok' else f'fails with `{v}`'}" for k, v in probe.items())
            + "."
        )
    lines += ["", "Notes (which path ran, errors, interpreter wall time):", "", *notes, ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
