"""The start-of-training summary: one block, printed when a patched trainer's first optimizer step ends, that says
what ran in that step and every fallback fastft took, with its reason.

Printed after step 1 rather than before it because what runs is decided at run time (a fused LoRA layer falls back
at its first forward when its input is not what the kernel expects; a loss head falls back per call), and a summary
of intentions would repeat the silent-fallback problem it exists to end. The block reads facts, not flags:

* ``ran in step 1``: the fused ops that ran during the step and on which path (``fastft.kernels.path_counts``);
* ``kernels``: what ``FastModel.from_pretrained`` patched into the model (its :class:`PatchReport`);
* ``fused LoRA``: how many MLPs and attention projections ``FastModel.get_peft_model`` gave the fused path, and
  how step 1's calls went (fused, or PEFT's path with the reason in the notes: ``lora_path_counts``);
* ``loss head``: fastft's chunked cross-entropy ran (no full logits) or the loss ran TRL's / transformers' code;
* ``optimizer``, ``checkpointing``, ``precision``: read off the trainer, its optimizer and the model;
* ``notes``: every fastft message (fallback or choice) since the model was loaded, each once, even one said
  before in this process (a notebook's second run gets the whole list again).

``FASTFT_LOG=debug`` logs each fused call's path as it happens (:mod:`fastft._log`).
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch

from fastft._log import logger, mark, notes_since
from fastft.kernels import INTERPRETER, TRITON_AVAILABLE, path_counts
from fastft.patches.peft_lora import lora_path_counts

#: ops of the loss head: linear_cross_entropy and selective_log_softmax run cross_entropy's kernels per chunk
_HEAD_OPS = ("cross_entropy", "cross_entropy_backward")


def _chain(model: Any) -> list[Any]:
    """``model`` and each model inside it: DDP / accelerate wrappers, then PEFT's, down to the transformers model."""
    chain = [model]
    while isinstance(getattr(chain[-1], "module", None), torch.nn.Module):
        chain.append(chain[-1].module)
    if hasattr(chain[-1], "get_base_model"):
        chain.append(chain[-1].get_base_model())
    return chain


def _attr(chain: list[Any], name: str) -> Any:
    """The first of ``chain`` that carries ``name`` (FastModel sets some on the PEFT model, some on the base)."""
    return next((vars(m)[name] for m in chain if name in vars(m)), None)


def _device_path(model: Any) -> str:
    try:
        device = next(model.parameters()).device
    except (StopIteration, AttributeError):
        return "unknown device"
    if device.type == "cuda":
        return f"{device}: Triton kernels"
    if INTERPRETER:
        return f"{device}: Triton kernels under the interpreter (TRITON_INTERPRET=1: slow, for tests)"
    why = "triton is not installed" if not TRITON_AVAILABLE else "not CUDA"
    return f"{device}: fused ops run their torch code ({why}), same memory algorithm"


def _precision(trainer: Any, model: Any) -> str:
    args = getattr(trainer, "args", None)
    dtype = next((p.dtype for p in model.parameters() if p.requires_grad), None) if model is not None else None
    weights = str(dtype).replace("torch.", "") if dtype is not None else "no trainable weights"
    if getattr(args, "bf16", False):
        return f"bf16 mixed precision (autocast); trainable weights {weights}"
    if getattr(args, "fp16", False):
        return f"fp16 mixed precision (autocast + GradScaler); trainable weights {weights}"
    return f"no mixed precision; trainable weights {weights}"


def _checkpointing(model: Any) -> str:
    from fastft.patches.checkpointing import offloaded_checkpoint

    if model is None or not getattr(model, "is_gradient_checkpointing", False):
        return "off"
    funcs = {
        getattr(m, "_gradient_checkpointing_func", None)
        for m in model.modules()
        if getattr(m, "gradient_checkpointing", False)
    }
    if offloaded_checkpoint in funcs:
        return "fastft: layer inputs offloaded to pinned host memory, recomputed in backward"
    return "standard: layer activations recomputed in backward"


def _optimizer(trainer: Any) -> str:
    optimizer = getattr(trainer, "optimizer", None)
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer
    if inner is None:
        return "not built yet"
    cls = type(inner)
    optim = getattr(getattr(trainer, "args", None), "optim", None)
    optim = getattr(optim, "value", optim)
    who = "built by fastft.optim" if getattr(inner, "_fastft_built", False) else "built by the Trainer"
    return f"{cls.__name__} ({cls.__module__}), {who} for optim={optim!r}"


def _ran(delta: Counter) -> str:
    if not delta:
        return "no fastft op"
    by_path: dict[str, list[str]] = {}
    for (op, path), n in sorted(delta.items()):
        by_path.setdefault(path, []).append(f"{op} x{n}")
    return "; ".join(f"{path}: {', '.join(ops)}" for path, ops in sorted(by_path.items()))


