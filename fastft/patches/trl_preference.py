"""Lean LM heads for TRL's ORPO, CPO and Online DPO trainers (``trl.experimental``), used by :mod:`fastft.patches.trl`.

These trainers have no fused-head seam: ``ORPOTrainer.concatenated_forward``, ``CPOTrainer.concatenated_forward`` and
``OnlineDPOTrainer._forward`` call ``model(...)`` without labels and read the full ``outputs.logits`` ([B, T, V]).
PatchFastRL replaces each of those methods with an implementation of the same contract (not a copy of its text):

* the decoder body runs through ``model(...)`` as before -- every wrapper in the call chain (DDP, accelerate's
  autocast, PEFT, gradient checkpointing) still runs -- but while the call lasts the transformers model's ``forward``
  is one that stops at the final hidden states and computes, under the same autocast, only what the trainer reads;
* per-token label log-probs come from ``fastft.kernels.selective_log_softmax`` over the scored positions only
  (completion tokens; for ORPO's NLL every attended token of the chosen rows; for Online DPO every completion slot);
  the NLL (``nn.CrossEntropyLoss`` mean over non-ignored labels) is ``-sum(log p) / count`` of the same log-probs, so
  positions scored by both the NLL and the preference log-probs (same target) reach the head once;
* ``chosen_logits`` / ``rejected_logits``, which TRL 1.16's ``get_batch_loss_metrics`` only reads as
  ``.detach().mean()`` (the ``logits/chosen|rejected`` metrics), are returned as the per-position mean logit over the
  vocabulary, ``[B, T']`` (T' = T - 1 for ORPO, T for CPO, as TRL slices them): every position holds V logits, so its
  ``.mean()`` is the mean of TRL's full ``[B, T', V]`` tensor. Without softcapping that mean is linear in the hidden
  state, ``scale * (h . mean_v(W) + mean(b))``; with Gemma-2's softcap it is computed exactly, without gradient, in
  row chunks (``lm_head.token_stats``). Values equal TRL's to float rounding (tests/trl/test_preference_lean.py).

Guards. At PatchFastRL time :func:`contract_problem` compares the syntax tree of every TRL method whose contract these
hooks implement (``concatenated_forward``, ``get_batch_logps``, ``get_batch_loss_metrics``; ``_forward``) with the
TRL 1.16 text they were written against; a difference makes the row's lean head absent, said by
``lean_head_absent`` and the step-1 summary, and TRL's method runs. Per call, the lean ``concatenated_forward`` runs
only when its caller is TRL's own ``get_batch_loss_metrics`` (a user subclass overriding it, or calling the method
itself, may read the logits: it gets TRL's path) and ``get_batch_logps`` is not overridden. TRL's method also runs,
with a one-time note naming why, for an encoder-decoder model, an MoE aux loss (``output_router_logits``), vision
inputs (Online DPO), a model with an unknown instance ``forward``, or an LM head fastft cannot fuse (the rules of
:func:`fastft.patches.trl_heads._fallback_reason`).
"""

from __future__ import annotations

import ast
import collections
import contextlib
import functools
import hashlib
import importlib
import inspect
import sys
import textwrap
import types
from collections.abc import Callable, Iterator
from typing import Any

import torch

from fastft._log import info_once, logger
from fastft.patches.lm_head import HeadWeights, head_weights, lm_head_log_probs, token_stats
from fastft.patches.trl_heads import _fallback_reason, _fused_target, _under_mixed_precision

#: row -> (module, class, {method: digest of its syntax tree in TRL 1.16, docstring dropped}); see contract_problem.
_CONTRACTS: dict[str, tuple[str, str, dict[str, str]]] = {
    "ORPO": (
        "trl.experimental.orpo.orpo_trainer",
        "ORPOTrainer",
        {
            "concatenated_forward": "525fe9856926354f",
            "get_batch_logps": "485955c470f0a34f",
            "get_batch_loss_metrics": "a138fde8f71522e1",
        },
    ),
    "CPO": (
        "trl.experimental.cpo.cpo_trainer",
        "CPOTrainer",
        {
            "concatenated_forward": "61c6dd8888886d9d",
            "get_batch_logps": "dbdbcfbf80243d23",
            "get_batch_loss_metrics": "99bd5a02b2531183",
        },
    ),
    "OnlineDPO": ("trl.experimental.online_dpo.online_dpo_trainer", "OnlineDPOTrainer", {"_forward": "5fe301153e9df8a5"}),
}

