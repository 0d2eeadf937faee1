"""PatchFastRL: TRL's trainers with fastft's lean LM-head losses, optimizer, generation.

Where the losses step in is described in :mod:`fastft.patches.trl_heads` (the fast heads under TRL's
``add_fused_lm_head`` seam); the hooks each trainer gets are in :mod:`fastft.patches.trl_hooks`. This module
holds the table of rows (which TRL class, which methods) and PatchFastRL itself.

Rows: SFT, DPO, GRPO, KTO and RLOO score tokens through TRL's fused-head seam and get fastft's lean head (only scored
positions reach the LM head; no full logits). ORPO, CPO and Online DPO (from ``trl.experimental``) have no such seam:
:mod:`fastft.patches.trl_preference` replaces the method that reads ``model(...).logits`` with a lean implementation
of its contract (guarded: TRL's method runs where the guard fails, and the summary says why). Every row gets
fastft.optim's optimizer, the checkpointing rule and the step-1 summary; Reward's loss runs TRL's code as written (a
sequence-classification head: its ``no_lean_head`` says so, and the step-1 summary prints it).

Safety: each hook checks, at PatchFastRL time, that the method it wraps still takes the parameters the hook reads;
everything else is passed through untouched. When one fails, that trainer is left unpatched with one warning.
``fastft.unpatch()`` restores the classes.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Callable
from typing import Any

from fastft._log import warn_once
from fastft.patches import trl_hooks
from fastft.patches.base import Patch, parameters_guard
from fastft.patches.trl_config import _apply_max_seq_length  # noqa: F401 (re-exported: tests and older imports)
from fastft.patches.trl_heads import (  # noqa: F401 (re-exported: tests and fastft.doctor read them here)
    LOSS_ONLY,
    _fused_head_problem,
    _make_fast_forward,
    _without_fused_head,
)
from fastft.patches.trl_hooks import (
    _hook_create_optimizer,
    _hook_disable_checkpointing,
    _hook_grpo_generation,
    _hook_init,
    _hook_per_token_head,
    _hook_policy_log_probs,
    _hook_sft_compute_loss,
)
from fastft.patches.trl_preference import (
    _ONLINE_DPO_FORWARD_PARAMETERS,
    _PAIR_FORWARD_PARAMETERS,
    _hook_online_dpo_forward,
    _hook_pair_forward,
    contract_problem,
)


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
    """One row: ``module.class_name`` gets ``hooks``. ``no_lean_head``, when set, is why this row has no lean LM
    head (its loss runs TRL's code; the row still gets the optimizer, the checkpointing rule and the step-1 summary),
    said in the summary's ``loss head`` row and by :func:`lean_head_absent`."""

    module: str
    class_name: str
    hooks: tuple[_Hook, ...]
    no_lean_head: str = ""
    #: fastft's own lean head (no TRL seam): why it cannot stand in for TRL's method on this TRL, or None.
    lean_head_problem: Callable[[], str | None] | None = None


_OPTIMIZER_HOOK = _Hook("create_optimizer", _hook_create_optimizer)
_INIT_HOOK = _Hook("__init__", _hook_init, ("model", "args"))

_TRAINERS: dict[str, _TrainerSpec] = {
    "SFT": _TrainerSpec(
        "trl.trainer.sft_trainer",
        "SFTTrainer",
        (
            _Hook("compute_loss", _hook_sft_compute_loss, ("model", "inputs", "return_outputs", "num_items_in_batch")),
            _OPTIMIZER_HOOK,
            _INIT_HOOK,
        ),
    ),
    "DPO": _TrainerSpec(
        "trl.trainer.dpo_trainer",
        "DPOTrainer",
        (
            _Hook("compute_loss", _hook_per_token_head("DPO"), ("model", "inputs")),
            _Hook("compute_ref_log_probs", _hook_per_token_head("DPO"), ("model", "inputs")),
            _OPTIMIZER_HOOK,
            _INIT_HOOK,
        ),
    ),
    "GRPO": _TrainerSpec(
        "trl.trainer.grpo_trainer",
        "GRPOTrainer",
        (
            _Hook("_get_per_token_logps_and_entropies", _hook_policy_log_probs("GRPO"), ("model",)),
            _Hook("_generate_single_turn", _hook_grpo_generation),
            _OPTIMIZER_HOOK,
            _INIT_HOOK,
        ),
    ),
    # KTO: compute_loss covers the policy, KL and in-step reference passes; compute_ref_log_probs the precomputed one.
    "KTO": _TrainerSpec(
        "trl.trainer.kto_trainer",
        "KTOTrainer",
        (
            _Hook("compute_loss", _hook_per_token_head("KTO"), ("model", "inputs")),
            _Hook("compute_ref_log_probs", _hook_per_token_head("KTO"), ("model", "inputs")),
            _OPTIMIZER_HOOK,
            _INIT_HOOK,
        ),
    ),
    # RLOO shares GRPO's log-prob method and generation seam (same arguments).
    "RLOO": _TrainerSpec(
        "trl.trainer.rloo_trainer",
        "RLOOTrainer",
        (
            _Hook("_get_per_token_logps_and_entropies", _hook_policy_log_probs("RLOO"), ("model",)),
            _Hook("_generate_single_turn", _hook_grpo_generation),
            _OPTIMIZER_HOOK,
            _INIT_HOOK,
        ),
    ),
    # No lean head (see the reason): fastft's optimizer, the checkpointing rule and the step-1 summary.
    "Reward": _TrainerSpec(
        "trl.trainer.reward_trainer",
        "RewardTrainer",
        (_OPTIMIZER_HOOK, _INIT_HOOK),
        ("no LM head to fuse: RewardTrainer scores a sequence-classification head (one scalar per sequence)"),
    ),
    # No fused-head seam: the method reading the full logits is replaced by a lean one (fastft.patches.trl_preference).
    "ORPO": _TrainerSpec(
        "trl.experimental.orpo.orpo_trainer",
        "ORPOTrainer",
        (_Hook("concatenated_forward", _hook_pair_forward("ORPO"), _PAIR_FORWARD_PARAMETERS), _OPTIMIZER_HOOK, _INIT_HOOK),
        lean_head_problem=lambda: contract_problem("ORPO"),
    ),
    "CPO": _TrainerSpec(
        "trl.experimental.cpo.cpo_trainer",
        "CPOTrainer",
        (_Hook("concatenated_forward", _hook_pair_forward("CPO"), _PAIR_FORWARD_PARAMETERS), _OPTIMIZER_HOOK, _INIT_HOOK),
        lean_head_problem=lambda: contract_problem("CPO"),
    ),
    "OnlineDPO": _TrainerSpec(
        "trl.experimental.online_dpo.online_dpo_trainer",
        "OnlineDPOTrainer",
        (_Hook("_forward", _hook_online_dpo_forward, _ONLINE_DPO_FORWARD_PARAMETERS), _OPTIMIZER_HOOK, _INIT_HOOK),
        lean_head_problem=lambda: contract_problem("OnlineDPO"),
    ),
}

SUPPORTED_ALGORITHMS = tuple(_TRAINERS)
#: spelling-free key ("onlinedpo", "reward") -> the row's name
_KEYS = {name.upper(): name for name in _TRAINERS}


#: algorithm -> its Patch objects, built once so PatchFastRL is idempotent and unpatch/re-patch reuse them.
_PATCHES: dict[str, list[Patch]] = {}
#: algorithm -> why the installed TRL has no such trainer (it stays unpatched; PatchFastRL returns False for it).
_ABSENT: dict[str, str] = {}


def _patches_for(algorithm: str) -> list[Patch]:
    if algorithm in _PATCHES:
        return _PATCHES[algorithm]
    import importlib

    spec = _TRAINERS[algorithm]
    try:
        module = importlib.import_module(spec.module)
        cls = getattr(module, spec.class_name)
    except (ImportError, AttributeError) as exc:
        import trl

        _ABSENT[algorithm] = f"TRL {trl.__version__} has no {spec.module}.{spec.class_name} ({exc})"
        return []
    patches = [
        Patch(
            name=f"trl {algorithm}: {spec.class_name}.{hook.method}",
            owner=cls,
            attribute=hook.method,
            replacement=hook.make,
            wrap=True,
            tested=("trl",),
            guard=parameters_guard(*hook.needs) if hook.needs else None,
        )
        for hook in spec.hooks
    ]
    if callable(getattr(module, "disable_gradient_checkpointing", None)):
        # TRL's no-grad passes (GRPO old/ref log-probs, DPO/KTO reference) pause checkpointing without replacing the
        # checkpoint function fastft's rule chose (fastft.patches.trl_hooks._hook_disable_checkpointing).
        patches.append(
            Patch(
                name=f"trl {algorithm}: {spec.module}.disable_gradient_checkpointing",
                owner=module,
                attribute="disable_gradient_checkpointing",
                replacement=_hook_disable_checkpointing,
                wrap=True,
                tested=("trl",),
                guard=parameters_guard("model"),
            )
        )
    # Last, so it is set only when every hook went in: what patched_algorithm() reads.
    patches.append(
        Patch(
            name=f"trl {algorithm}: {spec.class_name} marker",
            owner=cls,
            attribute="_fastft_algorithm",
            replacement=algorithm,
            create=True,
        )
    )
    _PATCHES[algorithm] = patches
    return patches


def patched_algorithm(trainer_or_class: Any) -> str | None:
    """The row name (one of ``SUPPORTED_ALGORITHMS``) when ``trainer_or_class`` (a trainer or a trainer
    class, a user's subclass included) runs fastft's hooks, else None."""
    cls = trainer_or_class if isinstance(trainer_or_class, type) else type(trainer_or_class)
    return getattr(cls, "_fastft_algorithm", None)


def lean_head_absent(algorithm: str | None) -> str | None:
    """Why ``algorithm``'s row has no lean LM head (its loss is TRL's code as written), or None when it has one."""
    spec = _TRAINERS.get(algorithm or "")
    if spec is None:
        return None
    return spec.no_lean_head or (spec.lean_head_problem() if spec.lean_head_problem else None)


def uses_trl_head_seam(algorithm: str) -> bool:
    """Whether ``algorithm``'s lean head goes through TRL's fused-head seam (``add_fused_lm_head``, TRL >= 1.15), as
    SFT/DPO/GRPO/KTO/RLOO do; ORPO/CPO/Online DPO replace their method instead, and Reward has no lean head."""
    spec = _TRAINERS[algorithm]
    return not spec.no_lean_head and spec.lean_head_problem is None


def _normalize(algorithm: str) -> str:
    key = str(algorithm).upper().replace("_", "").replace("-", "").replace(" ", "")
    key = key.removesuffix("TRAINER") if key.removesuffix("TRAINER") in _KEYS else key
    if key not in _KEYS:
        close = difflib.get_close_matches(key, list(_KEYS), n=1)
        hint = f"; did you mean {_KEYS[close[0]]!r}?" if close else ""
        raise ValueError(
            f"PatchFastRL: unknown algorithm {algorithm!r}{hint} Supported: "
            f"{', '.join(SUPPORTED_ALGORITHMS)} (or None for all)"
        )
    return _KEYS[key]


def PatchFastRL(algorithm: str | None = None, FastModel: Any = None) -> dict[str, bool]:  # Unsloth's names
    """Give TRL's trainer classes fastft's lean LM-head losses, optimizer and generation hooks, in place.

    The hooks go onto TRL's class object itself (``trl.SFTTrainer`` and every name it is imported by), so the order
    of imports does not matter: a ``from trl import SFTTrainer`` made before this call, and a trainer built before
    it (anything before ``.train()``), run the fast paths too.

    Args:
        algorithm: one of ``SUPPORTED_ALGORITHMS`` ("SFT", "DPO", "GRPO", "KTO", "RLOO" with fastft's lean LM head;
            "ORPO", "CPO", "OnlineDPO" with the lean head of fastft.patches.trl_preference; "Reward" with the
            rest: optimizer, checkpointing rule, step-1 summary; any
            case, ``_``/``-`` ignored), or None for all of them.
        FastModel: accepted for Unsloth compatibility; when it has ``for_inference``/``for_training``, GRPO calls them
            around generation (default: fastft's own, :mod:`fastft.patches.modes`, which ``FastModel``'s are).

    Returns:
        ``{algorithm: patched}``; False means a method fastft hooks no longer has the parameters it relies on, or
        the installed TRL has no such trainer; a warning said which, and that trainer is TRL's, untouched.
        Idempotent; ``fastft.unpatch()`` reverts.
    """
    algorithms = SUPPORTED_ALGORITHMS if algorithm is None else (_normalize(algorithm),)
    if FastModel is not None:
        trl_hooks._FAST_MODEL = FastModel
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
        elif _TRAINERS[name].lean_head_problem is not None:
            problem = _TRAINERS[name].lean_head_problem()  # checked now: said once, visibly
            if problem:
                warn_once(f"fastft: PatchFastRL({name!r}): {problem}", key=f"lean-head:{name}")
        elif not _TRAINERS[name].no_lean_head:
            _without_fused_head(name)  # says once, visibly, when this TRL runs the losses its own way
    return result


__all__ = ["LOSS_ONLY", "PatchFastRL", "SUPPORTED_ALGORITHMS", "lean_head_absent", "patched_algorithm"]
