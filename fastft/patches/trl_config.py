"""Where FastModel's choices meet a TRL trainer's config, before TRL's ``__init__`` reads it (called by PatchFastRL's
``__init__`` hook in :mod:`fastft.patches.trl`): gradient checkpointing and ``max_seq_length``. Each choice is said
once, visibly."""

from __future__ import annotations

import dataclasses
from typing import Any

from fastft._log import info_once, warn_once


def _apply_checkpointing(model: Any, args: Any) -> None:
    """The one checkpointing rule: ``FastModel.get_peft_model(use_gradient_checkpointing=...)`` given explicitly wins;
    left at its default (None), TRL's ``gradient_checkpointing`` decides whether (True: fastft's mode, offloaded on
    CUDA; False: off). Either way fastft owns the mechanism, so TRL's flag is set to False afterwards: the Trainer
    would otherwise replace fastft's checkpoint function with its own."""
    follows = getattr(model, "_fastft_checkpointing_follows_trainer", None)
    # transformers 5.24 renamed the flag activation_checkpointing (gradient_checkpointing stays as an alias)
    flags = [name for name in ("activation_checkpointing", "gradient_checkpointing") if hasattr(args, name)]
    if follows is None or args is None or not flags:
        return  # not a FastModel LoRA model: TRL's own rule
    from fastft.patches.checkpointing import enable_checkpointing

    asked = bool(getattr(args, flags[0]))
    if follows:
        mode = "fastft" if asked else False
        ran = enable_checkpointing(model, mode)
        model._fastft_checkpointing = mode
        why = f"TRL's gradient_checkpointing={asked}"
    else:
        ran, why = model._fastft_checkpointing, "set by FastModel.get_peft_model(use_gradient_checkpointing=...)"
    warn_once(f"fastft: gradient checkpointing: {ran or 'off'} ({why})", key=f"checkpointing:{ran}:{why}", category=_Note)
    if asked:
        for name in flags:
            setattr(args, name, False)
    if ran and ran != "off" and getattr(args, "ddp_find_unused_parameters", False) is None:
        # transformers turns find_unused_parameters off under checkpointing only for a bare PreTrainedModel (not a
        # PEFT wrapper); under DDP a checkpointed layer's recompute needs it off (LoRA uses every adapter each step).
        args.ddp_find_unused_parameters = False


def _apply_max_seq_length(model: Any, args: Any) -> None:
    """A ``max_seq_length`` the user gave FastModel sizes what TRL left at its defaults: SFT/DPO ``max_length``;
    GRPO's prompt + completion (``max_completion_length`` capped to fit, and ``max_prompt_length``, where the
    installed TRL has one, given the rest). An explicit TRL value always wins; each change is said once."""
    # Only a length the user gave FastModel: its default (the model's own context, 128K on Llama 3.1) is no request
    # to train on longer examples than TRL's default would.
    wanted = getattr(model, "_fastft_asked_max_seq_length", None)
    if not isinstance(wanted, int) or args is None or not dataclasses.is_dataclass(args):
        return
    fields = {f.name: f for f in dataclasses.fields(args)}
    config = type(args).__name__

    def left_default(name: str) -> bool:
        return name in fields and getattr(args, name) == fields[name].default

    if "max_length" in fields and isinstance(args.max_length, int):
        default = fields["max_length"].default
        if left_default("max_length") and wanted != default:
            args.max_length = wanted
            warn_once(
                f"fastft: {config}.max_length was TRL's default {default}; using FastModel's "
                f"max_seq_length {wanted} (set max_length to choose another)",
                key=f"max-length:{wanted}",
                category=_Note,
            )
        elif args.max_length < wanted:
            info_once(
                f"fastft: {config}.max_length={args.max_length} is shorter than FastModel's "
                f"max_seq_length {wanted}: examples are truncated to {args.max_length} tokens",
                key=f"max-length-short:{args.max_length}",
            )
        return
    if not isinstance(getattr(args, "max_completion_length", None), int):
        return
    # GRPO and other generating trainers: prompt + completion must fit in max_seq_length.
    completion = args.max_completion_length
    if left_default("max_completion_length") and completion > wanted:
        args.max_completion_length = completion = wanted
        warn_once(
            f"fastft: {config}.max_completion_length was TRL's default {fields['max_completion_length'].default}"
            f", longer than FastModel's max_seq_length {wanted}; using {wanted} (set it to choose another)",
            key=f"max-completion:{wanted}",
            category=_Note,
        )
    prompt = getattr(args, "max_prompt_length", None)
    if left_default("max_prompt_length") and wanted - completion > 0 and prompt != wanted - completion:
        args.max_prompt_length = prompt = wanted - completion
        warn_once(
            f"fastft: {config}.max_prompt_length was TRL's default {fields['max_prompt_length'].default}; "
            f"using FastModel's max_seq_length {wanted} minus max_completion_length {completion} = {prompt}",
            key=f"max-prompt:{prompt}",
            category=_Note,
        )
    if isinstance(prompt, int) and prompt + completion > wanted:
        info_once(
            f"fastft: {config}: max_prompt_length {prompt} + max_completion_length {completion} exceeds "
            f"FastModel's max_seq_length {wanted}",
            key=f"grpo-lengths:{prompt}:{completion}:{wanted}",
        )


class _Note(UserWarning):
    """A visible one-time note about a choice fastft made for the user (not a problem)."""
