"""Memory-lean optimizers: ``create_optimizer(model, args)`` and fastft's GaLore (AdamW, 8-bit AdamW, Adafactor)."""

from fastft.optim.factory import (
    GALORE_OPTIMIZERS,
    EmbeddingLRMixin,
    build_param_groups,
    create_optimizer,
    galore_target_param_ids,
    known_optimizers,
    parse_optim_args,
)
from fastft.optim.galore import GaLoreAdafactor, GaLoreAdamW, GaLoreAdamW8bit, GaLoreProjector, orthogonal_basis

__all__ = [
    "GALORE_OPTIMIZERS",
    "EmbeddingLRMixin",
    "GaLoreAdafactor",
    "GaLoreAdamW",
    "GaLoreAdamW8bit",
    "GaLoreProjector",
    "build_param_groups",
    "create_optimizer",
    "galore_target_param_ids",
    "known_optimizers",
    "orthogonal_basis",
    "parse_optim_args",
]
