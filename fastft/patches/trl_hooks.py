"""The hooks PatchFastRL installs on TRL's trainer classes (see :mod:`fastft.patches.trl`): the loss hooks that put
fastft's lean heads (:mod:`fastft.patches.trl_heads`) under TRL's own loss code, the optimizer, generation and
``__init__`` hooks shared by every row."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

import torch

from fastft._log import info_once, logger, mark, warn_once
from fastft.patches import modes, trl_summary
from fastft.patches.causal_lm_loss import logits_required
from fastft.patches.lm_head import router_aux_modeling
from fastft.patches.trl_config import _apply_checkpointing, _apply_max_seq_length
from fastft.patches.trl_heads import LOSS_ONLY, FastHeadDeclined, _fast_heads, _without_fused_head

#: The ``FastModel`` passed to PatchFastRL (Unsloth compatibility); None -> fastft's own modes (fastft.patches.modes).
_FAST_MODEL: Any = None


# --------------------------------------------------------------------------------------------------------------------
# Shared trainer pieces: optimizer and generation hooks
# --------------------------------------------------------------------------------------------------------------------
def _fastft_create_optimizer(trainer: Any, model: Any) -> torch.optim.Optimizer | None:
    """fastft.optim's optimizer for this trainer, or None to let the parent build TRL's/transformers' default."""
    if trainer.optimizer is not None:
        return None
    try:
        from fastft.optim import create_optimizer
    except ImportError as exc:
        info_once(f"fastft: fastft.optim unavailable ({exc}); using the trainer's default optimizer", key="optim-import")
        return None
    try:
        optimizer = create_optimizer(trainer.model if model is None else model, trainer.args)
    except NotImplementedError as exc:
        info_once(
            f"fastft: fastft.optim does not handle this configuration ({exc}); using the default optimizer",
            key=f"optim-nie:{exc}",
        )
        return None
    return optimizer


def _hook_create_optimizer(original: Callable) -> Callable:
    def create_optimizer(self, *args, **kwargs):
        model = args[0] if args else kwargs.get("model")
        optimizer = _fastft_create_optimizer(self, model)
        if optimizer is None:
            return original(self, *args, **kwargs)
        self.optimizer = optimizer
        optimizer._fastft_built = True  # read by the start-of-training summary
        logger.info("fastft: optimizer %s from fastft.optim", type(optimizer).__name__)
        return self.optimizer

    return create_optimizer


def _mode_switches() -> tuple[Callable | None, Callable | None]:
    """(for_inference, for_training) around GRPO's generation: the FastModel PatchFastRL was given (Unsloth's, say),
    else fastft's own (:mod:`fastft.patches.modes`, which FastModel's methods are)."""
    if _FAST_MODEL is None:
        return modes.for_inference, modes.for_training
    return getattr(_FAST_MODEL, "for_inference", None), getattr(_FAST_MODEL, "for_training", None)


# --------------------------------------------------------------------------------------------------------------------
# The hooks each trainer gets (installed on TRL's class itself: every reference to it, and every trainer already
# built, sees them; ``fastft.unpatch()`` restores the class)
# --------------------------------------------------------------------------------------------------------------------
#: Per-token fields the SFT fast head fills for TRL's metrics (entropy, mean_token_accuracy).
_SFT_METRIC_OUTPUTS = ("entropy", "is_top1")
#: Instance attributes of SFTTrainer the fast SFT loss reads (TRL >= 1.15); a trainer without them runs TRL's code.
_SFT_ATTRIBUTES = (
    "compute_loss_func",
    "aux_loss_enabled",
    "label_smoother",
    "_metrics",
    "_total_train_tokens",
    "_tp_size",
    "get_tp_size",
)


def _sft_fast_loss_problem(trainer: Any, inputs: dict, return_outputs: bool) -> str | None:
    missing = [name for name in _SFT_ATTRIBUTES if not hasattr(trainer, name)]
    if missing:
        return f"this SFTTrainer lacks {', '.join(missing)}"
    if return_outputs:
        return "return_outputs=True"
    if trainer.compute_loss_func is not None:
        return "a custom compute_loss_func"
    if trainer.aux_loss_enabled:
        return "an MoE aux loss"
    if _label_smoothing(trainer) is None:
        return "label smoothing by a custom label smoother"
    if getattr(trainer.args, "loss_type", "nll") != "nll":
        return f"loss_type={trainer.args.loss_type!r}"
    if "shift_labels" in inputs:
        return "pre-shifted labels (context/sequence parallelism)"
    parallelism = getattr(trainer.accelerator, "parallelism_config", None)
    if parallelism is not None and getattr(parallelism, "sp_enabled", False):
        return "sequence parallelism"
    return None


