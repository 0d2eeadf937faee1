"""PatchFastRL: TRL's SFT, DPO, GRPO, KTO and RLOO trainers with fastft's lean LM-head losses, optimizer, generation.

How TRL (>= 1.15) computes its losses, and where we step in
-----------------------------------------------------------
Every one of these trainers calls ``add_fused_lm_head(model, ...)`` in ``__init__``, which sets ``model.forward``
(on the transformers model inside any PEFT wrapper, and on a separate reference model) to a closure (under bf16/fp16
mixed precision, accelerate's ``prepare_model`` then wraps a non-PEFT model's ``forward`` in
``convert_outputs_to_fp32(autocast(...))``: :func:`_trl_fused_function` sees through that, and the fast forward runs
under the same autocast); calling
``model(..., labels=labels, fused_lm_head=True)`` then runs the backbone and returns per-token log-probs (plus the
entropy / top-1 / mean-logit fields the trainer asked for) from TRL's own chunked projection. On CPU (and any
non-Triton device) TRL scores *every* position, prompt and padding included, through a ``[tokens, 32768]`` tile.

PatchFastRL installs a few hooks on TRL's trainer class *itself* (each a reversible, contract-guarded
:class:`~fastft.patches.base.Patch` on ``SFTTrainer.compute_loss``, ``GRPOTrainer._get_per_token_logps_and_entropies``
...), so every name the class is imported by, and every trainer already built, runs them: the order of imports does
not matter. While a hooked loss method runs, :func:`_fast_heads` swaps TRL's closure for :func:`_make_fast_forward`'s,
and swaps it back afterwards. The fast forward runs the same backbone, keeps only the positions whose label is not
-100 (completion tokens in GRPO/DPO, non-masked tokens in SFT) and calls

* ``fastft.kernels.linear_cross_entropy`` for the SFT loss (``fused_lm_head=LOSS_ONLY``: no per-token output at all);
* ``fastft.kernels.selective_log_softmax`` for per-token log-probs / entropies (GRPO policy, old policy and reference;
  DPO chosen/rejected and reference), with temperature, ``final_logit_softcapping`` and logit scales from the config.

Going through ``model(...)`` instead of calling the backbone ourselves keeps every wrapper in the call chain: DDP's
gradient hooks, accelerate's autocast, PEFT (TRL disables the adapters for the reference pass, exactly as unpatched),
and gradient checkpointing. Everything else -- the loss variants (GRPO ``loss_type`` grpo/dr_grpo/dapo/bnpo/cispo/...,
DPO ``loss_type`` sigmoid/ipo/...), advantages, KL, clipping, metrics -- is TRL's own code, so values match unpatched
TRL to float rounding (the tests check per-step loss and grad norm).

Metrics that need the full distribution (SFT ``mean_token_accuracy`` and ``entropy``; DPO ``logits/*``,
``mean_token_accuracy``, WPO's ``log_sum_sq_probs``) are computed exactly, without gradient, by one extra chunked
projection of the valid tokens (:func:`_token_stats`, at most ``_STATS_CHUNK_ELEMENTS`` logits alive at once). That
costs one more forward GEMM of the LM head per step; set ``trainer.fastft_token_metrics = False`` to skip it for SFT
(the two metrics are then not logged, with a one-time note).

Anything the fast path does not cover falls back to TRL's forward for that call (logged once): MoE router logits,
an LM head that is not a plain ``nn.Linear`` (e.g. LoRA on ``lm_head``), DeepSpeed ZeRO-3 placeholder heads (FSDP2
DTensor heads are gathered by ``fastft.distributed.full_weight``); SFT with ``compute_loss_func``, label smoothing,
``return_outputs`` or DeepSpeed sequence parallelism; GRPO with vision inputs or an MoE aux loss. TRL 1.14 has no
fused-head hook: there the losses run TRL's own code (said once, visibly) and the optimizer / generation hooks apply.

Safety: each hook checks, at PatchFastRL time, that the method it wraps still takes the parameters the hook reads;
everything else is passed through untouched. When one fails, that trainer is left unpatched with one warning.
``fastft.unpatch()`` restores the classes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import functools
import inspect
import os
import types
from collections.abc import Callable, Iterator
from typing import Any

import torch

from fastft._log import info_once, logger, mark, warn_once
from fastft.distributed import direct_read_problem, full_bias, full_weight, is_dtensor, is_plain_linear
from fastft.patches.architectures import logits_required
from fastft.patches.base import Patch, parameters_guard
from fastft.patches.trl_config import _apply_checkpointing, _apply_max_seq_length

#: ``model(..., fused_lm_head=LOSS_ONLY)`` asks the fast head for the loss alone (linear cross-entropy, no per-token
#: log-probs). TRL's own fused forward treats any truthy value as ``True``, so a fallback still returns ``loss``.
LOSS_ONLY = "fastft-loss-only"

#: Logits alive at once in the no-grad metrics pass (fp32 elements): 2**21 = 8 MiB per temporary.
_STATS_CHUNK_ELEMENTS = 1 << 21

#: The ``FastModel`` passed to PatchFastRL (Unsloth compatibility); None -> ``fastft.model.FastModel`` if it exists.
_FAST_MODEL: Any = None


# --------------------------------------------------------------------------------------------------------------------
# The fast fused LM head
# --------------------------------------------------------------------------------------------------------------------
def _head_scales(text_config: Any) -> tuple[float | None, float | None]:
    """``(final_logit_softcapping, logit_scale)`` as the model's own forward applies them (None = not applied).

    Mirrors the config fields TRL 1.16's ``add_fused_lm_head`` reads, so both paths scale logits identically.
    """
    softcap = getattr(text_config, "final_logit_softcapping", None)
    scale = getattr(text_config, "logit_scale", None)
    if scale is None:
        scale = getattr(text_config, "output_multiplier", None)
    if scale is None:
        scale = getattr(text_config, "lm_head_multiplier", None)
    if scale is None and getattr(text_config, "logits_scaling", None) is not None:
        scaling = text_config.logits_scaling
        scale = scaling if text_config.model_type == "hyperclovax" else 1.0 / scaling
    return softcap, (None if scale is None or scale == 1.0 else float(scale))


def _transform_logits(z: torch.Tensor, softcap: float | None, scale: float | None, temperature: float) -> torch.Tensor:
    if scale is not None:
        z = z * scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return z / temperature if temperature != 1.0 else z


@torch.no_grad()
def _token_stats(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
                 wanted: tuple[str, ...], softcap: float | None, scale: float | None,
                 temperature: float) -> dict[str, torch.Tensor]:
    """Per-token metrics of ``hidden [N, H] @ weight[V, H].T`` in row chunks, without gradient.

    Returns the fields of ``wanted`` among ``entropy``, ``is_top1``, ``mean_logits``, ``log_sum_sq_probs``, each
    ``[N]`` (fp32; bool for ``is_top1``), defined as in TRL's ``FusedCausalLMOutput``.
    """
    n, vocab = hidden.shape[0], weight.shape[0]
    rows = max(1, _STATS_CHUNK_ELEMENTS // vocab)
    parts: dict[str, list[torch.Tensor]] = {name: [] for name in wanted}
    for start in range(0, n, rows):
        z = torch.nn.functional.linear(hidden[start:start + rows].to(weight.dtype), weight, bias).float()
        z = _transform_logits(z, softcap, scale, temperature)
        log_p = z.log_softmax(-1)
        if "entropy" in parts:
            parts["entropy"].append(-(log_p.exp() * log_p).sum(-1))
        if "is_top1" in parts:
            # argmax returns the first maximum, like TRL's "target beats every earlier token, ties every later one"
            parts["is_top1"].append(z.argmax(-1) == targets[start:start + rows])
        if "mean_logits" in parts:
            parts["mean_logits"].append(z.mean(-1))
        if "log_sum_sq_probs" in parts:
            parts["log_sum_sq_probs"].append(torch.logsumexp(2 * log_p, dim=-1))
        del z, log_p
    return {name: torch.cat(chunks) if chunks else hidden.new_zeros(0, dtype=torch.float32)
            for name, chunks in parts.items()}


def _make_fast_forward(trl_forward: Callable, *, temperature: float, outputs: tuple[str, ...],
                       cast_fp32: bool) -> Callable:
    """A drop-in for TRL's ``_fused_forward`` closure (same keyword contract) computed with fastft's kernels.

    ``trl_forward`` is the bound TRL forward it replaces; calls the fast path does not cover are passed to it.
    """

    def fused_forward(self, *args, fused_lm_head=False, labels=None, shift_labels=None, num_items_in_batch=None,
                      **kwargs):
        head = self.get_output_embeddings()
        text_config = self.config.get_text_config()
        wants_log_probs = fused_lm_head != LOSS_ONLY
        reason = _fallback_reason(head, text_config, kwargs, labels, shift_labels, wants_log_probs, temperature)
        if reason is None and cast_fp32 and head.weight.dtype != torch.float32:
            reason = "cast_lm_head_to_fp32 with a non-fp32 LM head weight"
        if not fused_lm_head or reason:
            if fused_lm_head and reason:
                info_once(f"fastft: TRL's fused LM head used for this call ({reason})", key=f"trl-head:{reason}")
            return trl_forward(*args, fused_lm_head=fused_lm_head, labels=labels, shift_labels=shift_labels,
                               num_items_in_batch=num_items_in_batch, **kwargs)

        from trl.trainer.utils import FusedCausalLMOutput

        from fastft import kernels

        kwargs["use_cache"] = False
        hidden = self.base_model(*args, **kwargs).last_hidden_state
        if shift_labels is None:
            hidden, labels = hidden[:, :-1], labels[:, 1:]
        else:
            labels = shift_labels
        # Sharded (FSDP2 DTensor) heads are gathered with a reduce-scattered gradient (fastft.distributed).
        weight, bias = full_weight(head.weight), full_bias(head.bias)
        hidden, labels = hidden.to(weight.device), labels.to(weight.device)
        mask = labels != -100
        # Only the scored positions reach the head: the prompt of a GRPO/DPO batch never meets the vocabulary.
        h, targets = hidden[mask], labels[mask]
        autocast = contextlib.nullcontext()
        if cast_fp32:
            autocast = torch.autocast(h.device.type, enabled=False)
        if h.dtype != weight.dtype:
            # Under autocast the backbone can hand back bf16 states for an fp32 head (or cast_lm_head_to_fp32 made
            # the head fp32): the kernels take one dtype, and the head's is the more precise one here.
            h = h.to(weight.dtype)
        softcap, scale = _head_scales(text_config)
        n_valid = mask.sum()
        denominator = torch.as_tensor(n_valid if num_items_in_batch is None else num_items_in_batch).clamp(min=1)

        log_probs = entropy = None
        with autocast:
            if h.shape[0] == 0:
                # Keep the graph connected so an all-masked micro-batch backpropagates a zero, like TRL.
                lp = h.new_zeros(0, dtype=torch.float32) + hidden.float().sum() * 0.0
                ent = lp if "entropy" in outputs else None
            elif not wants_log_probs:
                loss_sum = kernels.linear_cross_entropy(h, weight, targets, bias=bias, softcap=softcap,
                                                        logit_scale=scale, reduction="sum")
                lp = ent = None
            else:
                want_entropy = "entropy" in outputs
                # The op takes [B, T, H]; the compacted valid tokens are one "sequence" of length N.
                result = kernels.selective_log_softmax(h.unsqueeze(0), weight, targets.unsqueeze(0), bias=bias,
                                                       temperature=temperature, logit_scale=scale, softcap=softcap,
                                                       return_entropy=want_entropy)
                lp, ent = result if want_entropy else (result, None)
                lp = lp.squeeze(0).float()
                ent = ent.squeeze(0).float() if ent is not None else None
            if lp is not None:
                log_probs = lp.new_zeros(mask.shape).masked_scatter(mask, lp)
                loss_sum = -log_probs.sum()
                if ent is not None:
                    entropy = ent.new_zeros(mask.shape).masked_scatter(mask, ent)
            extra = tuple(name for name in outputs if name in ("is_top1", "mean_logits", "log_sum_sq_probs")
                          or (name == "entropy" and entropy is None))
            stats = _token_stats(h.detach(), weight.detach(), None if bias is None else bias.detach(), targets,
                                 extra, softcap, scale, temperature) if extra else {}

        def scatter(name: str) -> torch.Tensor | None:
            if name not in stats:
                return None
            values = stats[name]
            return values.new_zeros(mask.shape).masked_scatter(mask, values)

        return FusedCausalLMOutput(
            loss=loss_sum / denominator,
            log_probs=log_probs,
            entropy=entropy if entropy is not None else scatter("entropy"),
            log_sum_sq_probs=scatter("log_sum_sq_probs"),
            mean_logits=scatter("mean_logits"),
            is_top1=scatter("is_top1"),
            label_mask=mask,
        )

    fused_forward._fastft_fast_head = True  # type: ignore[attr-defined]
    return fused_forward


def _fallback_reason(head: Any, text_config: Any, kwargs: dict, labels: Any, shift_labels: Any,
                     wants_log_probs: bool, temperature: float) -> str | None:
    if labels is None and shift_labels is None:
        return "no labels"
    if kwargs.get("output_router_logits") or getattr(text_config, "output_router_logits", False):
        return "MoE router logits requested"
    if not is_plain_linear(head):  # FSDP2's FSDPLinear counts as plain
        return f"the LM head is a {type(head).__name__}, not a plain nn.Linear"
    weight_type = type(head.weight)
    if weight_type is not torch.nn.Parameter and weight_type is not torch.Tensor and not is_dtensor(head.weight):
        return f"the LM head weight is a {weight_type.__name__}"
    if direct_read_problem(head.weight):  # a ZeRO-3 placeholder; DTensors are gathered by full_weight
        return direct_read_problem(head.weight)
    if not wants_log_probs and temperature != 1.0:
        return "linear_cross_entropy takes no temperature"
    return None


def _is_trl_fused_code(func: Any) -> bool:
    code = getattr(func, "__code__", None)
    return code is not None and code.co_name == "_fused_forward" and code.co_filename.endswith(
        os.path.join("trl", "trainer", "utils.py"))


def _trl_fused_function(forward: Any) -> tuple[Any, bool]:
    """``(TRL's _fused_forward function, wrapped)`` behind ``forward``, or ``(None, False)``.

    ``wrapped`` is True when accelerate's mixed-precision wrapper (``convert_outputs_to_fp32(autocast(...))``, set by
    ``Accelerator.prepare_model`` on a model that is not a PEFT wrapper) stands in front of it: the wrappers keep the
    chain in ``__wrapped__``. We stop at TRL's closure, whose own ``__wrapped__`` (functools.wraps) is the plain
    transformers forward."""
    func = getattr(forward, "__func__", None)
    wrapped = False
    for _ in range(8):  # accelerate stacks two wrappers; a bound keeps a cycle from looping
        if func is None:
            return None, False
        if _is_trl_fused_code(func):
            return func, wrapped
        func, wrapped = getattr(func, "__wrapped__", None), True
    return None, False


def _is_trl_fused_forward(forward: Any) -> bool:
    """True for the bound closure TRL 1.16's ``add_fused_lm_head`` installs (``functools.wraps`` hides its name), also
    behind accelerate's mixed-precision wrapper."""
    return _trl_fused_function(forward)[0] is not None