def _kernels(chain: list[Any]) -> str:
    report = _attr(chain, "_fastft_patch_report")
    if report is None:
        return "none in the model (not loaded by FastModel.from_pretrained)"
    return str(report).removeprefix("fastft: ")


def _fused_lora(chain: list[Any], lora_delta: Counter) -> str:
    counts = _attr(chain, "_fastft_fused_lora")
    if counts is None:
        return "none (no FastModel.get_peft_model adapters)"
    installed = f"installed on {counts.get('mlp', 0)} MLPs, {counts.get('attention', 0)} attention projections"
    if not lora_delta:
        return installed + "; none called in step 1"
    calls = ", ".join(f"{kind} {path} x{n}" for (kind, path), n in sorted(lora_delta.items()))
    fell_back = any(path == "peft" for _, path in lora_delta)
    return f"{installed}; step 1: {calls}" + (" (PEFT's path: reasons in notes)" if fell_back else "")


def _loss_head(delta: Counter, algorithm: str | None) -> str:
    from fastft.patches.trl import lean_head_absent

    calls = sum(n for (op, _), n in delta.items() if op in _HEAD_OPS)
    absent = lean_head_absent(algorithm)
    if absent:  # a row without a lean head: say why, and what ran instead
        return f"{absent}; the loss is TRL's {algorithm} code as written" + (
            f" (fastft cross-entropy ran {calls} chunk calls elsewhere)" if calls else ""
        )
    if calls:
        return f"fastft chunked cross-entropy ({calls} chunk calls in step 1): only scored tokens, no full logits"
    who = f"TRL's {algorithm} code" if algorithm else "transformers' code"
    return f"{who}: full logits (no fastft cross-entropy ran in step 1; see notes for why)"


def summary_block(trainer: Any, delta: Counter, since: int, lora_delta: Counter | None = None) -> str:
    """The summary as text (see the module docstring); ``delta`` / ``lora_delta``: ``path_counts`` /
    ``lora_path_counts`` during step 1; ``since``: the :func:`fastft._log.mark` from which notes are listed."""
    from fastft.patches.trl import patched_algorithm

    algorithm = patched_algorithm(trainer)
    chain = _chain(getattr(trainer, "model", None))
    model = chain[-1]
    rows = [
        ("device", _device_path(model)),
        ("precision", _precision(trainer, model)),
        ("ran in step 1", _ran(delta)),
        ("kernels", _kernels(chain)),
        ("fused LoRA", _fused_lora(chain, lora_delta or Counter())),
        ("loss head", _loss_head(delta, algorithm)),
        ("optimizer", _optimizer(trainer)),
        ("checkpointing", _checkpointing(model)),
    ]
    title = f"fastft: {type(trainer).__name__} step 1 (PatchFastRL({algorithm!r}))"
    width = max(len(name) for name, _ in rows)
    lines = [title] + [f"  {name:<{width}}  {value}" for name, value in rows]
    notes = notes_since(since)
    lines.append(f"  {'notes':<{width}}  " + ("none" if not notes else f"{len(notes)}"))
    lines += [f"    - {note.removeprefix('fastft: ')}" for note in notes]
    lines.append(f"  {'':<{width}}  FASTFT_LOG=debug logs the path of every fused call")
    return "\n".join(lines)


def attach(trainer: Any, since: int | None = None) -> None:
    """Print :func:`summary_block` once, when ``trainer``'s first optimizer step ends (a TrainerCallback; the
    block also goes to the ``fastft`` logger at INFO). Notes are listed from FastModel's load of the model, else
    from ``since`` (the trainer's construction), else from now."""
    from transformers import TrainerCallback

    model_mark = _attr(_chain(getattr(trainer, "model", None)), "_fastft_notes_from")
    since = model_mark if model_mark is not None else (since if since is not None else mark())

    class _Summary(TrainerCallback):
        def __init__(self) -> None:
            self.before: Counter | None = None
            self.lora_before: Counter = Counter()
            self.done = False

        def on_step_begin(self, args, state, control, **kwargs):
            if not self.done and self.before is None:
                self.before, self.lora_before = Counter(path_counts), Counter(lora_path_counts)

        def on_step_end(self, args, state, control, **kwargs):
            if self.done or self.before is None:
                return
            self.done = True
            if not state.is_local_process_zero:
                return
            delta, lora_delta = Counter(path_counts), Counter(lora_path_counts)
            delta.subtract(self.before)
            lora_delta.subtract(self.lora_before)
            block = summary_block(trainer, +delta, since, +lora_delta)
            print(block, flush=True)
            logger.info(block)

    trainer.add_callback(_Summary())


__all__ = ["attach", "summary_block"]
