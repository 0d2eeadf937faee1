"""fastft's lean LM heads under TRL's fused-head seam (``add_fused_lm_head``), used by :mod:`fastft.patches.trl`.

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

SFT's ``mean_token_accuracy`` and ``entropy`` come out of the loss pass itself (``linear_cross_entropy(...,
return_token_stats=True)``: argmax == label and lse - E_p[f] from the same logits chunks, one LM-head GEMM per chunk);
set ``trainer.fastft_token_metrics = False`` to skip even that (the two metrics are then not logged, with a one-time
note). SFT label smoothing (transformers' ``LabelSmoother``) is the fused loss's ``label_smoothing``. The other
metrics that need the full distribution (DPO ``logits/*``, ``mean_token_accuracy``, WPO's ``log_sum_sq_probs``) are
computed exactly, without gradient, by one extra chunked projection of the valid tokens
(:func:`fastft.patches.lm_head.token_stats`, at most ``STATS_CHUNK_ELEMENTS`` logits alive at once).

Anything the fast path does not cover falls back to TRL's forward for that call (logged once): MoE router logits,
an LM head that is not a plain ``nn.Linear`` (e.g. LoRA on ``lm_head``), DeepSpeed ZeRO-3 placeholder heads (FSDP2
DTensor heads are gathered by ``fastft.distributed.full_weight``); SFT with ``compute_loss_func``, a custom label
smoother, ``return_outputs`` or DeepSpeed sequence parallelism; GRPO with vision inputs or an MoE aux loss. TRL 1.14 has no
fused-head hook: there the losses run TRL's own code (said once, visibly) and the optimizer / generation hooks apply.
"""

from __future__ import annotations

import contextlib
import functools
import os
import types
from collections.abc import Callable, Iterator
from typing import Any

import torch

from fastft._log import info_once, warn_once
from fastft.patches.base import parameters_guard
from fastft.patches.lm_head import (
    head_fallback_reason,
    head_weights,
    lm_head_log_probs,
    lm_head_loss,
    router_aux_loss,
    router_aux_modeling,
    token_stats,
)

#: ``model(..., fused_lm_head=LOSS_ONLY)`` asks the fast head for the loss alone (linear cross-entropy, no per-token
#: log-probs). TRL's own fused forward treats any truthy value as ``True``, so a fallback still returns ``loss``.
LOSS_ONLY = "fastft-loss-only"


# --------------------------------------------------------------------------------------------------------------------
# The fast fused LM head
# --------------------------------------------------------------------------------------------------------------------
class FastHeadDeclined(Exception):
    """Raised (before the backbone runs) when a loss-only call asks for what only fastft's head computes (label
    smoothing) but this call cannot take the fast path: the caller runs TRL's own loss instead."""


def _make_fast_forward(
    trl_forward: Callable, *, temperature: float, outputs: tuple[str, ...], cast_fp32: bool, label_smoothing: float = 0.0
) -> Callable:
    """A drop-in for TRL's ``_fused_forward`` closure (same keyword contract) computed with fastft's kernels.

    ``trl_forward`` is the bound TRL forward it replaces; calls the fast path does not cover are passed to it.
    ``label_smoothing`` applies to the loss-only (SFT) call, which TRL's head cannot smooth: such a call that cannot
    take the fast path raises :class:`FastHeadDeclined`.
    """

    def fused_forward(self, *args, fused_lm_head=False, labels=None, shift_labels=None, num_items_in_batch=None, **kwargs):
        head = self.get_output_embeddings()
        text_config = self.config.get_text_config()
        wants_log_probs = fused_lm_head != LOSS_ONLY
        reason = _fallback_reason(head, text_config, kwargs, labels, shift_labels, wants_log_probs, temperature)
        if reason is None and cast_fp32 and head.weight.dtype != torch.float32:
            reason = "cast_lm_head_to_fp32 with a non-fp32 LM head weight"
        if not fused_lm_head or reason:
            if reason and label_smoothing and not wants_log_probs:
                raise FastHeadDeclined(reason)
            if fused_lm_head and reason:
                info_once(f"fastft: TRL's fused LM head used for this call ({reason})", key=f"trl-head:{reason}")
            return trl_forward(
                *args,
                fused_lm_head=fused_lm_head,
                labels=labels,
                shift_labels=shift_labels,
                num_items_in_batch=num_items_in_batch,
                **kwargs,
            )

        from trl.trainer.utils import FusedCausalLMOutput

        kwargs["use_cache"] = False
        backbone_out = self.base_model(*args, **kwargs)
        hidden = backbone_out.last_hidden_state
        if shift_labels is None:  # TRL's contract: per-token outputs are [B, T - 1], so truncate rather than pad
            hidden, labels = hidden[:, :-1], labels[:, 1:]
        else:
            labels = shift_labels
        # Sharded (FSDP2 DTensor) heads are gathered with a reduce-scattered gradient (fastft.distributed).
        lm_head = head_weights(head, text_config)
        weight = lm_head.weight
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
        n_valid = mask.sum()
        denominator = torch.as_tensor(n_valid if num_items_in_batch is None else num_items_in_batch).clamp(min=1)

        log_probs = entropy = None
        in_pass: dict[str, torch.Tensor] = {}  # token metrics the loss pass computed from its own logits chunks
        with autocast:
            if wants_log_probs or h.shape[0] == 0:
                # An all-masked micro-batch gets empty log-probs still connected to the graph: a zero backpropagates,
                # like TRL's (for the loss-only call too).
                want_entropy = "entropy" in outputs
                result = lm_head_log_probs(lm_head, h, targets, temperature=temperature, return_entropy=want_entropy)
                lp, ent = result if want_entropy else (result, None)
            else:
                # SFT's entropy / mean_token_accuracy come out of the loss's own chunks: no second LM-head GEMM.
                metrics = "entropy" in outputs or "is_top1" in outputs
                result = lm_head_loss(
                    lm_head,
                    h,
                    targets,
                    shift=False,
                    reduction="sum",
                    label_smoothing=label_smoothing,
                    return_token_stats=metrics,
                )
                loss_sum = result.loss if metrics else result
                if metrics:
                    in_pass = {"entropy": result.entropy, "is_top1": result.is_top1}
                lp = ent = None
            if lp is not None:
                log_probs = lp.new_zeros(mask.shape).masked_scatter(mask, lp)
                loss_sum = -log_probs.sum()
                if ent is not None:
                    entropy = ent.new_zeros(mask.shape).masked_scatter(mask, ent)
            extra = tuple(
                name
                for name in outputs
                if name not in in_pass
                and (name in ("is_top1", "mean_logits", "log_sum_sq_probs") or (name == "entropy" and entropy is None))
            )
            stats = token_stats(h, lm_head, targets, extra, temperature) if extra else {}
            stats.update(in_pass)

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
            # MoE rows: the model's own load-balancing loss of this pass (TRL weights and adds it)
            **_router_aux(self, text_config, backbone_out, kwargs),
        )

    fused_forward._fastft_fast_head = True  # type: ignore[attr-defined]
    return fused_forward


