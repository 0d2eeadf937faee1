"""Shared pieces of the TRL tests: tiny LoRA runs with and without PatchFastRL, and their per-step logs."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

import torch

import fastft
from fastft.kernels._launch import path_counts
from fastft.offline import build_tiny_model, build_tokenizer

STEPS = 5


def fused_head_available() -> bool:
    """TRL >= 1.15 has the fused-LM-head hook fastft's lean heads run under; on TRL 1.14 PatchFastRL's losses run
    TRL's own code, and the parity tests assert that no fastft head kernel ran there instead."""
    from fastft.patches.trl import _fused_head_problem

    return _fused_head_problem() is None


def assert_head_calls(calls: int, what: str) -> None:
    if fused_head_available():
        assert calls > 0, f"the fast run never reached fastft's {what}"
    else:
        assert calls == 0, f"TRL without a fused-head hook ran fastft's {what} {calls} times"


def lora_config():
    from peft import LoraConfig

    return LoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj", "up_proj"], task_type="CAUSAL_LM"
    )


def common_args(tmp_path, **overrides: Any) -> dict[str, Any]:
    args = dict(
        output_dir=str(tmp_path),
        use_cpu=True,
        report_to="none",
        bf16=False,
        max_steps=STEPS,
        logging_steps=1,
        learning_rate=5e-3,
        seed=0,
        save_strategy="no",
        disable_tqdm=True,
        dataloader_num_workers=0,
        lr_scheduler_type="constant",
    )
    args.update(overrides)
    return args


def trainer_class(algorithm: str, patched: bool) -> type:
    """``trl.<X>Trainer`` as a user would import it, after (or without) PatchFastRL."""
    from fastft.patches.trl import patched_algorithm

    fastft.unpatch()
    if patched:
        assert fastft.PatchFastRL(algorithm) == {algorithm: True}
    from fastft.patches.trl import _TRAINERS

    spec = _TRAINERS[algorithm]  # trl.<X>Trainer, or trl.experimental.<x>.<X>Trainer
    trl = importlib.import_module("trl")
    cls = getattr(trl, spec.class_name, None) or getattr(importlib.import_module(spec.module), spec.class_name)
    assert cls.__name__ == spec.class_name  # patched in place: the very class users imported
    assert patched_algorithm(cls) == (algorithm if patched else None)
    return cls


def run(
    algorithm: str,
    patched: bool,
    make: Callable[[type], Any],
    model_type: str = "llama",
    build: Callable[[], Any] | None = None,
    keep: list | None = None,
    **model_kwargs: Any,
) -> tuple[list[dict[str, float]], int]:
    """Train a fresh tiny model (``build()``, default a causal LM of ``model_type``) for STEPS steps; return the
    logged rows and how many fastft LM-head kernel calls ran. ``keep``: the trainer is appended to it."""
    cls = trainer_class(algorithm, patched)
    try:
        model = build() if build is not None else build_tiny_model(model_type, **model_kwargs)
        torch.manual_seed(0)
        before = _kernel_calls()  # from construction on: DPO can precompute reference log-probs in __init__
        trainer = make(cls, model, build_tokenizer())
        trainer.train()
        calls = _kernel_calls() - before
    finally:
        fastft.unpatch()
    rows = [row for row in trainer.state.log_history if "loss" in row]
    assert len(rows) == trainer.args.max_steps, rows
    if keep is not None:
        keep.append(trainer)
    return rows, calls


def _kernel_calls() -> int:
    # linear_cross_entropy and selective_log_softmax both run cross_entropy's stats kernel per chunk.
    return sum(n for (op, _), n in path_counts.items() if op.startswith("cross_entropy"))


def assert_same_run(
    fast: list[dict[str, float]], slow: list[dict[str, float]], keys: tuple[str, ...], rtol: float = 2e-5, atol: float = 2e-6
) -> None:
    for step, (f, s) in enumerate(zip(fast, slow, strict=True), start=1):
        for key in keys:
            note = f"step {step}, {key}: fast {f[key]} vs TRL {s[key]}"
            torch.testing.assert_close(
                torch.tensor(f[key], dtype=torch.float64),
                torch.tensor(s[key], dtype=torch.float64),
                rtol=rtol,
                atol=atol,
                msg=lambda m, note=note: f"{note}\n{m}",
            )