def _fused_target(trainer: Any, model: Any) -> Any:
    """The transformers model whose ``forward`` TRL replaced: inside accelerate/DDP wrappers and PEFT."""
    if model is None:
        return None
    model = trainer.accelerator.unwrap_model(model)
    get_base_model = getattr(model, "get_base_model", None)
    return get_base_model() if callable(get_base_model) and hasattr(model, "peft_config") else model


#: Every per-token field TRL's head can be asked for: used when the fields TRL configured cannot be read.
_ALL_HEAD_OUTPUTS = ("log_probs", "entropy", "mean_logits", "is_top1", "log_sum_sq_probs")


def _trl_head_outputs(forward: Any) -> tuple[str, ...]:
    """The ``outputs`` TRL's ``add_fused_lm_head`` was called with for this model (read from its closure), so the
    fast head fills exactly the fields TRL's loss and metrics read; all of them if that cannot be read."""
    func = _trl_fused_function(forward)[0]
    cells = dict(zip(getattr(getattr(func, "__code__", None), "co_freevars", ()), getattr(func, "__closure__", None)
                     or ()))
    try:
        outputs = cells["outputs"].cell_contents
    except (KeyError, ValueError):
        return _ALL_HEAD_OUTPUTS
    return tuple(outputs) if isinstance(outputs, (tuple, list)) else _ALL_HEAD_OUTPUTS


