"""Run a validated :class:`TrainConfig`: FastModel + LoRA, datasets, the (fast) TRL trainer, time budget and
preemption, resume, and the report.

Time budget and preemption: :func:`make_stop_callback`'s callback turns ``--max-minutes`` (stop before the next
step would overrun) and SIGTERM/SIGINT into ``control.should_save`` + ``control.should_training_stop`` at the end of
the current step, so the HF Trainer writes a full checkpoint (adapters, optimizer, scheduler, RNG states, trainer
state with the data position) and returns normally. ``resume`` continues from the latest ``checkpoint-*`` in
``output_dir``; the Trainer restores all of the above and skips the batches already seen, so the resumed losses equal
an uninterrupted run's.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import torch

from fastft import sources
from fastft.train.config import ConfigError, TrainConfig, split_model_section, trainer_config_class
from fastft.train.report import RunStats, write_report

TINY_PREFIX = sources.TINY_PREFIX
TRAINER_NAMES = {"sft": "SFT", "dpo": "DPO", "grpo": "GRPO"}


@dataclasses.dataclass
class RunResult:
    output_dir: str
    global_step: int
    log_history: list[dict[str, Any]]
    stopped_reason: str | None  # None: ran to the end; else why it stopped early (a checkpoint was saved)
    checkpoint: str | None  # the checkpoint written when stopping early
    resumed_from: str | None
    report_path: str
    trainer_class: str
    exported: list[str] = dataclasses.field(default_factory=list)  # files written by the config's ``export:``
    trainer: Any = dataclasses.field(default=None, repr=False)  # the trainer (its .model is the trained model)


def resolve_model_name(name: str, output_dir: str) -> str:
    """``tiny:<arch>`` -> a tiny offline model saved (once) under ``output_dir/.fastft-tiny-model/<arch>``; a local
    path has ``~`` expanded (validate() checked the expanded path; transformers does not expand it)."""
    if not name.startswith(TINY_PREFIX):
        return os.path.expanduser(name)
    from fastft.offline import TINY_ARCHITECTURES, save_tiny_model

    arch = name[len(TINY_PREFIX) :] or "llama"
    if arch not in TINY_ARCHITECTURES:
        raise ConfigError([f"model.name: no tiny model {arch!r}; known: {', '.join(sorted(TINY_ARCHITECTURES))}"])
    target = os.path.join(output_dir, ".fastft-tiny-model", arch)
    if not os.path.isfile(os.path.join(target, "config.json")):
        # Every rank of a multi-process run may get here: each writes its own temporary folder and renames it into
        # place atomically, so no rank ever reads a half-written model (the model is deterministic, so any copy wins).
        import shutil
        import tempfile

        os.makedirs(os.path.dirname(target), exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=f".{arch}-", dir=os.path.dirname(target))
        save_tiny_model(tmp, arch)
        try:
            os.replace(tmp, target)
        except OSError:  # another rank won the race: its copy is identical
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_resume(resume: bool | str, output_dir: str) -> str | None:
    from transformers.trainer_utils import get_last_checkpoint

    if resume is False or resume is None:
        return None
    if isinstance(resume, str) and resume != "auto":
        return resume
    last = get_last_checkpoint(output_dir) if os.path.isdir(output_dir) else None
    if last is None and resume is True:
        raise ConfigError(
            [
                f"resume: no checkpoint-* directory in {output_dir!r} to resume from "
                "(use resume: auto to start fresh when there is none)"
            ]
        )
    return last


def make_stop_callback(max_minutes: float | None, stats: RunStats) -> Any:
    """A TrainerCallback that stops at a step end -- with a checkpoint -- on a time budget or a signal."""
    from transformers import TrainerCallback

    class _StopCallback(TrainerCallback):
        def __init__(self, max_minutes: float | None, stats: RunStats) -> None:
            self.deadline = None if max_minutes is None else time.perf_counter() + 60.0 * max_minutes
            self.max_minutes = max_minutes
            self.stats = stats
            self.reason: str | None = None
            self.stopped_at: int | None = None
            self._session_start = time.perf_counter()
            self._first_step: int | None = None

        def request_stop(self, reason: str) -> None:
            if self.reason is None:
                self.reason = reason

        def on_step_begin(self, args, state, control, **kwargs):
            if self._first_step is None:
                self._first_step = state.global_step
                self._session_start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            now = time.perf_counter()
            if self.reason is None and self.deadline is not None:
                done = max(1, state.global_step - (self._first_step or 0))
                per_step = (now - self._session_start) / done
                if now + per_step > self.deadline:  # the next step would overrun the budget: stop now
                    self.reason = f"time budget of {self.max_minutes:g} min (--max-minutes)"
            if self.reason is not None and state.global_step < state.max_steps:
                control.should_save = True
                control.should_training_stop = True
                self.stopped_at = state.global_step
            return control

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs:
                self.stats.on_log(logs)

    return _StopCallback(max_minutes, stats)


@contextlib.contextmanager
def _stop_on_signals(callback: Any) -> Iterator[None]:
    """SIGTERM/SIGINT -> checkpoint and stop at the end of the current step; a second signal acts as usual."""
    previous: dict[int, Any] = {}

    def handler(signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        print(f"\nfastft: received {name}; saving a checkpoint at the end of this step (send again to abort)", flush=True)
        callback.request_stop(f"signal {name}")
        signal.signal(signum, previous.get(signum, signal.SIG_DFL))

    import threading

    if threading.current_thread() is not threading.main_thread():  # signals can only be caught on the main thread
        yield
        return
    for sig in (signal.SIGTERM, signal.SIGINT):
        previous[sig] = signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _default_args(cfg: TrainConfig) -> dict[str, Any]:
    on_cuda = torch.cuda.is_available()
    args: dict[str, Any] = {
        "output_dir": cfg.output_dir,
        "report_to": "none",
        "use_cpu": not on_cuda,
        # FastModel.get_peft_model owns checkpointing (offloaded on CUDA); TRL's default
        # of enabling it again would wrap the layers twice.
        "gradient_checkpointing": False,
    }
    if on_cuda:
        bf16 = torch.cuda.is_bf16_supported()
        args.update(bf16=bf16, fp16=not bf16)  # T4 (sm_75) has no bf16
    else:
        args.update(bf16=False, fp16=False)  # CPU trains in fp32
    if cfg.trainer_type in ("sft", "dpo") and "max_seq_length" in cfg.model:
        args["max_length"] = cfg.model["max_seq_length"]
    if cfg.trainer_type == "grpo" and any(r["weight"] != 1.0 for r in cfg.rewards):
        args["reward_weights"] = [r["weight"] for r in cfg.rewards]
    return args


def build_training_args(cfg: TrainConfig, data_fields: dict[str, Any] | None = None, has_eval: bool = False):
    """The TRL config object: fastft defaults < data-implied fields < the YAML's trainer/optim sections."""
    cls = trainer_config_class(cfg.trainer_type)
    args = {**_default_args(cfg), **(data_fields or {}), **cfg.trainer_args}
    embedding_lr = args.pop("embedding_learning_rate", None)
    if has_eval and "eval_strategy" not in cfg.trainer_args:
        args["eval_strategy"] = "steps"  # eval_steps defaults to logging_steps
    try:
        training_args = cls(**args)
    except (ValueError, TypeError) as exc:
        raise ConfigError([f"trainer: {cls.__name__} rejected the settings: {exc}"]) from None
    if embedding_lr is not None:
        training_args.embedding_learning_rate = embedding_lr
    return training_args