#: (row, "lean" | "trl") -> calls of the replaced method since import: what the tests and the benchmark read.
LEAN_CALLS: collections.Counter = collections.Counter()

#: Logits alive at once in the no-grad vocabulary-mean pass over weight rows (fp32 elements).
_WEIGHT_CHUNK_ELEMENTS = 1 << 22


def method_digest(function: Callable) -> str:
    """A digest of ``function``'s syntax tree (comments, formatting and its docstring do not count)."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(function)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant):
        del body[0]
    return hashlib.sha256(ast.dump(tree, include_attributes=False).encode()).hexdigest()[:16]


def _trl_class(algorithm: str) -> type:
    module, class_name, _ = _CONTRACTS[algorithm]
    return getattr(importlib.import_module(module), class_name)


def _trl_function(cls: type, name: str) -> Callable:
    """TRL's own function (not a fastft hook installed over it)."""
    value = inspect.getattr_static(cls, name)
    value = value.__func__ if isinstance(value, (staticmethod, classmethod)) else value
    return getattr(value, "_fastft_original", value)


@functools.cache
def contract_problem(algorithm: str) -> str | None:
    """Why ``algorithm``'s lean head cannot stand in for TRL's method (None when it can): the methods it implements
    the contract of, or the consumer that reads their results, differ from TRL 1.16's text."""
    try:
        cls = _trl_class(algorithm)
    except (ImportError, AttributeError) as exc:
        return f"no {_CONTRACTS[algorithm][1]} ({exc})"
    import trl

    changed = []
    for name, digest in _CONTRACTS[algorithm][2].items():
        try:
            found = method_digest(_trl_function(cls, name))
        except (AttributeError, OSError, TypeError, SyntaxError) as exc:
            return f"no lean head: {cls.__name__}.{name} cannot be read ({exc})"
        if found != digest:
            changed.append(name)
    if changed:
        return (
            f"no lean head: TRL {trl.__version__}'s {cls.__name__}.{', '.join(changed)} differ from the TRL 1.16 "
            "text fastft's lean head implements the contract of, so the loss runs TRL's code with full logits"
        )
    return None


# --------------------------------------------------------------------------------------------------------------------
# The forward that stops at the hidden states
# --------------------------------------------------------------------------------------------------------------------
#: Keywords PEFT's forward passes down as None; the backbone does not take all of them.
_NONE_KEYWORDS = ("labels", "inputs_embeds", "output_attentions", "output_hidden_states", "return_dict", "task_ids")


@contextlib.contextmanager
def _lean_forward(trainer: Any, model: Any, compute: Callable[[Any, torch.Tensor], dict]) -> Iterator[None]:
    """While active, ``model(...)`` returns ``compute(transformers_model, last_hidden_state)``: the LM head never runs.

    The transformers model inside ``model`` (accelerate/DDP and PEFT wrappers seen through) gets the replacement
    ``forward``; when accelerate's mixed-precision wrapper stood there, the replacement runs under the same autocast
    with fp32 outputs (``trl_heads._under_mixed_precision``)."""
    target = _fused_target(trainer, model)
    current = target.__dict__.get("forward")

    def lean(self, input_ids=None, attention_mask=None, **kwargs):
        for key in _NONE_KEYWORDS:
            if key in kwargs and kwargs[key] is None:
                del kwargs[key]
        kwargs["use_cache"] = False
        hidden = self.base_model(input_ids=input_ids, attention_mask=attention_mask, **kwargs).last_hidden_state
        return compute(self, hidden)

    lean._fastft_fast_head = True  # type: ignore[attr-defined]
    function = lean
    if current is not None and getattr(getattr(current, "__func__", current), "__wrapped__", None) is not None:
        function = _under_mixed_precision(trainer, lean)
    target.forward = types.MethodType(function, target)
    try:
        yield
    finally:
        if current is None:
            target.__dict__.pop("forward", None)
        else:
            target.forward = current


