"""One logger for the package, and warn-once helpers so a notebook is not flooded by a message per layer."""

from __future__ import annotations

import logging
import warnings

logger = logging.getLogger("fastft")

_already_said: set[str] = set()


def warn_once(message: str, *, key: str | None = None, category: type[Warning] = UserWarning) -> None:
    """Emit ``message`` as a Python warning (visible in notebooks) and a log record, once per ``key``."""
    key = key or message
    if key in _already_said:
        return
    _already_said.add(key)
    logger.warning(message)
    warnings.warn(message, category, stacklevel=3)


def info_once(message: str, *, key: str | None = None) -> None:
    """Log ``message`` at INFO level once per ``key``."""
    key = key or message
    if key in _already_said:
        return
    _already_said.add(key)
    logger.info(message)


def reset_once() -> None:
    """Forget which messages were said (tests use this to observe a warning again)."""
    _already_said.clear()
