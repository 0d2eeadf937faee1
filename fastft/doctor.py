"""``fastft doctor``: what fastft will do on this machine, with these releases, before a run finds out.

Reports the installed versions against the tested ranges (:mod:`fastft.versions`), the host (CPU features, CUDA,
whether bitsandbytes' CPU 4-bit dequantization is right here), and -- on tiny offline models with random weights, so
nothing is downloaded -- which model patches apply for every architecture row (or for ``--model``'s architecture),
which are left unpatched and why, and what PatchFastRL does to each TRL trainer. Exit status 1 when a contract fails
(a piece left unpatched, a trainer not patched, or ``--model`` outside the table), 2 for bad input.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
import warnings
from typing import Any

#: Sizes a ``--model`` config is shrunk to: the contracts depend on the classes, not on the width.
_TINY_SIZES = dict(
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    vocab_size=384,
)


def _host() -> dict[str, Any]:
    import torch

    flags = set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    host: dict[str, Any] = {
        "avx512f": "avx512f" in flags,
        "avx2": "avx2" in flags,
        "cuda": torch.cuda.is_available(),
        "triton_interpret": os.environ.get("TRITON_INTERPRET") == "1",
    }
    if host["cuda"]:
        host["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    host["bitsandbytes_cpu_dequantize_4bit"] = _bnb_cpu_dequant_check()
    return host


def _bnb_cpu_dequant_check() -> str:
    """bitsandbytes 0.50.2's native CPU ``dequantize_4bit`` is wrong on AVX-512 hosts when the last dimension is not a
    multiple of the blocksize (docs/upstream/): check it here against fastft's own NF4 dequantization."""
    try:
        import bitsandbytes.functional as bnb_f
        import torch

        from fastft.kernels import dequantize_nf4, force_path
    except Exception as exc:  # noqa: BLE001 - not installed, or not importable on this host
        return f"not checked ({type(exc).__name__}: {exc})"
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(64, 96, generator=generator) * 0.1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        packed, state = bnb_f.quantize_4bit(weight, blocksize=64, quant_type="nf4")
        theirs = bnb_f.dequantize_4bit(packed, state)
    with force_path("torch"):
        ours = dequantize_nf4(packed, state)
    error = (theirs.float() - ours.float()).abs().max().item()
    if error == 0.0:
        return "correct"
    return (
        f"WRONG on this CPU (max error {error:.3g} at a 64x96 weight, blocksize 64): a known bitsandbytes defect; "
        "fastft's fused LoRA and merges use fastft's own dequantization, PEFT's unfused 4-bit path does not"
    )


def _architecture_rows(model: str | None) -> list[dict[str, Any]]:
    import fastft
    from fastft.offline import build_tiny_model
    from fastft.patches.architectures import ARCHITECTURES
    from fastft.patches.patcher import patch_model

    if model is None:
        targets = [(row, lambda row=row: build_tiny_model(row)) for row in ARCHITECTURES]
    else:
        targets = [_model_target(model)]
    rows = []
    for model_type, build in targets:
        row: dict[str, Any] = {"model_type": model_type, "supported": model_type in ARCHITECTURES}
        if row["supported"]:
            with _quiet():
                report = patch_model(build())
            by_design = dict(ARCHITECTURES[model_type].unfused)  # the row says these cannot be fused identically
            row.update(
                applied=report.applied,
                skipped={name: report.reasons.get(name, "not applied") for name in report.skipped if name not in by_design},
                unfused_by_design=by_design,
            )
            fastft.unpatch()
        rows.append(row)
    return rows