def load_model(cfg: TrainConfig, model_name: str) -> tuple[Any, Any]:
    from fastft.model import FastModel

    load, training = split_model_section(cfg.model)  # model: keys, by the signature each belongs to
    model, tokenizer = FastModel.from_pretrained(model_name, **load)
    if cfg.lora is not None:
        model = FastModel.get_peft_model(model, **cfg.lora, **training)
    else:
        FastModel.for_training(model, **training)
    return model, tokenizer


def trainer_class(trainer_type: str) -> tuple[type, str]:
    """(class, note): TRL's class with fastft's hooks (PatchFastRL patches it in place), or untouched if declined."""
    import trl

    name = f"{TRAINER_NAMES[trainer_type]}Trainer"
    try:
        from fastft import PatchFastRL

        patched = PatchFastRL(TRAINER_NAMES[trainer_type]).get(TRAINER_NAMES[trainer_type], False)
        cls = getattr(trl, name)
        note = (
            "TRL's trainer with fastft's fast hooks (PatchFastRL)"
            if patched
            else "TRL's trainer (PatchFastRL declined; see warning)"
        )
    except Exception as exc:  # noqa: BLE001 - any failure of the optional fast path falls back, and says so
        from fastft._log import warn_once

        warn_once(f"fastft: PatchFastRL({TRAINER_NAMES[trainer_type]!r}) failed ({exc!r}); using TRL's {name}")
        from importlib import import_module

        cls = getattr(import_module(f"trl.trainer.{trainer_type}_trainer"), name)
        note = f"TRL's trainer (PatchFastRL failed: {exc.__class__.__name__})"
    return cls, f"{cls.__module__}.{cls.__qualname__} -- {note}"


def _patch_report(model: Any) -> str | None:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    report = getattr(base, "_fastft_patch_report", None)
    return str(report) if report is not None else None