def _head_problem(trainer: Any, model: Any) -> str | None:
    """Why the lean head cannot score for ``model`` (None when it can): trl_heads' rules, plus a backbone to call."""
    target = _fused_target(trainer, model)
    if target is None or not hasattr(target, "get_output_embeddings") or not hasattr(target, "base_model"):
        return f"{type(target).__name__} is not a transformers causal LM"
    if target.base_model is target:
        return f"{type(target).__name__} has no separate decoder body"
    problem = _instance_forward_problem(target)
    if problem:
        return problem
    head = target.get_output_embeddings()
    if head is None:
        return f"{type(target).__name__} has no output embeddings"
    return _fallback_reason(head, target.config.get_text_config(), {}, True, None, True, 1.0)


def _instance_forward_problem(target: Any) -> str | None:
    """The lean forward replaces ``target``'s instance ``forward`` while a call lasts: only when there is none, or it is
    accelerate's mixed-precision wrapper around the class's own forward (re-created by ``_under_mixed_precision``)."""
    current = target.__dict__.get("forward")
    if current is None:
        return None
    own = getattr(type(target).forward, "__func__", type(target).forward)
    func = getattr(current, "__func__", current)
    for _ in range(8):  # accelerate stacks two wrappers
        func = getattr(func, "__wrapped__", None)
        if func is None:
            break
        if func is own:
            return None
    return f"{type(target).__name__} carries an instance forward fastft does not know ({current!r})"


