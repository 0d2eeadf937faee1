"""The run report: ``report.md`` plus loss (and reward, for GRPO) curves as PNG, all measured, all labeled."""

from __future__ import annotations

import os
import resource
import sys
import time
from typing import Any

import torch


def peak_memory() -> tuple[float, str]:
    """(MiB, label): CUDA max allocated when training ran on a GPU, else this process's peak resident set size."""
    if torch.cuda.is_available() and torch.cuda.max_memory_allocated() > 0:
        return torch.cuda.max_memory_allocated() / 2**20, "CUDA max allocated (torch.cuda.max_memory_allocated)"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    rss_bytes = rss if sys.platform == "darwin" else rss * 1024  # Linux reports KiB
    return rss_bytes / 2**20, "CPU process peak RSS (getrusage ru_maxrss; includes Python, torch and data)"


def series(log_history: list[dict], key: str) -> tuple[list[int], list[float]]:
    steps, values = [], []
    for entry in log_history:
        if key in entry and isinstance(entry[key], (int, float)):
            steps.append(int(entry.get("step", len(steps) + 1)))
            values.append(float(entry[key]))
    return steps, values


def _plot(path: str, title: str, curves: dict[str, tuple[list[int], list[float]]], ylabel: str) -> bool:
    curves = {k: v for k, v in curves.items() if v[0]}
    if not curves:
        return False
    try:
        import matplotlib
    except ImportError:  # plots are optional (pip install matplotlib); the tables in report.md carry the numbers
        from fastft._log import warn_once

        warn_once("fastft: matplotlib is not installed; report.md has no curve images (pip install matplotlib)")
        return False

    matplotlib.use("Agg")  # no display; safe to call again
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for label, (xs, ys) in curves.items():
        ax.plot(xs, ys, marker="o" if len(xs) < 40 else None, markersize=3, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def _fmt(x: float | None, digits: int = 4) -> str:
    return "n/a" if x is None else f"{x:.{digits}g}"


class RunStats:
    """What a training session measured itself: wall time, token counts from TRL's ``num_tokens`` logs."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.end: float | None = None
        self.first_tokens: tuple[float, float] | None = None  # (time, cumulative tokens) at the first log
        self.last_tokens: tuple[float, float] | None = None

    def on_log(self, logs: dict) -> None:
        if "num_tokens" in logs:
            point = (time.perf_counter(), float(logs["num_tokens"]))
            self.first_tokens = self.first_tokens or point
            self.last_tokens = point

    def tokens_per_second(self) -> float | None:
        if not self.first_tokens or not self.last_tokens or self.last_tokens[0] <= self.first_tokens[0]:
            return None
        return (self.last_tokens[1] - self.first_tokens[1]) / (self.last_tokens[0] - self.first_tokens[0])


def write_report(
    output_dir: str,
    *,
    title: str,
    summary: dict[str, Any],
    log_history: list[dict],
    stats: RunStats,
    trainer_type: str,
    patch_report: str | None,
    path_counts: dict,
    device_label: str,
) -> str:
    """Write ``report.md`` and the curve PNGs into ``output_dir``; returns the report path."""
    os.makedirs(output_dir, exist_ok=True)
    lines = [f"# {title}", ""]
    wall = (stats.end or time.perf_counter()) - stats.start
    tps = stats.tokens_per_second()
    mem, mem_label = peak_memory()
    rows = dict(summary)
    rows["device"] = device_label
    rows["wall time of this session"] = f"{wall:.1f} s"
    rows["tokens/second"] = (
        f"{tps:.1f} (training tokens between the first and last log of this session, {device_label})"
        if tps is not None
        else "n/a (the trainer logged no num_tokens)"
    )
    rows["peak memory"] = f"{mem:.0f} MiB -- {mem_label}"
    lines += ["| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows.items()] + [""]

    images = []
    loss = series(log_history, "loss")
    eval_loss = series(log_history, "eval_loss")
    if _plot(
        os.path.join(output_dir, "loss.png"),
        f"{trainer_type.upper()} loss",
        {"train loss": loss, "eval loss": eval_loss},
        "loss",
    ):
        images.append(("Loss", "loss.png"))
    if trainer_type == "grpo":
        reward = series(log_history, "reward")
        if _plot(os.path.join(output_dir, "reward.png"), "GRPO mean reward", {"reward": reward}, "reward"):
            images.append(("Reward", "reward.png"))
    for name, file in images:
        lines += [f"## {name}", "", f"![{name}]({file})", ""]

    lines += ["## Curves (per logged step)", ""]
    keys = ["loss", "eval_loss"] + (["reward", "reward_std"] if trainer_type == "grpo" else [])
    present = [k for k in keys if series(log_history, k)[0]]
    if present:
        lines += ["| step | " + " | ".join(present) + " |", "|---" * (len(present) + 1) + "|"]
        by_step: dict[int, dict[str, float]] = {}
        for k in present:
            for s, v in zip(*series(log_history, k)):
                by_step.setdefault(s, {})[k] = v
        for s in sorted(by_step):
            lines.append(f"| {s} | " + " | ".join(_fmt(by_step[s].get(k)) for k in present) + " |")
        lines.append("")

    lines += ["## Fast paths", "", f"- model patches: {patch_report or 'none recorded'}"]
    if path_counts:
        lines.append(
            "- kernel calls by path (fastft.kernels.path_counts; 'torch' = the op's torch path, "
            "'triton' = its Triton kernel, on CPU only under the Triton interpreter):"
        )
        lines += [f"  - {op}: {path} x{n}" for (op, path), n in sorted(path_counts.items())]
    else:
        lines.append("- no fastft kernel calls were counted")
    lines.append("")
    path = os.path.join(output_dir, "report.md")
    with open(path, "w", encoding="utf-8") as fh:
        fh.write("\n".join(lines))
    return path