def _fallback_reason(
    head: Any, text_config: Any, kwargs: dict, labels: Any, shift_labels: Any, wants_log_probs: bool, temperature: float
) -> str | None:
    """Why this call of TRL's fused head runs TRL's own code: the call's arguments, then the head itself
    (:func:`fastft.patches.lm_head.head_fallback_reason`)."""
    if labels is None and shift_labels is None:
        return "no labels"
    if (
        kwargs.get("output_router_logits") or getattr(text_config, "output_router_logits", False)
    ) and not router_aux_modeling(text_config):
        return "MoE router logits requested"
    reason = head_fallback_reason(head)
    if reason:
        return reason
    if not wants_log_probs and temperature != 1.0:
        return "linear_cross_entropy takes no temperature"
    return None


def _router_aux(lm: Any, text_config: Any, backbone_out: Any, kwargs: dict) -> dict:
    """``{"aux_loss": ...}`` exactly as the model's forward computes it when router logits were requested."""
    wanted = kwargs.get("output_router_logits")
    if not (getattr(text_config, "output_router_logits", False) if wanted is None else wanted):
        return {}
    modeling = router_aux_modeling(text_config)
    return {"aux_loss": router_aux_loss(lm, modeling, backbone_out.router_logits, kwargs.get("attention_mask"))}


def _is_trl_fused_code(func: Any) -> bool:
    code = getattr(func, "__code__", None)
    return (
        code is not None
        and code.co_name == "_fused_forward"
        and code.co_filename.endswith(os.path.join("trl", "trainer", "utils.py"))
    )


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
    cells = dict(zip(getattr(getattr(func, "__code__", None), "co_freevars", ()), getattr(func, "__closure__", None) or ()))
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
def _fast_heads(
    trainer: Any,
    *,
    temperature: float,
    policy_outputs: tuple[str, ...] | None,
    ref_outputs: tuple[str, ...] = ("log_probs",),
    label_smoothing: float = 0.0,
) -> Iterator[bool]:
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
            info_once(
                f"fastft: {type(target).__name__} carries no TRL fused LM head; its loss runs as TRL wrote it",
                key=f"no-trl-head:{type(target).__name__}",
            )
            continue
        if outputs is None:
            outputs = _trl_head_outputs(current)
        fast = _make_fast_forward(
            current, temperature=temperature, outputs=outputs, cast_fp32=cast_fp32, label_smoothing=label_smoothing
        )
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
# Can this TRL carry the fast heads at all?
# --------------------------------------------------------------------------------------------------------------------
_FUSED_HEAD_PARAMETERS = ("model", "temperature", "cast_lm_head_to_fp32", "outputs")
_FUSED_OUTPUT_FIELDS = ("loss", "log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1", "label_mask")


def _common_problem() -> str | None:
    """Why TRL's fused-head hook cannot carry fastft's heads: missing (TRL < 1.15), moved, or fastft lacks kernels."""
    import trl
    from trl.trainer import utils as trl_utils

    helper = getattr(trl_utils, "add_fused_lm_head", None)
    if helper is None:
        return (
            f"TRL {trl.__version__} has no fused LM-head hook (trl.trainer.utils.add_fused_lm_head, TRL >= 1.15), "
            "so the lean heads cannot run under it"
        )
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


@functools.lru_cache(maxsize=1)
def _fused_head_problem() -> str | None:
    """Why this TRL's fused-LM-head hook cannot carry fastft's heads (None when it can); checked once per process."""
    return _common_problem()


def _without_fused_head(algorithm: str) -> bool:
    problem = _fused_head_problem()
    if problem:
        warn_once(
            f"fastft: {problem}: PatchFastRL({algorithm!r}) keeps fastft's optimizer and generation hooks, but "
            "the loss runs TRL's own code with full logits",
            key=f"no-fused-head:{algorithm}",
        )
    return problem is not None
