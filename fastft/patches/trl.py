"""PatchFastRL: TRL 1.16's SFT, DPO and GRPO trainers with fastft's lean LM-head losses.

How TRL 1.16 computes its losses, and where we step in
------------------------------------------------------
Every one of the three trainers calls ``add_fused_lm_head(model, ...)`` in ``__init__``, which sets ``model.forward``
(on the transformers model inside any PEFT wrapper, and on a separate reference model) to a closure; calling
``model(..., labels=labels, fused_lm_head=True)`` then runs the backbone and returns per-token log-probs (plus the
entropy / top-1 / mean-logit fields the trainer asked for) from TRL's own chunked projection. On CPU (and any
non-Triton device) TRL scores *every* position, prompt and padding included, through a ``[tokens, 32768]`` tile.

fastft's fast classes are plain subclasses (``FastSFTTrainer(trl.SFTTrainer)``, ...). While one of their loss methods
runs, :func:`_fast_heads` swaps that closure for :func:`_make_fast_forward`'s, and swaps it back afterwards. The fast
forward runs the same backbone, keeps only the positions whose label is not -100 (completion tokens in GRPO/DPO,
non-masked tokens in SFT) and calls

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
costs one more forward GEMM of the LM head per step; set ``FastSFTTrainer.token_metrics = False`` to skip it for SFT
(the two metrics are then not logged, with a one-time note).

Anything the fast path does not cover falls back to TRL's forward for that call (logged once): MoE router logits,
an LM head that is not a plain ``nn.Linear`` (e.g. LoRA on ``lm_head``), DeepSpeed ZeRO-3 placeholder heads (FSDP2
DTensor heads are gathered by ``fastft.distributed.full_weight``); SFT with
``compute_loss_func``, label smoothing, ``return_outputs`` or DeepSpeed sequence parallelism;
GRPO with vision inputs or an MoE aux loss.

Safety: at ``PatchFastRL`` time each trainer is checked -- TRL version in ``>=1.16,<1.17``, the signature of every
method overridden or relied upon, TRL's fused-head helper, and the fastft kernels being importable. On any mismatch
that trainer is left unpatched with one warning. ``fastft.unpatch()`` restores all names.
"""

from __future__ import annotations

import contextlib
import os
import types
from collections.abc import Callable, Iterator
from typing import Any

import torch

from fastft._log import info_once, logger
from fastft.distributed import direct_read_problem, full_bias, full_weight, is_dtensor, is_plain_linear
from fastft.patches.base import Patch, signature_guard

TRL_RANGE = {"trl": ">=1.16,<1.17"}

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


def _is_trl_fused_forward(forward: Any) -> bool:
    """True for the bound closure TRL 1.16's ``add_fused_lm_head`` installs (``functools.wraps`` hides its name)."""
    func = getattr(forward, "__func__", None)
    code = getattr(func, "__code__", None)
    return code is not None and code.co_name == "_fused_forward" and code.co_filename.endswith(
        os.path.join("trl", "trainer", "utils.py"))


def _fused_target(trainer: Any, model: Any) -> Any:
    """The transformers model whose ``forward`` TRL replaced: inside accelerate/DDP wrappers and PEFT."""
    if model is None:
        return None
    model = trainer.accelerator.unwrap_model(model)
    get_base_model = getattr(model, "get_base_model", None)
    return get_base_model() if callable(get_base_model) and hasattr(model, "peft_config") else model


@contextlib.contextmanager
def _fast_heads(trainer: Any, *, temperature: float, policy_outputs: tuple[str, ...],
                ref_outputs: tuple[str, ...] = ("log_probs",)) -> Iterator[bool]:
    """While active, the policy's (and reference model's) TRL fused forward is fastft's; yields whether any was."""
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
        fast = _make_fast_forward(current, temperature=temperature, outputs=outputs, cast_fp32=cast_fp32)
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


class _FastOptimizerMixin:
    def create_optimizer(self, model=None):
        optimizer = _fastft_create_optimizer(self, model)
        if optimizer is None:
            return super().create_optimizer(model)
        self.optimizer = optimizer
        logger.info("fastft: optimizer %s from fastft.optim", type(optimizer).__name__)
        return self.optimizer


def _fast_model_class() -> Any:
    if _FAST_MODEL is not None:
        return _FAST_MODEL
    try:
        from fastft.model import FastModel
    except ImportError:
        return None
    return FastModel