def _under_mixed_precision(trainer: Any, fast: Callable) -> Callable:
    """``fast`` run as accelerate's wrapper ran TRL's forward: under the accelerator's autocast, outputs in fp32.

    The fast forward replaces the whole wrapped ``forward`` (its fallbacks call the wrapped one, autocast included)."""
    from accelerate.utils.operations import convert_to_fp32

    def forward(self, *args, **kwargs):
        with trainer.accelerator.autocast():
            outputs = fast(self, *args, **kwargs)
        return convert_to_fp32(outputs)

    forward._fastft_fast_head = True  # type: ignore[attr-defined]
    return forward


@contextlib.contextmanager
def _fast_heads(trainer: Any, *, temperature: float, policy_outputs: tuple[str, ...] | None,
                ref_outputs: tuple[str, ...] = ("log_probs",)) -> Iterator[bool]:
    """While active, the policy's (and reference model's) TRL fused forward is fastft's; yields whether any was.

    ``policy_outputs=None``: the per-token fields TRL configured the policy's head with."""
    installed = []
    cast_fp32 = bool(getattr(trainer.args, "cast_lm_head_to_fp32", False))
    for model, outputs in ((trainer.model, policy_outputs), (getattr(trainer, "ref_model", None), ref_outputs)):
        target = _fused_target(trainer, model)
        if target is None:
            continue
        current = target.__dict__.get("forward")
        if getattr(getattr(current, "__func__", None), "_fastft_fast_head", False):
            continue  # already fast (a nested call)
        if not _is_trl_fused_forward(current):
            info_once(f"fastft: {type(target).__name__} carries no TRL fused LM head; its loss runs as TRL wrote it",
                      key=f"no-trl-head:{type(target).__name__}")
            continue
        if outputs is None:
            outputs = _trl_head_outputs(current)
        fast = _make_fast_forward(current, temperature=temperature, outputs=outputs, cast_fp32=cast_fp32)
        if _trl_fused_function(current)[1]:
            fast = _under_mixed_precision(trainer, fast)
        target.forward = types.MethodType(fast, target)
        installed.append((target, current))
    try:
        yield bool(installed)
    finally:
        for target, original in reversed(installed):
            target.forward = original


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
        info_once(f"fastft: fastft.optim unavailable ({exc}); using the trainer's default optimizer",
                  key="optim-import")
        return None
    try:
        optimizer = create_optimizer(trainer.model if model is None else model, trainer.args)
    except NotImplementedError as exc:
        info_once(f"fastft: fastft.optim does not handle this configuration ({exc}); using the default optimizer",
                  key=f"optim-nie:{exc}")
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


