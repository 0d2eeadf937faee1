"""``fastft train CONFIG.yaml``: one YAML file -> FastModel + LoRA + a (fast) TRL trainer + a run report.

Modules: ``config`` (schema, ``--set`` overrides, validation before anything heavy loads), ``data`` (datasets and
formats), ``rewards`` (GRPO reward functions), ``run`` (training, time budget, preemption, resume), ``report``.
"""

from fastft.train.config import ConfigError, TrainConfig, load_config, validate

__all__ = ["ConfigError", "TrainConfig", "load_config", "validate"]