@torch.no_grad()
def mean_logits(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, softcap: float | None, scale: float | None
) -> torch.Tensor:
    """The mean over the vocabulary of the (scaled, softcapped) logits at every position: fp32 ``hidden.shape[:-1]``.

    hidden ``[..., H]``, weight ``[V, H]``. Without softcap the mean is linear: ``hidden . mean_v(W) + mean(b)``
    (mean_v(W) accumulated in fp32 over chunks of weight rows); with softcap, exact chunked logits (no gradient)."""
    flat = hidden.reshape(-1, hidden.shape[-1])
    if softcap is not None:
        dummy = torch.zeros(flat.shape[0], dtype=torch.long, device=flat.device)
        out = token_stats(flat, HeadWeights(weight, bias, softcap, scale), dummy, ("mean_logits",))["mean_logits"]
        return out.view(hidden.shape[:-1])
    vocab, width = weight.shape
    rows = max(1, _WEIGHT_CHUNK_ELEMENTS // width)
    column_sum = torch.zeros(width, dtype=torch.float32, device=weight.device)
    for start in range(0, vocab, rows):
        column_sum += weight[start : start + rows].float().sum(0)
    out = flat.to(weight.device).float() @ (column_sum / vocab)
    if bias is not None:
        out = out + bias.float().mean()
    if scale is not None:
        out = out * scale
    return out.view(hidden.shape[:-1])


# --------------------------------------------------------------------------------------------------------------------
# ORPO / CPO: concatenated_forward
# --------------------------------------------------------------------------------------------------------------------
def _pair_compute(lp_labels: torch.Tensor, nll_labels: torch.Tensor | None) -> Callable[[Any, torch.Tensor], dict]:
    """What ORPO/CPO read from the logits, from the hidden states of the concatenated rows.

    ``lp_labels`` ``[N, T]``: the labels of ``get_batch_logps`` (-100 = not scored); ``nll_labels`` ``[N, T]``: those
    of the NLL (-100 outside it), or None for no NLL. Both are shifted here (position t predicts token t + 1)."""

    def compute(model: Any, hidden: torch.Tensor) -> dict:
        head = head_weights(model, model.config.get_text_config())
        weight = head.weight
        hidden = hidden.to(weight.device)
        states = hidden[:, :-1]
        lp_targets = lp_labels[:, 1:].to(weight.device)
        lp_mask = lp_targets != -100
        if nll_labels is None:
            nll_mask = extra = torch.zeros_like(lp_mask)
            nll_targets = lp_targets
        else:
            nll_targets = nll_labels[:, 1:].to(weight.device)
            nll_mask = nll_targets != -100
            # A position both sums score with the same target reaches the head once.
            extra = nll_mask & ~(lp_mask & (nll_targets == lp_targets))
        rows = torch.cat((states[lp_mask], states[extra]))
        targets = torch.cat((lp_targets[lp_mask], nll_targets[extra]))
        lp = lm_head_log_probs(head, rows, targets)
        n_lp = int(lp_mask.sum())
        lp_grid = lp.new_zeros(lp_mask.shape).masked_scatter(lp_mask, lp[:n_lp])
        nll = None
        if nll_labels is not None:
            shared = nll_mask & ~extra
            nll = -((lp_grid * shared).sum() + lp[n_lp:].sum()) / nll_mask.sum()
        return {
            "logps_sum": lp_grid.sum(-1),
            "logps_count": lp_mask.sum(-1),
            "nll": nll,
            "mean_logits": mean_logits(hidden, *head),
        }

    return compute


def _pair_call_problem(trainer: Any, model: Any, caller: types.CodeType | None, algorithm: str) -> str | None:
    """Why this ``concatenated_forward`` call must run TRL's code (None: the lean one gives what the caller reads)."""
    problem = contract_problem(algorithm)
    if problem:
        return problem
    cls = _trl_class(algorithm)
    if caller is not _trl_function(cls, "get_batch_loss_metrics").__code__:
        # Only TRL's own get_batch_loss_metrics is known to read chosen/rejected logits as .mean() alone.
        return (
            "concatenated_forward called from somewhere other than TRL's get_batch_loss_metrics (which may read "
            "the full logits)"
        )
    # TRL's concatenated_forward calls self.get_batch_logps with the full logits: an override must get them.
    if _trl_function(type(trainer), "get_batch_logps") is not _trl_function(cls, "get_batch_logps"):
        return f"{type(trainer).__name__} overrides get_batch_logps (it takes the full logits)"
    if getattr(trainer, "is_encoder_decoder", False):
        return "an encoder-decoder model"
    if getattr(trainer, "aux_loss_enabled", False):
        return "an MoE aux loss (output_router_logits)"
    return _head_problem(trainer, model)


def _hook_pair_forward(algorithm: str) -> Callable[[Callable], Callable]:
    """ORPO/CPO ``concatenated_forward(model, batch)`` -> (chosen_logps, rejected_logps, chosen_logits,
    rejected_logits, nll_loss) with the lean head; ``chosen/rejected_logits`` are per-position vocabulary means
    (see the module docstring), read by TRL's ``get_batch_loss_metrics`` only through ``.mean()``."""

    def hook(original: Callable) -> Callable:
        def concatenated_forward(self, model, batch):
            problem = _pair_call_problem(self, model, sys._getframe(1).f_code, algorithm)
            if problem:
                info_once(
                    f"fastft: {algorithm} concatenated_forward runs TRL's code with full logits ({problem})",
                    key=f"{algorithm}-trl-forward:{problem}",
                )
                LEAN_CALLS[algorithm, "trl"] += 1
                return original(self, model, batch)
            LEAN_CALLS[algorithm, "lean"] += 1
            return _pair_forward(self, model, batch, algorithm)

        concatenated_forward._fastft_original = original  # type: ignore[attr-defined]
        return concatenated_forward

    return hook


def _pair_forward(trainer: Any, model: Any, batch: dict, algorithm: str) -> tuple:
    padding = trainer.padding_value if algorithm == "ORPO" else trainer.pad_token_id
    concatenated = trainer.concatenated_inputs(
        batch, is_encoder_decoder=False, padding_value=padding, device=trainer.accelerator.device
    )
    len_chosen = batch["chosen_labels"].shape[0]
    input_ids = concatenated["concatenated_input_ids"]
    attention_mask = concatenated["concatenated_attention_mask"]
    labels = concatenated["concatenated_labels"]
    if algorithm == "ORPO":
        # ORPO's NLL: every attended token of the chosen rows (prompt and response); its log-probs are averaged.
        nll_labels = torch.where(attention_mask == 1, input_ids, -100)
        nll_labels[len_chosen:] = -100
        average = True
    else:
        # CPO's NLL: the chosen rows' labels, unless cpo_alpha is 0; SimPO and IPO average the log-probs.
        nll_labels = None if trainer.cpo_alpha == 0 else labels.clone()
        if nll_labels is not None:
            nll_labels[len_chosen:] = -100
        average = trainer.loss_type in ("ipo", "simpo")
    with _lean_forward(trainer, model, _pair_compute(labels, nll_labels)):
        out = model(input_ids, attention_mask=attention_mask, use_cache=False)
    logps = out["logps_sum"] / out["logps_count"] if average else out["logps_sum"]
    nll = out["nll"] if out["nll"] is not None else torch.tensor(0.0).to(trainer.accelerator.device)
    # TRL: ORPO's chosen/rejected logits drop the last position, CPO's keep every position.
    positions = out["mean_logits"][:, :-1] if algorithm == "ORPO" else out["mean_logits"]
    return (logps[:len_chosen], logps[len_chosen:], positions[:len_chosen], positions[len_chosen:], nll)


# --------------------------------------------------------------------------------------------------------------------
# Online DPO: _forward
# --------------------------------------------------------------------------------------------------------------------
def _hook_online_dpo_forward(original: Callable) -> Callable:
    """``OnlineDPOTrainer._forward`` -> log p(completion token) fp32 ``[B, C]`` at every completion slot (padding
    slots included, as TRL's, whose KL metric reads them), with only those positions reaching the LM head."""

    def _forward(self, model, prompt_ids, prompt_mask, completion_ids, completion_mask, vision_inputs=None):
        problem = contract_problem("OnlineDPO") or (
            "vision inputs" if vision_inputs is not None else _head_problem(self, model)
        )
        if problem:
            info_once(
                f"fastft: OnlineDPO _forward runs TRL's code with full logits ({problem})",
                key=f"OnlineDPO-trl-forward:{problem}",
            )
            LEAN_CALLS["OnlineDPO", "trl"] += 1
            return original(self, model, prompt_ids, prompt_mask, completion_ids, completion_mask, vision_inputs)
        LEAN_CALLS["OnlineDPO", "lean"] += 1
        # TRL 1.16's truncation: drop prompt tokens from the left so prompt + completion fit max_length.
        cut = max(prompt_ids.size(1) + completion_ids.size(1) - self.max_length, 0)
        prompt_ids, prompt_mask = prompt_ids[:, cut:], prompt_mask[:, cut:]
        ids = torch.cat((prompt_ids, completion_ids), dim=1)
        mask = torch.cat((prompt_mask, completion_mask), dim=1)
        prompt_len = prompt_ids.size(1)
        # The hidden state at position t predicts token t + 1; TRL slices [P - 1, end - 1) (all of them if P == 0).
        start, end = (prompt_len - 1, -1) if prompt_len > 0 else (0, None)

        def compute(inner: Any, hidden: torch.Tensor) -> dict:
            head = head_weights(inner, inner.config.get_text_config())
            states = hidden[:, start:end].to(head.weight.device)
            targets = completion_ids.to(head.weight.device)
            lp = lm_head_log_probs(head, states.reshape(-1, states.shape[-1]), targets.reshape(-1))
            return {"log_probs": lp.view(targets.shape)}

        with _lean_forward(self, model, compute):
            out = model(ids, attention_mask=mask)
        logger.debug("fastft: OnlineDPO lean _forward scored %d completion slots", completion_ids.numel())
        return out["log_probs"]

    _forward._fastft_original = original  # type: ignore[attr-defined]
    return _forward


_PAIR_FORWARD_PARAMETERS = ("model", "batch")
_ONLINE_DPO_FORWARD_PARAMETERS = ("model", "prompt_ids", "prompt_mask", "completion_ids", "completion_mask", "vision_inputs")

__all__ = ["LEAN_CALLS", "contract_problem", "mean_logits", "method_digest"]