def _fast_model_class() -> Any:
    if _FAST_MODEL is not None:
        return _FAST_MODEL
    try:
        from fastft.model import FastModel
    except ImportError:
        return None
    return FastModel


@functools.lru_cache(maxsize=1)
def _fused_head_problem() -> str | None:
    """Why this TRL's fused-LM-head hook cannot carry fastft's heads (None when it can); checked once per process."""
    return _common_problem()


def _without_fused_head(algorithm: str) -> bool:
    problem = _fused_head_problem()
    if problem:
        warn_once(f"fastft: {problem}: PatchFastRL({algorithm!r}) keeps fastft's optimizer and generation hooks, but "
                  "the loss runs TRL's own code with full logits", key=f"no-fused-head:{algorithm}")
    return problem is not None


# --------------------------------------------------------------------------------------------------------------------
# The hooks each trainer gets (installed on TRL's class itself: every reference to it, and every trainer already
# built, sees them; ``fastft.unpatch()`` restores the class)
# --------------------------------------------------------------------------------------------------------------------
#: Per-token fields the SFT fast head fills for TRL's metrics (entropy, mean_token_accuracy).
_SFT_METRIC_OUTPUTS = ("entropy", "is_top1")
#: Instance attributes of SFTTrainer the fast SFT loss reads (TRL >= 1.15); a trainer without them runs TRL's code.
_SFT_ATTRIBUTES = ("compute_loss_func", "aux_loss_enabled", "label_smoother", "_metrics", "_total_train_tokens",
                   "_tp_size", "get_tp_size")


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
    if trainer.label_smoother is not None:
        return "label smoothing"
    if getattr(trainer.args, "loss_type", "nll") != "nll":
        return f"loss_type={trainer.args.loss_type!r}"
    if "shift_labels" in inputs:
        return "pre-shifted labels (context/sequence parallelism)"
    parallelism = getattr(trainer.accelerator, "parallelism_config", None)
    if parallelism is not None and getattr(parallelism, "sp_enabled", False):
        return "sequence parallelism"
    return None