def run(
    cfg: TrainConfig,
    *,
    max_minutes: float | None = None,
    resume: bool | str | None = None,
    callbacks: list[Any] | None = None,
    quiet: bool = False,
) -> RunResult:
    """Train as ``cfg`` says. ``max_minutes``/``resume`` override the config's; ``callbacks`` are added to the
    trainer's; ``quiet`` drops transformers' progress bar and log printing (the demo prints its own lines)."""
    from fastft.kernels import path_counts
    from fastft.train.data import load_datasets, trainer_fields
    from fastft.train.rewards import resolve_reward

    max_minutes = cfg.max_minutes if max_minutes is None else max_minutes
    resume_from = resolve_resume(cfg.resume if resume is None else resume, cfg.output_dir)
    if resume_from is not None:
        from fastft.distributed import check_resume_world_size

        try:  # a checkpoint written by N processes resumed by M would silently change the data order and batch
            check_resume_world_size(resume_from)
        except ValueError as exc:
            raise ConfigError([f"resume: {exc}"]) from exc
    build_training_args(cfg)  # fail on a bad trainer setting before the model loads
    # The data is read and its format and columns checked before the model loads (or a tiny one is built): a wrong
    # file or column fails in seconds. What needs the tokenizer (chat template) is checked once it exists.
    loaded = load_datasets(cfg.data, cfg.trainer_type, cfg.rewards)
    train_ds, eval_ds, fmt = loaded.train, loaded.evaluation, loaded.fmt
    os.makedirs(cfg.output_dir, exist_ok=True)

    model_name = resolve_model_name(cfg.model["name"], cfg.output_dir)
    model, tokenizer = load_model(cfg, model_name)
    data_fields = trainer_fields(cfg.data, cfg.trainer_type, loaded, tokenizer)
    args = build_training_args(cfg, data_fields, has_eval=eval_ds is not None)

    cls, class_note = trainer_class(cfg.trainer_type)
    stats = RunStats()
    stop = make_stop_callback(max_minutes, stats)
    # `stop` goes last so it sees, in the same step, a stop requested by the callbacks before it.
    kwargs: dict[str, Any] = dict(
        model=model,
        args=args,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        processing_class=tokenizer,
        callbacks=[*(callbacks or []), stop],
    )
    if cfg.trainer_type == "grpo":
        kwargs["reward_funcs"] = [resolve_reward(r["function"]) for r in cfg.rewards]
    trainer = cls(**kwargs)
    if quiet:
        from transformers.trainer_callback import PrinterCallback, ProgressCallback

        trainer.remove_callback(PrinterCallback)
        trainer.remove_callback(ProgressCallback)

    counts_before = Counter(path_counts)
    with _stop_on_signals(stop):
        trainer.train(resume_from_checkpoint=resume_from)
    stats.end = time.perf_counter()
    counts = Counter(path_counts)
    counts.subtract(counts_before)
    counts = {k: v for k, v in counts.items() if v > 0}

    checkpoint = None
    exported: list[str] = []
    if stop.reason is not None and stop.stopped_at is not None:
        checkpoint = os.path.join(cfg.output_dir, f"checkpoint-{stop.stopped_at}")
    else:
        trainer.save_model(cfg.output_dir)  # the final adapters (or model) + tokenizer
        if cfg.export:  # an early stop exports nothing: the run resumes and exports at its end
            from fastft.export.train_hook import export_after_training

            exported = export_after_training(trainer.model, tokenizer, cfg.output_dir, cfg.export)

    device = "CUDA" if torch.cuda.is_available() else "CPU"
    summary = {
        "model": f"{cfg.model['name']}" + (f" ({model_name})" if model_name != cfg.model["name"] else ""),
        "trainer": class_note,
        "adapters": f"LoRA {cfg.lora}" if cfg.lora is not None else "none (full fine-tuning)",
        "data": f"{cfg.data['path']} ({fmt}; {len(train_ds)} train" + (f", {len(eval_ds)} eval)" if eval_ds else ")"),
        "global step": f"{trainer.state.global_step} / {trainer.state.max_steps}",
        "resumed from": resume_from or "no (fresh run)",
        "stopped": f"early: {stop.reason}; checkpoint {checkpoint}" if stop.reason else "ran to the end",
    }
    if cfg.export:
        summary["export"] = ", ".join(exported) if exported else f"{cfg.export} not written (stopped early)"
    report_path = write_report(
        cfg.output_dir,
        title=f"fastft {cfg.trainer_type.upper()} run report",
        summary=summary,
        log_history=trainer.state.log_history,
        stats=stats,
        trainer_type=cfg.trainer_type,
        patch_report=_patch_report(model),
        path_counts=counts,
        device_label=device,
    )
    return RunResult(
        output_dir=cfg.output_dir,
        global_step=trainer.state.global_step,
        log_history=list(trainer.state.log_history),
        stopped_reason=stop.reason,
        checkpoint=checkpoint,
        resumed_from=resume_from,
        report_path=report_path,
        trainer_class=class_note,
        exported=exported,
        trainer=trainer,
    )
