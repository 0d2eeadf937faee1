"""report.md from the GPU check's JSON: the suite counts, the kernel table, the end-to-end step table."""

from __future__ import annotations


def _kernel_table(k: dict) -> list[str]:
    out = [
        f"Device: {k['device']}; timing: {k['timing']}; peak HBM bandwidth used for %: "
        f"{k['peak_bandwidth_bytes_per_s'] / 1e12:.2f} TB/s (published)"
        if k.get("peak_bandwidth_bytes_per_s")
        else f"Device: {k['device']}; timing: {k['timing']}",
        "",
        "| op | shape | impl | pass | ms | achieved | % of peak BW |",
        "|---|---|---|---|---|---|---|",
    ]
    errors = []
    for r in k["rows"]:
        if "errors" in r:
            errors += [f"- {r['op']} {key}: {msg}" for key, msg in r["errors"].items()]
            continue
        achieved = f"{r['tflops']} TFLOP/s" if "tflops" in r else f"{r['gbps']} GB/s"
        out.append(
            f"| {r['op']} | {r['shape']} | {r['impl']} | {r['pass']} | {r['ms']} | {achieved} | {r.get('pct_of_peak', '')} |"
        )
    if errors:
        out += ["", "Not measured:", *errors]
    return out


def _modeled_cells(modeled: dict | None, run: dict, row: dict) -> str:
    """The modeled (roofline) s/step, its peak GiB and measured/modeled for one measured row ('' where none)."""
    found = [
        m
        for m in (modeled or {}).get("rows", [])
        if (m["config"], m["mode"], m["impl"], m["tokens"]) == (run["config"], run["mode"], run["impl"], row["tokens"])
    ]
    if not found or "seconds_per_step" not in found[0]:
        return " | | |" if not found else f" {found[0].get('error', '')[:80]} | | |"
    m = found[0]
    measured = row.get("seconds_per_step")
    ratio = f"{measured / m['seconds_per_step']:.2f}" if measured else ""
    return f" {m['seconds_per_step']:.4f} | {m['peak_gib']:.2f} | {ratio} |"


def _step_table(runs: list[dict], modeled: dict | None = None) -> list[str]:
    out = [
        "| config | mode | impl | tokens | s/step | tokens/s | peak GiB | losses | modeled (roofline) s/step | "
        "modeled peak GiB | measured / modeled | note |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for run in runs:
        if run.get("error") or not run.get("rows"):
            out.append(
                f"| {run['config']} | {run['mode']} | {run['impl']} | | | | | | | | | {run.get('error', 'no rows')[:200]} |"
            )
            continue
        for r in run["rows"]:
            losses = ", ".join(f"{x:.4f}" for x in r.get("losses", []))
            peak = "" if r.get("peak_gib") is None else r["peak_gib"]  # None on CPU (dry run)
            out.append(
                f"| {run['config']} | {run['mode']} | {run['impl']} | {r['tokens']} | "
                f"{r.get('seconds_per_step', '')} | {r.get('tokens_per_s', '')} | {peak} | "
                f"{losses} |{_modeled_cells(modeled, run, r)} {r.get('error', '')} |"
            )
    return out


def _modeled_note(modeled: dict | None, dry_run: bool) -> list[str]:
    if not modeled:
        return ["", "No modeled (roofline) figures (see Notes)."]
    where = (
        "the H200 this check is prepared for (DRY RUN: the measured column is CPU time, so the ratio means nothing here)"
        if dry_run
        else modeled["gpu"]
    )
    return [
        "",
        f"Modeled (roofline) columns: fastft.memory.speed_model priced for {where} -- published dense peaks, "
        f"HBM bandwidth, {modeled['launch_overhead_s'] * 1e6:.0f} us per launch; the step model's figures for "
        "the same config (a bound: real kernels reach neither peak). measured / modeled > 1 is the model's "
        "optimism; Liger has no model. Modeled peak memory is tensors only (measured: max_memory_allocated).",
    ]


def _last_line(text: str) -> str:
    text = text.strip()
    return text.splitlines()[-1][:300] if text else ""


def render(result: dict) -> str:
    env = result["environment"]
    dry = " (DRY RUN: CPU, Triton interpreter, tiny shapes -- no figure here is a GPU figure)"
    lines = [
        f"# fastft GPU check{dry if result['dry_run'] else ''}",
        "",
        f"Started {result['started']}, took {result['seconds']:.0f} s. Command: `{result['command']}`",
        "",
        "## Environment",
        "",
    ]
    lines += [f"- {k}: {v}" for k, v in env.items()]
    lines += [
        "",
        "## Test suite (FASTFT_TEST_DEVICE=" + ("cpu" if result["dry_run"] else "cuda") + ")",
        "",
        "| tier | paths | passed | failed | error | skipped | seconds | note |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for t in result["suite"]:
        c = t["counts"]
        note = f"stopped at its {t['limit_s']:.0f} s limit" if t["timed_out"] else f"exit {t['returncode']}"
        lines.append(
            f"| {t['tier']} | {' '.join(t['paths'])} | {c['passed']} | {c['failed']} | {c['error']} | "
            f"{c['skipped']} | {t['seconds']} | {note} |"
        )
    fails = [f for t in result["suite"] for f in t["failures"]]
    if fails:
        lines += ["", "Failures (first lines; full logs beside this report):", ""]
        lines += [f"- `{f['test']}`: {_last_line(f['message'])}" for f in fails]
    lines += ["", "## Kernels", "", *_kernel_table(result["kernels"])] if result.get("kernels") else []
    lines += [
        "",
        "## End-to-end SFT step (batch 1, LoRA r16 on all linear layers, AdamW)",
        "",
        *_step_table(result["steps"], result.get("modeled")),
        *_modeled_note(result.get("modeled"), result["dry_run"]),
    ]
    if result.get("notes"):
        lines += ["", "## Notes", "", *[f"- {n}" for n in result["notes"]]]
    return "\n".join(lines) + "\n"