def _hook_sft_compute_loss(original: Callable) -> Callable:
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None, **kwargs):
        if _without_fused_head("SFT"):
            with logits_required():  # TRL < 1.15 reads outputs.logits: FastModel's loss steps aside
                return original(self, model, inputs, return_outputs, num_items_in_batch, **kwargs)
        problem = "arguments fastft does not know: " + ", ".join(kwargs) if kwargs else None
        problem = problem or _sft_fast_loss_problem(self, inputs, return_outputs)
        if problem:
            # e.g. DFT needs per-token log-probs: TRL's code with the fast per-token head underneath.
            info_once(f"fastft: SFT loss runs TRL's code over fastft's per-token head ({problem})",
                      key=f"sft-trl-loss:{problem}")
            with _fast_heads(self, temperature=1.0, policy_outputs=None):
                return original(self, model, inputs, return_outputs, num_items_in_batch, **kwargs)
        mode = "train" if self.model.training else "eval"
        inputs["use_cache"] = False
        outputs_wanted = _SFT_METRIC_OUTPUTS if getattr(self, "fastft_token_metrics", True) else ()
        with _fast_heads(self, temperature=1.0, policy_outputs=outputs_wanted) as fast:
            outputs = model(**inputs, fused_lm_head=LOSS_ONLY if fast else True, num_items_in_batch=num_items_in_batch)
        # `outputs.loss` is sum(-log p) / max(num_items_in_batch or #valid, 1): TRL's reduction exactly.
        loss = outputs.loss
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * (self.accelerator.num_processes // self.get_tp_size())
        _log_sft_metrics(self, mode, inputs, outputs)
        return loss

    return compute_loss


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
        info_once("fastft: fastft_token_metrics is False on this trainer: entropy and mean_token_accuracy are not "
                  "logged (they need one extra LM-head pass)", key="sft-no-metrics")
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
_GRPO_TEXT_ARGS = frozenset({"self", "model", "input_ids", "attention_mask", "logits_to_keep", "batch_size",
                             "compute_entropy", "compute_aux_loss"})


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
        if arguments.get("compute_aux_loss") or other or temperature is None:
            reason = "an MoE aux loss" if arguments.get("compute_aux_loss") else (
                f"inputs {', '.join(other)}" if other else "no temperature on the trainer")
            info_once(f"fastft: {algorithm} log-probs use TRL's path ({reason})",
                      key=f"{algorithm}-fallback:{reason}")
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
    train/eval mode it found: a generation during evaluation leaves the model in eval mode."""

    def _generate_single_turn(self, *args, **kwargs):
        fast_model = _fast_model_class()
        for_inference = getattr(fast_model, "for_inference", None)
        for_training = getattr(fast_model, "for_training", None)
        if getattr(self, "use_vllm", False) or for_inference is None or for_training is None:
            return original(self, *args, **kwargs)
        unwrapped = self.accelerator.unwrap_model(self.model)
        was_training = getattr(unwrapped, "training", True)
        for_inference(unwrapped)
        try:
            return original(self, *args, **kwargs)
        finally:
            for_training(unwrapped)
            if not was_training and hasattr(unwrapped, "eval"):
                unwrapped.eval()

    return _generate_single_turn


def _hook_init(original: Callable) -> Callable:
    """Before TRL's ``__init__`` reads its config, FastModel's choices and TRL's meet (:func:`_apply_max_seq_length`,
    :func:`_apply_checkpointing`), each said once, visibly."""
    signature = inspect.signature(original)

    def __init__(self, *args, **kwargs):
        try:
            arguments = _named_arguments(signature, self, *args, **kwargs)
        except TypeError:
            arguments = {}
        from fastft import summary

        since = mark()
        _apply_max_seq_length(arguments.get("model"), arguments.get("args"))
        _apply_checkpointing(arguments.get("model"), arguments.get("args"))
        original(self, *args, **kwargs)
        summary.attach(self, since=since)

    return __init__


# --------------------------------------------------------------------------------------------------------------------
# PatchFastRL
# --------------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class _Hook:
    """``cls.method = make(original)``, applied when ``original`` takes every parameter in ``needs``."""

    method: str
    make: Callable[[Callable], Callable]
    needs: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class _TrainerSpec:
    module: str
    class_name: str
    hooks: tuple[_Hook, ...]


_OPTIMIZER_HOOK = _Hook("create_optimizer", _hook_create_optimizer)
_INIT_HOOK = _Hook("__init__", _hook_init, ("model", "args"))

_TRAINERS: dict[str, _TrainerSpec] = {
    "SFT": _TrainerSpec("trl.trainer.sft_trainer", "SFTTrainer", (
        _Hook("compute_loss", _hook_sft_compute_loss, ("model", "inputs", "return_outputs", "num_items_in_batch")),
        _OPTIMIZER_HOOK, _INIT_HOOK,
    )),
    "DPO": _TrainerSpec("trl.trainer.dpo_trainer", "DPOTrainer", (
        _Hook("compute_loss", _hook_per_token_head("DPO"), ("model", "inputs")),
        _Hook("compute_ref_log_probs", _hook_per_token_head("DPO"), ("model", "inputs")),
        _OPTIMIZER_HOOK, _INIT_HOOK,
    )),
    "GRPO": _TrainerSpec("trl.trainer.grpo_trainer", "GRPOTrainer", (
        _Hook("_get_per_token_logps_and_entropies", _hook_policy_log_probs("GRPO"), ("model",)),
        _Hook("_generate_single_turn", _hook_grpo_generation),
        _OPTIMIZER_HOOK, _INIT_HOOK,
    )),
    # KTO: compute_loss covers the policy, KL and in-step reference passes; compute_ref_log_probs the precomputed one.
    "KTO": _TrainerSpec("trl.trainer.kto_trainer", "KTOTrainer", (
        _Hook("compute_loss", _hook_per_token_head("KTO"), ("model", "inputs")),
        _Hook("compute_ref_log_probs", _hook_per_token_head("KTO"), ("model", "inputs")),
        _OPTIMIZER_HOOK, _INIT_HOOK,
    )),
    # RLOO shares GRPO's log-prob method and generation seam (same arguments).
    "RLOO": _TrainerSpec("trl.trainer.rloo_trainer", "RLOOTrainer", (
        _Hook("_get_per_token_logps_and_entropies", _hook_policy_log_probs("RLOO"), ("model",)),
        _Hook("_generate_single_turn", _hook_grpo_generation),
        _OPTIMIZER_HOOK, _INIT_HOOK,
    )),
}
# Not rows, and why: RewardTrainer scores a sequence-classification head (one scalar per sequence), never the LM
# head; ORPO / CPO / Online DPO (trl.experimental in TRL 1.16) compute full logits in their own forward, with no
# add_fused_lm_head seam to carry a lean head (it would take a rewrite of their loss, which we do not copy).

SUPPORTED_ALGORITHMS = tuple(_TRAINERS)

_FUSED_HEAD_PARAMETERS = ("model", "temperature", "cast_lm_head_to_fp32", "outputs")
_FUSED_OUTPUT_FIELDS = ("loss", "log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1", "label_mask")

#: algorithm -> its Patch objects, built once so PatchFastRL is idempotent and unpatch/re-patch reuse them.
_PATCHES: dict[str, list[Patch]] = {}
#: algorithm -> why the installed TRL has no such trainer (it stays unpatched; PatchFastRL returns False for it).
_ABSENT: dict[str, str] = {}


def _common_problem() -> str | None:
    """Why TRL's fused-head hook cannot carry fastft's heads: missing (TRL < 1.15), moved, or fastft lacks kernels."""
    import trl
    from trl.trainer import utils as trl_utils

    helper = getattr(trl_utils, "add_fused_lm_head", None)
    if helper is None:
        return (f"TRL {trl.__version__} has no fused LM-head hook (trl.trainer.utils.add_fused_lm_head, TRL >= 1.15), "
                "so the lean heads cannot run under it")
    problem = parameters_guard(*_FUSED_HEAD_PARAMETERS)(helper)
    if problem:
        return f"trl.trainer.utils.add_fused_lm_head: {problem}"
    output_cls = getattr(trl_utils, "FusedCausalLMOutput", None)
    fields = tuple(getattr(output_cls, "__dataclass_fields__", {}))
    if not set(_FUSED_OUTPUT_FIELDS) <= set(fields):
        return f"trl.trainer.utils.FusedCausalLMOutput fields changed (found {fields})"
    from fastft import kernels

    missing = [name for name in ("linear_cross_entropy", "selective_log_softmax") if not hasattr(kernels, name)]
    if missing:
        return f"fastft.kernels lacks {', '.join(missing)}"
    return None


def _patches_for(algorithm: str) -> list[Patch]:
    if algorithm in _PATCHES:
        return _PATCHES[algorithm]
    import importlib

    spec = _TRAINERS[algorithm]
    try:
        cls = getattr(importlib.import_module(spec.module), spec.class_name)
    except (ImportError, AttributeError) as exc:
        import trl

        _ABSENT[algorithm] = f"TRL {trl.__version__} has no {spec.module}.{spec.class_name} ({exc})"
        return []
    patches = [Patch(name=f"trl {algorithm}: {spec.class_name}.{hook.method}", owner=cls, attribute=hook.method,
                     replacement=hook.make, wrap=True, tested=("trl",),
                     guard=parameters_guard(*hook.needs) if hook.needs else None)
               for hook in spec.hooks]
    # Last, so it is set only when every hook went in: what patched_algorithm() reads.
    patches.append(Patch(name=f"trl {algorithm}: {spec.class_name} marker", owner=cls, attribute="_fastft_algorithm",
                         replacement=algorithm, create=True))
    _PATCHES[algorithm] = patches
    return patches


def patched_algorithm(trainer_or_class: Any) -> str | None:
    """The algorithm name ("SFT", "DPO", "GRPO", "KTO", "RLOO") when ``trainer_or_class`` (a trainer or a trainer
    class, a user's subclass included) runs fastft's hooks, else None."""
    cls = trainer_or_class if isinstance(trainer_or_class, type) else type(trainer_or_class)
    return getattr(cls, "_fastft_algorithm", None)


def _normalize(algorithm: str) -> str:
    key = str(algorithm).upper()
    if key not in _TRAINERS:
        close = difflib.get_close_matches(key, SUPPORTED_ALGORITHMS, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"PatchFastRL: unknown algorithm {algorithm!r}{hint} Supported: "
                         f"{', '.join(SUPPORTED_ALGORITHMS)} (or None for all)")
    return key


def PatchFastRL(algorithm: str | None = None, FastModel: Any = None) -> dict[str, bool]:  # noqa: N802, N803 (Unsloth's names)
    """Give TRL's trainer classes fastft's lean LM-head losses, optimizer and generation hooks, in place.

    The hooks go onto TRL's class object itself (``trl.SFTTrainer`` and every name it is imported by), so the order
    of imports does not matter: a ``from trl import SFTTrainer`` made before this call, and a trainer built before
    it (anything before ``.train()``), run the fast paths too.

    Args:
        algorithm: one of ``SUPPORTED_ALGORITHMS`` ("SFT", "DPO", "GRPO", "KTO", "RLOO"; any case), or None for
            all of them.
        FastModel: accepted for Unsloth compatibility; when it has ``for_inference``/``for_training``, GRPO calls them
            around generation (default: ``fastft.model.FastModel``).

    Returns:
        ``{algorithm: patched}``; False means a method fastft hooks no longer has the parameters it relies on, or
        the installed TRL has no such trainer; a warning said which, and that trainer is TRL's, untouched.
        Idempotent; ``fastft.unpatch()`` reverts.
    """
    global _FAST_MODEL
    algorithms = SUPPORTED_ALGORITHMS if algorithm is None else (_normalize(algorithm),)
    if FastModel is not None:
        _FAST_MODEL = FastModel
    result = {}
    for name in algorithms:
        patches = _patches_for(name)
        if not patches:
            warn_once(f"fastft: PatchFastRL({name!r}) skipped: {_ABSENT[name]}", key=f"absent:{name}")
            result[name] = False
            continue
        applied = []
        for patch in patches:
            if not patch.apply():  # it warned (once)
                break
            applied.append(patch)
        result[name] = len(applied) == len(patches)
        if not result[name]:
            for patch in reversed(applied):  # never leave a trainer half-patched
                patch.revert()
        else:
            _without_fused_head(name)  # says once, visibly, when this TRL runs the losses its own way
    return result


__all__ = ["LOSS_ONLY", "PatchFastRL", "SUPPORTED_ALGORITHMS", "patched_algorithm"]