def _model_target(model: str) -> tuple[str, Any]:
    """``--model DIR`` (or a config.json): its architecture, built tiny with random weights (nothing downloaded)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    path = os.path.dirname(model) if model.endswith(".json") else model
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"fastft doctor: {model!r} is not a model directory with a config.json")
    config = AutoConfig.from_pretrained(path, trust_remote_code=False)
    for name, value in _TINY_SIZES.items():
        if hasattr(config, name):
            setattr(config, name, value)

    def build():
        return AutoModelForCausalLM.from_config(config, attn_implementation="eager")

    return config.model_type, build


def _trainer_rows() -> list[dict[str, Any]]:
    import fastft
    from fastft.patches import trl as fast_trl
    from fastft.patches.base import skipped_patches

    rows = []
    for algorithm in fast_trl.SUPPORTED_ALGORITHMS:
        with _quiet():
            patched = fast_trl.PatchFastRL(algorithm)[algorithm]
        skipped = {name: why for name, why in skipped_patches().items() if name.startswith(f"trl {algorithm}:")}
        head = fast_trl.lean_head_absent(algorithm)
        if head is None and fast_trl.uses_trl_head_seam(algorithm):  # ORPO/CPO/OnlineDPO need no TRL seam
            head = fast_trl._fused_head_problem()
        rows.append(
            {
                "trainer": f"{algorithm}Trainer",
                "patched": patched,
                "skipped": skipped,
                "lean_head": "fastft" if head is None else f"TRL's own ({head})",
            }
        )
        fastft.unpatch()
    return rows


@contextlib.contextmanager
def _quiet():
    """The doctor reports skipped patches itself: keep their one-time warnings off the terminal meanwhile."""
    from fastft._log import logger, reset_once

    level = logger.level
    logger.setLevel("ERROR")
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)
        reset_once()


def diagnose(model: str | None = None) -> dict[str, Any]:
    """Everything ``fastft doctor`` reports, as a dict (what ``--json`` prints)."""
    from fastft.versions import version_table

    result = {
        "versions": version_table(),
        "host": _host(),
        "architectures": _architecture_rows(model),
        "trainers": _trainer_rows(),
    }
    failures = [
        f"{row['model_type']}: not in the architecture table" for row in result["architectures"] if not row["supported"]
    ]
    failures += [
        f"{row['model_type']}: {name} left unpatched ({why})"
        for row in result["architectures"]
        for name, why in row.get("skipped", {}).items()
    ]
    failures += [
        f"{row['trainer']}: not patched ({'; '.join(row['skipped'].values()) or 'see warnings'})"
        for row in result["trainers"]
        if not row["patched"]
    ]
    result["failures"] = failures
    return result


def _print(result: dict[str, Any]) -> None:
    print("fastft doctor")
    print("\nversions (tested range from fastft's pyproject):")
    for row in result["versions"]:
        state = {True: "ok", False: "UNTESTED (outside the range)", None: "-"}[row["in_range"]]
        print(f"  {row['package']:<13} {row['installed'] or 'not installed':<16} tested {row['tested'] or '-':<22} {state}")
    host = result["host"]
    print("\nhost:")
    print(
        f"  CPU: avx512f={'yes' if host['avx512f'] else 'no'} avx2={'yes' if host['avx2'] else 'no'}; "
        f"CUDA: {', '.join(host.get('gpus', [])) or 'none'}"
        + ("; TRITON_INTERPRET=1 (kernels interpreted)" if host["triton_interpret"] else "")
    )
    print(f"  bitsandbytes CPU dequantize_4bit: {host['bitsandbytes_cpu_dequantize_4bit']}")
    print("\narchitectures (tiny offline models, random weights):")
    for row in result["architectures"]:
        if not row["supported"]:
            print(f"  {row['model_type']:<10} not in the architecture table: loads and trains unpatched")
            continue
        print(f"  {row['model_type']:<10} patched: {', '.join(row['applied']) or 'nothing'}")
        for name, why in row["skipped"].items():
            print(f"  {'':<10} unpatched: {name}: {why}")
    print("\nTRL trainers (PatchFastRL):")
    for row in result["trainers"]:
        state = "patched" if row["patched"] else "NOT patched: " + "; ".join(row["skipped"].values())
        print(f"  {row['trainer']:<12} {state}; LM head: {row['lean_head']}")
    print()
    if result["failures"]:
        print("contract failures:\n" + "\n".join(f"  - {f}" for f in result["failures"]))
    else:
        print("all contracts hold: every piece is patched")


def add_parser(sub: Any) -> None:
    doctor = sub.add_parser("doctor", help="versions vs tested ranges, and which patches apply here (offline)")
    doctor.add_argument(
        "--model",
        default=None,
        help="a local model directory (or its config.json): check its architecture instead of every row",
    )
    doctor.add_argument("--json", action="store_true", help="print the report as JSON")
    doctor.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        result = diagnose(args.model)
    except (FileNotFoundError, OSError, ValueError) as exc:
        print(f"fastft doctor: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        _print(result)
    return 1 if result["failures"] else 0