# --------------------------------------------------------------------------------------------------------------------
# The fast trainer classes (built lazily: importing fastft must not import trl)
# --------------------------------------------------------------------------------------------------------------------
_SFT_OUTPUTS = ("log_probs", "entropy", "is_top1")


def _build_sft(base: type) -> type:
    class FastSFTTrainer(_FastOptimizerMixin, base):
        """TRL's SFTTrainer; the loss is fastft's linear cross-entropy on the last hidden state (no logits)."""

        #: Compute ``entropy`` / ``mean_token_accuracy`` exactly with one extra no-grad LM-head pass.
        token_metrics: bool = True

        def _fast_loss_applies(self, inputs: dict, return_outputs: bool) -> bool:
            if return_outputs or self.compute_loss_func is not None or self.aux_loss_enabled:
                return False
            if self.label_smoother is not None or self.args.loss_type != "nll" or "shift_labels" in inputs:
                return False
            parallelism = getattr(self.accelerator, "parallelism_config", None)
            return not (parallelism is not None and getattr(parallelism, "sp_enabled", False))

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if not self._fast_loss_applies(inputs, return_outputs):
                # e.g. DFT needs per-token log-probs: TRL's code with the fast per-token head underneath.
                with _fast_heads(self, temperature=1.0, policy_outputs=_SFT_OUTPUTS):
                    return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            mode = "train" if self.model.training else "eval"
            inputs["use_cache"] = False
            outputs_wanted = ("entropy", "is_top1") if self.token_metrics else ()
            with _fast_heads(self, temperature=1.0, policy_outputs=outputs_wanted) as fast:
                outputs = model(**inputs, fused_lm_head=LOSS_ONLY if fast else True,
                                num_items_in_batch=num_items_in_batch)
            # `outputs.loss` is sum(-log p) / max(num_items_in_batch or #valid, 1): TRL's reduction exactly.
            loss = outputs.loss
            if self.args.average_tokens_across_devices and num_items_in_batch is not None:
                loss = loss * (self.accelerator.num_processes // self.get_tp_size())
            self._log_sft_metrics(mode, inputs, outputs)
            return loss

        def _log_sft_metrics(self, mode: str, inputs: dict, outputs: Any) -> None:
            # The same metrics, gathered the same way, as SFTTrainer.compute_loss in TRL 1.16.
            gather = self.accelerator.gather_for_metrics
            if outputs.entropy is not None and outputs.is_top1 is not None:
                num_valid = gather(outputs.label_mask.sum()).sum()
                entropy_sum = gather(outputs.entropy.detach().sum()).sum()
                num_correct = gather(outputs.is_top1.sum()).sum()
                self._metrics[mode]["entropy"].append((entropy_sum / num_valid).item() if num_valid > 0 else 0.0)
                self._metrics[mode]["mean_token_accuracy"].append(
                    (num_correct / num_valid).item() if num_valid > 0 else 0.0)
            else:
                info_once("fastft: FastSFTTrainer.token_metrics is False: entropy and mean_token_accuracy are not "
                          "logged (they need one extra LM-head pass)", key="sft-no-metrics")
            if mode == "train":
                if "attention_mask" in inputs:
                    num_tokens = gather(inputs["attention_mask"].sum()).sum().item()
                elif "position_ids" in inputs:
                    local = torch.tensor(inputs["position_ids"].size(1), device=inputs["position_ids"].device)
                    num_tokens = gather(local).sum().item()
                else:
                    raise ValueError("Expected 'attention_mask' or 'position_ids' in inputs.")
                self._total_train_tokens += num_tokens // self._tp_size
            self._metrics[mode]["num_tokens"] = [self._total_train_tokens]

    return FastSFTTrainer


def _build_dpo(base: type) -> type:
    class FastDPOTrainer(_FastOptimizerMixin, base):
        """TRL's DPOTrainer; chosen/rejected and reference log-probs come from fastft's selective_log_softmax."""

        def _dpo_outputs(self) -> tuple[str, ...]:
            # What TRL 1.16's DPOTrainer asks its fused head for (metrics, and WPO weights when enabled).
            outputs = ("log_probs", "entropy", "mean_logits", "is_top1")
            return outputs + ("log_sum_sq_probs",) if self.use_weighting else outputs

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            with _fast_heads(self, temperature=1.0, policy_outputs=self._dpo_outputs()):
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

        def compute_ref_log_probs(self, model, inputs):
            # Used by precompute_ref_log_probs; TRL disables the adapters (or selects "ref") around the forward.
            with _fast_heads(self, temperature=1.0, policy_outputs=("log_probs",)):
                return super().compute_ref_log_probs(model, inputs)

    return FastDPOTrainer


_GRPO_VISION_ARGS = ("pixel_values", "image_grid_thw", "num_images", "pixel_attention_mask", "spatial_shapes",
                     "num_tiles", "image_sizes", "token_type_ids", "mm_token_type_ids", "image_position_ids")


def _build_grpo(base: type) -> type:
    class FastGRPOTrainer(_FastOptimizerMixin, base):
        """TRL's GRPOTrainer; policy, old-policy and reference log-probs come from fastft's selective_log_softmax
        on the completion positions only. The loss variants are TRL's own code."""

        def _get_per_token_logps_and_entropies(
            self,
            model,
            input_ids,
            attention_mask,
            logits_to_keep,
            batch_size=None,
            compute_entropy=False,
            compute_aux_loss=False,
            pixel_values=None,
            image_grid_thw=None,
            num_images=None,
            pixel_attention_mask=None,
            spatial_shapes=None,
            num_tiles=None,
            image_sizes=None,
            token_type_ids=None,
            mm_token_type_ids=None,
            image_position_ids=None,
        ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
            args = dict(model=model, input_ids=input_ids, attention_mask=attention_mask,
                        logits_to_keep=logits_to_keep, batch_size=batch_size, compute_entropy=compute_entropy,
                        compute_aux_loss=compute_aux_loss, pixel_values=pixel_values, image_grid_thw=image_grid_thw,
                        num_images=num_images, pixel_attention_mask=pixel_attention_mask,
                        spatial_shapes=spatial_shapes, num_tiles=num_tiles, image_sizes=image_sizes,
                        token_type_ids=token_type_ids, mm_token_type_ids=mm_token_type_ids,
                        image_position_ids=image_position_ids)
            if compute_aux_loss or any(args[name] is not None for name in _GRPO_VISION_ARGS):
                info_once("fastft: GRPO with vision inputs or an MoE aux loss uses TRL's log-prob path",
                          key="grpo-fallback")
                return super()._get_per_token_logps_and_entropies(**args)
            # The old-policy and reference passes need no entropy: don't compute one (TRL always does).
            outputs = ("log_probs", "entropy") if compute_entropy else ("log_probs",)
            with _fast_heads(self, temperature=self.temperature, policy_outputs=outputs):
                return super()._get_per_token_logps_and_entropies(**args)

        def _generate_single_turn(self, prompt_ids, images, multimodal_fields, num_generations,
                                  has_tool_images=False):
            fast_model = _fast_model_class()
            for_inference = getattr(fast_model, "for_inference", None)
            for_training = getattr(fast_model, "for_training", None)
            if self.use_vllm or for_inference is None or for_training is None:
                return super()._generate_single_turn(prompt_ids, images, multimodal_fields, num_generations,
                                                     has_tool_images)
            unwrapped = self.accelerator.unwrap_model(self.model)
            for_inference(unwrapped)
            try:
                return super()._generate_single_turn(prompt_ids, images, multimodal_fields, num_generations,
                                                     has_tool_images)
            finally:
                for_training(unwrapped)

    return FastGRPOTrainer


# --------------------------------------------------------------------------------------------------------------------
# PatchFastRL
# --------------------------------------------------------------------------------------------------------------------
#: algorithm -> (trainer module, class name, builder, {method: expected parameter names} checked on TRL's class)
_TRAINERS: dict[str, tuple[str, str, Callable[[type], type], dict[str, tuple[str, ...]]]] = {
    "SFT": ("trl.trainer.sft_trainer", "SFTTrainer", _build_sft, {
        "compute_loss": ("self", "model", "inputs", "return_outputs", "num_items_in_batch"),
        "create_optimizer": ("self", "model"),
    }),
    "DPO": ("trl.trainer.dpo_trainer", "DPOTrainer", _build_dpo, {
        "compute_loss": ("self", "model", "inputs", "return_outputs", "num_items_in_batch"),
        "_compute_loss": ("self", "model", "inputs", "return_outputs"),
        "compute_ref_log_probs": ("self", "model", "inputs"),
        "create_optimizer": ("self", "model"),
    }),
    "GRPO": ("trl.trainer.grpo_trainer", "GRPOTrainer", _build_grpo, {
        "_get_per_token_logps_and_entropies": (
            "self", "model", "input_ids", "attention_mask", "logits_to_keep", "batch_size", "compute_entropy",
            "compute_aux_loss", *_GRPO_VISION_ARGS),
        "_generate_single_turn": ("self", "prompt_ids", "images", "multimodal_fields", "num_generations",
                                  "has_tool_images"),
        "create_optimizer": ("self", "model"),
    }),
}

SUPPORTED_ALGORITHMS = tuple(_TRAINERS)

_FUSED_HEAD_SIGNATURE = ("model", "temperature", "cast_lm_head_to_fp32", "outputs")
_FUSED_OUTPUT_FIELDS = ("loss", "log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1", "label_mask")

#: algorithm -> its Patch objects, built once so PatchFastRL is idempotent and unpatch/re-patch reuse them.
_PATCHES: dict[str, list[Patch]] = {}


def _common_problem() -> str | None:
    """Reasons no trainer can be patched: TRL's fused-head helper moved, or fastft's kernels are missing."""
    from trl.trainer import utils as trl_utils

    problem = signature_guard(*_FUSED_HEAD_SIGNATURE)(getattr(trl_utils, "add_fused_lm_head", None))
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


def _class_guard(base: type, methods: dict[str, tuple[str, ...]]) -> Callable[[Any], str | None]:
    def guard(original: Any) -> str | None:
        if original is not base:
            return f"it is {original!r}, not TRL's {base.__qualname__}"
        for method, expected in methods.items():
            problem = signature_guard(*expected)(getattr(base, method, None))
            if problem:
                return f"{base.__qualname__}.{method}: {problem}"
        return _common_problem()

    return guard


def _patches_for(algorithm: str) -> list[Patch]:
    if algorithm in _PATCHES:
        return _PATCHES[algorithm]
    import importlib

    module_name, class_name, build, methods = _TRAINERS[algorithm]
    base = getattr(importlib.import_module(module_name), class_name)
    fast = build(base)
    fast.__qualname__ = fast.__name__ = f"Fast{class_name}"
    fast.__module__ = __name__
    guard = _class_guard(base, methods)
    # Top-down: reading `trl.X` resolves (and caches) trl.trainer.X, then the module attribute, all still TRL's class
    # when their Patch records the original; patching the module first would make the lazy modules cache ours.
    _PATCHES[algorithm] = [
        Patch(name=f"trl {algorithm}: {owner}.{class_name} -> Fast{class_name}", owner=owner, attribute=class_name,
              replacement=fast, requires=TRL_RANGE, guard=guard)
        for owner in ("trl", "trl.trainer", module_name)
    ]
    return _PATCHES[algorithm]


def fast_trainer_class(algorithm: str) -> type:
    """The fast subclass for ``algorithm`` (built on TRL's class whether or not it is patched in)."""
    return _patches_for(_normalize(algorithm))[0].replacement


def _normalize(algorithm: str) -> str:
    key = str(algorithm).upper()
    if key not in _TRAINERS:
        raise ValueError(f"PatchFastRL: unknown algorithm {algorithm!r}; supported: {', '.join(SUPPORTED_ALGORITHMS)} "
                         "(or None for all)")
    return key


def PatchFastRL(algorithm: str | None = None, FastModel: Any = None) -> dict[str, bool]:  # noqa: N802, N803 (Unsloth's names)
    """Point ``trl.<X>Trainer`` (all the names users import it by) at fastft's fast subclass.

    Args:
        algorithm: "SFT", "DPO" or "GRPO" (any case), or None for all of them.
        FastModel: accepted for Unsloth compatibility; when it has ``for_inference``/``for_training``, GRPO calls them
            around generation (default: ``fastft.model.FastModel`` if present).

    Returns:
        ``{algorithm: patched}``; False means that trainer's TRL version or signatures did not match, a warning said
        why, and ``trl.<X>Trainer`` is still TRL's class. Idempotent; ``fastft.unpatch()`` reverts.

    Import the trainer after calling this (``from trl import GRPOTrainer``): a name bound earlier keeps TRL's class.
    """
    global _FAST_MODEL
    algorithms = SUPPORTED_ALGORITHMS if algorithm is None else (_normalize(algorithm),)
    if FastModel is not None:
        _FAST_MODEL = FastModel
    result = {}
    for name in algorithms:
        patches = _patches_for(name)
        applied = []
        for patch in patches:
            if not patch.apply():  # it warned (once); its siblings would fail the same guard, so stop here
                break
            applied.append(patch)
        result[name] = len(applied) == len(patches)
        if not result[name]:
            for patch in reversed(applied):  # never leave a trainer half-patched
                patch.revert()
    return result


__all__ = ["LOSS_ONLY", "PatchFastRL", "SUPPORTED_ALGORITHMS", "fast_trainer_class"]