def _label_smoothing(trainer: Any) -> float | None:
    """The epsilon of transformers' own LabelSmoother (0.0 without one), which the fused loss computes exactly (its
    ``label_smoothing``); None for any other smoother."""
    smoother = trainer.label_smoother
    if smoother is None:
        return 0.0
    from transformers.trainer_pt_utils import LabelSmoother

    if type(smoother) is LabelSmoother and smoother.ignore_index == -100:
        return float(smoother.epsilon)
    return None


def _hook_sft_compute_loss(original: Callable) -> Callable:
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None, **kwargs):
        if _without_fused_head("SFT"):
            _warn_trl_chunked_nll_smoothing(self)
            with logits_required():  # TRL < 1.15 reads outputs.logits: FastModel's loss steps aside
                return original(self, model, inputs, return_outputs, num_items_in_batch, **kwargs)
        problem = "arguments fastft does not know: " + ", ".join(kwargs) if kwargs else None
        problem = problem or _sft_fast_loss_problem(self, inputs, return_outputs)
        if problem:
            # e.g. DFT needs per-token log-probs: TRL's code with the fast per-token head underneath.
            info_once(
                f"fastft: SFT loss runs TRL's code over fastft's per-token head ({problem})", key=f"sft-trl-loss:{problem}"
            )
            with _fast_heads(self, temperature=1.0, policy_outputs=None):
                return original(self, model, inputs, return_outputs, num_items_in_batch, **kwargs)
        mode = "train" if self.model.training else "eval"
        inputs["use_cache"] = False
        outputs_wanted = _SFT_METRIC_OUTPUTS if getattr(self, "fastft_token_metrics", True) else ()
        smoothing = _label_smoothing(self)
        try:
            with _fast_heads(self, temperature=1.0, policy_outputs=outputs_wanted, label_smoothing=smoothing) as fast:
                if smoothing and not fast:
                    raise FastHeadDeclined("no fastft head installed")
                outputs = model(**inputs, fused_lm_head=LOSS_ONLY if fast else True, num_items_in_batch=num_items_in_batch)
        except FastHeadDeclined as exc:  # label smoothing needs fastft's head (TRL's has none): TRL's own loss
            info_once(f"fastft: SFT loss with label smoothing runs TRL's code ({exc})", key=f"sft-smoothing:{exc}")
            with _fast_heads(self, temperature=1.0, policy_outputs=None):
                return original(self, model, inputs, return_outputs, num_items_in_batch, **kwargs)
        # `outputs.loss` is sum(-log p) / max(num_items_in_batch or #valid, 1): TRL's reduction exactly.
        loss = outputs.loss
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * (self.accelerator.num_processes // self.get_tp_size())
        _log_sft_metrics(self, mode, inputs, outputs)
        return loss

    return compute_loss


def _warn_trl_chunked_nll_smoothing(trainer: Any) -> None:
    """TRL 1.14's default ``loss_type='chunked_nll'`` with a label smoother fails in TRL's own compute_loss, patched or
    not: transformers pops ``labels`` for the smoother, TRL's chunked forward then runs the plain forward, and TRL reads
    ``outputs.num_valid_tokens`` off its output (AttributeError). fastft runs TRL's code unchanged there (the same
    error as unpatched TRL) and says why once, with the way out."""
    if getattr(trainer.args, "loss_type", None) == "chunked_nll" and getattr(trainer, "label_smoother", None):
        warn_once(
            "fastft: this TRL's SFTTrainer with loss_type='chunked_nll' (its default) and label_smoothing_factor "
            "> 0 fails in TRL's own compute_loss (no num_valid_tokens: the smoother takes the labels); fastft "
            "runs TRL's code unchanged. Set loss_type='nll' to train with label smoothing on this TRL",
            key="sft-chunked-nll-smoothing",
        )


def _log_sft_metrics(trainer: Any, mode: str, inputs: dict, outputs: Any) -> None:
    # The same metrics, gathered the same way, as SFTTrainer.compute_loss in TRL 1.16.
    gather = trainer.accelerator.gather_for_metrics
    metrics = trainer._metrics[mode]
    if outputs.entropy is not None and outputs.is_top1 is not None:
        num_valid = gather(outputs.label_mask.sum()).sum()
        entropy_sum = gather(outputs.entropy.detach().sum()).sum()
        num_correct = gather(outputs.is_top1.sum()).sum()
        metrics["entropy"].append((entropy_sum / num_valid).item() if num_valid > 0 else 0.0)
        metrics["mean_token_accuracy"].append((num_correct / num_valid).item() if num_valid > 0 else 0.0)
    else:
        info_once(
            "fastft: fastft_token_metrics is False on this trainer: entropy and mean_token_accuracy are not "
            "logged (skips their argmax / entropy terms in the loss pass)",
            key="sft-no-metrics",
        )
    if mode == "train":
        if "attention_mask" in inputs:
            num_tokens = gather(inputs["attention_mask"].sum()).sum().item()
        elif "position_ids" in inputs:
            local = torch.tensor(inputs["position_ids"].size(1), device=inputs["position_ids"].device)
            num_tokens = gather(local).sum().item()
        else:
            raise ValueError("Expected 'attention_mask' or 'position_ids' in inputs.")
        trainer._total_train_tokens += num_tokens // trainer._tp_size
    metrics["num_tokens"] = [trainer._total_train_tokens]


def _hook_per_token_head(algorithm: str) -> Callable[[Callable], Callable]:
    """DPO's compute_loss / compute_ref_log_probs: TRL's code, with fastft's head under TRL's fused-head calls
    (the per-token fields are the ones TRL configured its head with)."""

    def hook(original: Callable) -> Callable:
        def method(self, *args, **kwargs):
            if _without_fused_head(algorithm):
                with logits_required():  # TRL < 1.15 reads outputs.logits: FastModel's loss steps aside
                    return original(self, *args, **kwargs)
            with _fast_heads(self, temperature=1.0, policy_outputs=None):
                return original(self, *args, **kwargs)

        return method

    return hook


#: GRPO log-prob arguments the fast head covers; any other argument that is not None (images, new inputs) -> TRL's.
_GRPO_TEXT_ARGS = frozenset(
    {"self", "model", "input_ids", "attention_mask", "logits_to_keep", "batch_size", "compute_entropy", "compute_aux_loss"}
)


def _hook_policy_log_probs(algorithm: str) -> Callable[[Callable], Callable]:
    """``_get_per_token_logps_and_entropies`` of GRPO-shaped trainers (GRPO, RLOO: the same method and arguments)."""
    return functools.partial(_hook_grpo_log_probs, algorithm=algorithm)


def _hook_grpo_log_probs(original: Callable, algorithm: str = "GRPO") -> Callable:
    signature = inspect.signature(original)
    takes_entropy_flag = "compute_entropy" in signature.parameters

    def _get_per_token_logps_and_entropies(self, *args, **kwargs):
        if _without_fused_head(algorithm):
            with logits_required():  # TRL < 1.15 reads outputs.logits: FastModel's loss steps aside
                return original(self, *args, **kwargs)
        try:
            arguments = _named_arguments(signature, self, *args, **kwargs)
        except TypeError:
            return original(self, *args, **kwargs)
        other = sorted(name for name, value in arguments.items() if name not in _GRPO_TEXT_ARGS and value is not None)
        temperature = getattr(self, "temperature", None)
        # MoE rows of fastft's table: the fast head returns the model's own aux loss (fastft.patches.trl_heads)
        aux_uncovered = (
            arguments.get("compute_aux_loss")
            and router_aux_modeling(getattr(getattr(self, "model", None), "config", None)) is None
        )
        if aux_uncovered or other or temperature is None:
            reason = (
                "an MoE aux loss"
                if aux_uncovered
                else (f"inputs {', '.join(other)}" if other else "no temperature on the trainer")
            )
            info_once(f"fastft: {algorithm} log-probs use TRL's path ({reason})", key=f"{algorithm}-fallback:{reason}")
            return original(self, *args, **kwargs)
        # The old-policy and reference passes need no entropy: don't compute one (TRL's head always does).
        wants_entropy = arguments.get("compute_entropy") if takes_entropy_flag else True
        outputs = ("log_probs", "entropy") if wants_entropy else ("log_probs",)
        with _fast_heads(self, temperature=temperature, policy_outputs=outputs):
            return original(self, *args, **kwargs)

    return _get_per_token_logps_and_entropies


def _named_arguments(signature: inspect.Signature, *args: Any, **kwargs: Any) -> dict[str, Any]:
    """The call's arguments by parameter name (``**kwargs`` flattened in; ``*args`` kept under its own name)."""
    bound = signature.bind(*args, **kwargs)
    named = {}
    for name, value in bound.arguments.items():
        kind = signature.parameters[name].kind
        if kind is inspect.Parameter.VAR_KEYWORD:
            named.update(value)
        elif kind is inspect.Parameter.VAR_POSITIONAL:
            named[name] = value or None
        else:
            named[name] = value
    return named


def _hook_grpo_generation(original: Callable) -> Callable:
    """Generation between FastModel.for_inference and for_training (fused paths off, KV cache on), restoring the
    train/eval mode it found: a generation during evaluation leaves the model in eval mode. With fastft's own
    switches (no FastModel given to PatchFastRL), :func:`fastft.patches.modes.generating`: checkpointing comes back
    exactly as it was, without a walk that rebuilds it."""

    def _generate_single_turn(self, *args, **kwargs):
        for_inference, for_training = _mode_switches()
        if getattr(self, "use_vllm", False) or for_inference is None or for_training is None:
            return original(self, *args, **kwargs)
        unwrapped = self.accelerator.unwrap_model(self.model)
        if _FAST_MODEL is None:  # fastft's own switches: checkpointing put back exactly as found (modes.generating)
            with modes.generating(unwrapped):
                return original(self, *args, **kwargs)
        was_training = getattr(unwrapped, "training", True)
        for_inference(unwrapped)
        try:
            return original(self, *args, **kwargs)
        finally:
            for_training(unwrapped)
            if not was_training and hasattr(unwrapped, "eval"):
                unwrapped.eval()

    return _generate_single_turn


def _fastft_owns_checkpointing(model: Any) -> bool:
    """Whether fastft's checkpointing rule set ``model``'s checkpointing (a FastModel LoRA model, also inside DDP /
    accelerate wrappers): ``FastModel.get_peft_model`` marks it with ``_fastft_checkpointing``."""
    for _ in range(4):
        attributes = getattr(model, "__dict__", {})
        if "_fastft_checkpointing" in attributes:
            return True
        model = attributes.get("_modules", {}).get("module")  # DistributedDataParallel / accelerate wrappers
        if model is None:
            return False
    return False


def _hook_disable_checkpointing(original: Callable) -> Callable:
    """``disable_gradient_checkpointing`` as TRL's GRPO/RLOO/DPO/KTO modules call it around their no-grad passes: on a
    model whose checkpointing fastft's rule set, :func:`fastft.patches.modes.checkpointing_paused` (switches off, then
    back on with the checkpoint function untouched). TRL's own re-enables through ``gradient_checkpointing_enable``,
    which puts transformers' checkpoint function in place of fastft's (offloaded on CUDA) from the first such pass on.
    Any other model: TRL's, as written."""

    def disable_gradient_checkpointing(model, *args, **kwargs):
        if _fastft_owns_checkpointing(model):
            return modes.checkpointing_paused(model)
        return original(model, *args, **kwargs)

    return disable_gradient_checkpointing


def _hook_init(original: Callable) -> Callable:
    """Before TRL's ``__init__`` reads its config, FastModel's choices and TRL's meet (:func:`_apply_max_seq_length`,
    :func:`_apply_checkpointing`), each said once, visibly."""
    signature = inspect.signature(original)

    def __init__(self, *args, **kwargs):
        try:
            arguments = _named_arguments(signature, self, *args, **kwargs)
        except TypeError:
            arguments = {}
        since = mark()
        _apply_max_seq_length(arguments.get("model"), arguments.get("args"))
        _apply_checkpointing(arguments.get("model"), arguments.get("args"))
        original(self, *args, **kwargs)
        trl_summary.attach(self, since=since)

    return __init__
