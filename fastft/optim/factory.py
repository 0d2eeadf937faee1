"""``create_optimizer(model, args)``: param groups + optimizer choice from the TrainingArguments users already write.

Call it from a Trainer subclass::

    class MyTrainer(SFTTrainer):
        def create_optimizer(self, model=None):
            if self.optimizer is None:
                self.optimizer = create_optimizer(self.model, self.args)
            return self.optimizer

Fields read: ``optim``, ``optim_args`` ("k=v,k=v", parsed like transformers), ``optim_target_modules``,
``learning_rate``, ``weight_decay``, ``adam_beta1``/``adam_beta2``, ``adam_epsilon``, ``gradient_accumulation_steps``,
``fp16``, and ``embedding_learning_rate`` via ``getattr`` (not a TrainingArguments field). Set it either as an attribute
after construction -- ``args = SFTConfig(...); args.embedding_learning_rate = 5e-6`` -- or with
:class:`EmbeddingLRMixin` (``class MyConfig(EmbeddingLRMixin, SFTConfig): pass``).

Param groups (only ``requires_grad`` params, tied weights counted once):

* ``decay``: everything else, at ``weight_decay``;
* ``no_decay``: norms (module class name contains "Norm", or transformers' name patterns), biases, and any 1-D
  param, at weight decay 0;
* ``embedding``: trained input/output embeddings -- ``nn.Embedding`` modules, the model's output embedding
  (``lm_head``), and PEFT ``modules_to_save`` copies of them -- at ``embedding_learning_rate`` (defaults to
  ``learning_rate``). LoRA adapters on an embedding stay in ``decay``;
* ``galore`` (GaLore optims only): 2-D weights of ``nn.Linear`` modules matched by ``optim_target_modules`` (a list of
  names, a regex string, or "all-linear", as in transformers), excluding embeddings.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from fastft._log import info_once, warn_once
from fastft.optim.galore import (
    GALORE_DEFAULTS,
    PROJ_TYPES,
    SVD_METHODS,
    GaLoreAdafactor,
    GaLoreAdamW,
    GaLoreAdamW8bit,
)

GALORE_OPTIMIZERS: dict[str, type] = {
    "galore_adamw": GaLoreAdamW,
    "galore_adamw_8bit": GaLoreAdamW8bit,
    "galore_adafactor": GaLoreAdafactor,
}
GALORE_OPTIMIZERS.update({f"{k}_layerwise": v for k, v in list(GALORE_OPTIMIZERS.items())})

# optim_args keys each GaLore optimizer accepts (values are strings in optim_args; converted to the default's type).
_GALORE_ARG_TYPES: dict[str, Any] = {k: type(v) for k, v in GALORE_DEFAULTS.items()}
_EXTRA_ARG_TYPES: dict[type, dict[str, Any]] = {
    GaLoreAdamW: {},
    GaLoreAdamW8bit: {"min_8bit_size": int, "embedding_bits": int},
    GaLoreAdafactor: {"beta1": float, "clip_threshold": float, "decay_rate": float},
}


@dataclasses.dataclass
class EmbeddingLRMixin:
    """Adds ``embedding_learning_rate`` to a TrainingArguments / TRL config dataclass.

    ``@dataclass class MyConfig(EmbeddingLRMixin, SFTConfig): pass``, then
    ``MyConfig(..., embedding_learning_rate=5e-6)``.
    """

    embedding_learning_rate: float | None = dataclasses.field(
        default=None, metadata={"help": "fastft: learning rate for trained embeddings / lm_head (None: learning_rate)"}
    )


def _optim_name(args: Any) -> str:
    optim = getattr(args, "optim", "adamw_torch")
    return str(getattr(optim, "value", optim)).lower()


def known_optimizers() -> list[str]:
    """Every ``optim`` value create_optimizer accepts."""
    from transformers.training_args import OptimizerNames

    return sorted(set(GALORE_OPTIMIZERS) | {o.value for o in OptimizerNames})


def parse_optim_args(optim_args: str | None) -> dict[str, str]:
    """ "k=v,k=v" -> {"k": "v"} (spaces dropped), as transformers parses ``TrainingArguments.optim_args``."""
    if not optim_args:
        return {}
    out = {}
    for item in optim_args.replace(" ", "").split(","):
        if not item:
            continue
        if item.count("=") != 1:
            raise ValueError(f"optim_args must look like 'k=v,k=v'; bad item {item!r} in {optim_args!r}")
        key, value = item.split("=")
        out[key] = value
    return out


# ----------------------------------------------------------------------------------------------------------------------
# Parameter classification
# ----------------------------------------------------------------------------------------------------------------------


def _embedding_param_ids(model: nn.Module) -> set[int]:
    ids: set[int] = set()
    out_emb = None
    get_out = getattr(model, "get_output_embeddings", None)
    if callable(get_out):
        try:
            out_emb = get_out()
        except (AttributeError, NotImplementedError):
            out_emb = None
    for name, module in model.named_modules():
        is_emb = isinstance(module, nn.Embedding) or (out_emb is not None and module is out_emb)
        # PEFT modules_to_save: "<...>.lm_head.modules_to_save.default" / "<...>.embed_tokens.modules_to_save.default"
        if not is_emb and ".modules_to_save." in f".{name}.":
            parent = name.split(".modules_to_save")[0].rsplit(".", 1)[-1]
            is_emb = parent in ("lm_head", "embed_tokens", "embed_out", "wte", "output", "embeddings")
        if not is_emb:
            continue
        for pname, p in module.named_parameters():
            if "lora_" not in pname:
                ids.add(id(p))
    return ids


def _no_decay_param_ids(model: nn.Module) -> set[int]:
    import re

    patterns = re.compile(r"bias|layernorm|rmsnorm|(?:^|\.)norm(?:$|\.)|_norm(?:$|\.)", re.IGNORECASE)
    ids: set[int] = set()
    for mname, module in model.named_modules():
        norm_module = isinstance(module, (nn.LayerNorm, nn.GroupNorm)) or "norm" in type(module).__name__.lower()
        for pname, p in module.named_parameters(recurse=False):
            full = f"{mname}.{pname}" if mname else pname
            if norm_module or p.dim() < 2 or patterns.search(full):
                ids.add(id(p))
    return ids


def galore_target_param_ids(model: nn.Module, target_modules: Any, optim: str) -> set[int]:
    """ids of 2-D trainable ``nn.Linear`` weights whose module name matches ``target_modules``."""
    from transformers.trainer_utils import check_target_module_exists

    if target_modules is None:
        raise ValueError(
            f"optim={optim!r} needs `optim_target_modules` (e.g. ['attn', 'mlp'], a regex, or "
            f"'all-linear') to choose the weights GaLore projects"
        )
    if not isinstance(target_modules, (list, tuple, str)):
        raise TypeError(
            f"optim_target_modules must be a list of names, a regex string or 'all-linear'; got {target_modules!r}"
        )
    all_linear = isinstance(target_modules, str) and target_modules.replace("_", "-") == "all-linear"
    targets = list(target_modules) if isinstance(target_modules, tuple) else target_modules
    ids: set[int] = set()
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        if not all_linear and not check_target_module_exists(targets, name):
            continue
        w = module.weight
        if w.requires_grad and w.dim() == 2:
            ids.add(id(w))
    if not ids:
        linear = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)][:8]
        raise ValueError(
            f"optim_target_modules={target_modules!r} matched no trainable nn.Linear weight for "
            f"optim={optim!r}; some nn.Linear modules of this model: {linear}"
        )
    return ids


def build_param_groups(
    model: nn.Module, args: Any, galore_ids: set[int] | None = None, galore_options: dict[str, Any] | None = None
) -> list[dict[str, Any]]:
    """The param groups described in the module docstring; each group has a ``"name"`` key; empty groups dropped."""
    lr = float(args.learning_rate)
    wd = float(getattr(args, "weight_decay", 0.0))
    emb_lr = getattr(args, "embedding_learning_rate", None)
    emb_ids = _embedding_param_ids(model)
    nd_ids = _no_decay_param_ids(model)
    galore_ids = galore_ids or set()
    plain = {"rank": None} if galore_options is not None else {}
    groups: dict[str, dict[str, Any]] = {
        "galore": {"params": [], "weight_decay": wd, "lr": lr, **(galore_options or {})},
        "decay": {"params": [], "weight_decay": wd, "lr": lr, **plain},
        "no_decay": {"params": [], "weight_decay": 0.0, "lr": lr, **plain},
        "embedding": {"params": [], "weight_decay": wd, "lr": float(emb_lr) if emb_lr is not None else lr, **plain},
    }
    seen: set[int] = set()
    for _, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        if id(p) in emb_ids:
            key = "embedding" if p.dim() >= 2 else "no_decay"
        elif id(p) in nd_ids:
            key = "no_decay"
        elif id(p) in galore_ids:
            key = "galore"
        else:
            key = "decay"
        groups[key]["params"].append(p)
    if not seen:
        raise ValueError("the model has no parameter with requires_grad=True: nothing to optimize")
    if emb_lr is not None and not groups["embedding"]["params"]:
        warn_once("fastft: embedding_learning_rate is set but no trained embedding / lm_head was found", key="emb-lr-unused")
    return [{"name": k, **g} for k, g in groups.items() if g["params"]]


# ----------------------------------------------------------------------------------------------------------------------
# Factory
# ----------------------------------------------------------------------------------------------------------------------


def _galore_kwargs(cls: type, optim: str, args: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    raw = parse_optim_args(getattr(args, "optim_args", None))
    allowed = {**_GALORE_ARG_TYPES, **_EXTRA_ARG_TYPES[cls]}
    unknown = sorted(set(raw) - set(allowed))
    if unknown:
        raise ValueError(f"optim_args keys {unknown} are not understood by {optim!r}; accepted: {sorted(allowed)}")
    parsed = {k: allowed[k](v) for k, v in raw.items()}
    galore = {k: parsed.pop(k, default) for k, default in GALORE_DEFAULTS.items()}
    if galore["proj_type"] not in PROJ_TYPES:
        raise ValueError(f"optim_args proj_type must be one of {PROJ_TYPES}, got {galore['proj_type']!r}")
    if galore["svd"] not in SVD_METHODS:
        raise ValueError(f"optim_args svd must be one of {SVD_METHODS}, got {galore['svd']!r}")
    base = {"lr": float(args.learning_rate)}
    if cls is not GaLoreAdafactor:
        base.update(betas=(float(args.adam_beta1), float(args.adam_beta2)), eps=float(args.adam_epsilon))
    base.update(parsed)
    return galore, base


def _check_layerwise(optim: str, args: Any) -> None:
    gas = int(getattr(args, "gradient_accumulation_steps", 1) or 1)
    if gas != 1:
        raise ValueError(
            f"optim={optim!r} steps each parameter inside backward, so it cannot accumulate gradients "
            f"over micro-batches; got gradient_accumulation_steps={gas}. Use 1 (raise the batch size), "
            f"or the non-layerwise {optim.removesuffix('_layerwise')!r}."
        )
    world = int(getattr(args, "world_size", 1) or 1)
    if world > 1:
        raise ValueError(
            f"optim={optim!r} is not supported under DDP/FSDP (world_size={world}): the hooks "
            f"would step before gradients are all-reduced. Use the non-layerwise variant."
        )
    if getattr(args, "fp16", False):
        raise ValueError(
            f"optim={optim!r} cannot run with fp16 loss scaling (the step would use scaled, "
            f"unchecked gradients); use bf16 or fp32"
        )
    if float(getattr(args, "max_grad_norm", 0.0) or 0.0) > 0:
        warn_once(
            f"fastft: optim={optim!r} steps before the Trainer's gradient clipping; max_grad_norm is ignored",
            key="layerwise-clip",
        )


def create_optimizer(model: nn.Module, args: Any) -> torch.optim.Optimizer:
    """Build the optimizer ``args.optim`` names, over fastft's param groups, for ``model``'s trainable params.

    GaLore names ("galore_adamw", "galore_adamw_8bit", "galore_adafactor", each also "_layerwise") build fastft's own
    optimizers; every other name transformers knows ("adamw_torch", "adamw_8bit", "paged_adamw_8bit", "adafactor", ...)
    builds the class ``Trainer.get_optimizer_cls_and_kwargs`` picks, over our groups. Layer-wise variants return an
    optimizer whose ``step()`` is a no-op (hooks step during backward) and whose groups still drive the LR scheduler.
    """
    optim = _optim_name(args)
    choices = known_optimizers()
    if optim not in choices:
        raise ValueError(f"unknown optim {optim!r}; choose one of: {', '.join(choices)}")

    if optim in GALORE_OPTIMIZERS:
        cls = GALORE_OPTIMIZERS[optim]
        layerwise = optim.endswith("_layerwise")
        if layerwise:
            _check_layerwise(optim, args)
        galore, base = _galore_kwargs(cls, optim, args)
        target_ids = galore_target_param_ids(model, getattr(args, "optim_target_modules", None), optim)
        groups = build_param_groups(model, args, target_ids, galore)
        embedding_bits = base.pop("embedding_bits", 32)
        if embedding_bits not in (8, 32):
            raise ValueError(f"optim_args embedding_bits must be 8 or 32, got {embedding_bits}")
        if cls is GaLoreAdamW8bit:
            # 32-bit state for embeddings / lm_head: bitsandbytes' stability advice (transformers applies it to
            # nn.Embedding for its 8-bit optimizers); "embedding_bits=8" in optim_args trades it for memory.
            for g in groups:
                if g["name"] == "embedding":
                    g["optim_bits"] = embedding_bits
        if not any(g["name"] == "galore" for g in groups):
            raise ValueError(
                f"optim_target_modules={args.optim_target_modules!r} matched only embedding weights; "
                f"GaLore has nothing to project"
            )
        opt = cls(groups, layerwise=layerwise, **base)
        n_gal = sum(len(g["params"]) for g in groups if g["name"] == "galore")
        info_once(
            f"fastft: {cls.__name__} (layerwise={layerwise}) on {n_gal} projected weights, rank "
            f"{galore['rank']}, gap {galore['update_proj_gap']}, proj {galore['proj_type']}",
            key=f"opt-{optim}",
        )
        return opt

    from transformers import Trainer
    from transformers.trainer_optimizer import is_optimizer_factory

    groups = build_param_groups(model, args)
    cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args, model)
    kwargs = dict(kwargs)
    if is_optimizer_factory(cls) or "optimizer_dict" in kwargs or "params" in kwargs or "model" in kwargs:
        # Optimizers that build their own param split (Muon/Dion factories, LOMO, APOLLO, ...): theirs wins.
        raise ValueError(
            f"optim={optim!r} builds its own parameter groups in transformers; use the stock Trainer "
            f"create_optimizer for it (fastft.create_optimizer handles the adam/adafactor/bnb family "
            f"and GaLore)"
        )
    if kwargs.get("is_paged") and not torch.cuda.is_available():
        warn_once(
            f"fastft: {optim} needs CUDA paged memory; no CUDA device, so using the non-paged optimizer", key="paged-cpu"
        )
        kwargs["is_paged"] = False
    opt = cls(groups, **kwargs)
    if "bitsandbytes" in str(cls) and kwargs.get("optim_bits") == 8:
        # Keep embeddings in 32-bit state: 8-bit state on embeddings is a known source of instability (bnb's advice,
        # and what transformers' create_optimizer does).
        import bitsandbytes

        manager = bitsandbytes.optim.GlobalOptimManager.get_instance()
        for module in model.modules():
            if isinstance(module, nn.Embedding) and module.weight.requires_grad:
                manager.register_module_override(module, "weight", {"optim_bits": 32})
    info_once(
        f"fastft: {cls.__name__} for optim={optim!r} over groups {[(g['name'], len(g['params'])) for g in groups]}",
        key=f"opt-{optim}",
    )
    return opt
