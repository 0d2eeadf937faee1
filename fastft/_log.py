"""One logger for the package, warn-once helpers so a notebook is not flooded by a message per layer, and the
record of what fastft said, which the start-of-training summary (:mod:`fastft.patches.trl_summary`) lists again in one block.

``FASTFT_LOG`` (``debug``, ``info``, ``warning``, ``error``) sets the level of the ``fastft`` logger and sends its
records to stderr: ``FASTFT_LOG=debug`` logs the path (triton or torch) of every fused call, ``info`` every fallback
and choice as it happens. Unset, fastft leaves logging to the application (warnings still show, as Python warnings).
"""

from __future__ import annotations

import itertools
import logging
import os
import sys
import warnings

logger = logging.getLogger("fastft")

LEVELS = ("debug", "info", "warning", "error")

_already_said: set[str] = set()

#: message -> sequence number of its latest occurrence (said or not), newest last; bounded, oldest dropped first.
_notes: dict[str, int] = {}
_NOTES_KEPT = 500
_sequence = itertools.count()


def configure_from_env(value: str | None = None) -> str | None:
    """Apply ``FASTFT_LOG`` (or ``value``); returns the level set, or None when unset. An unknown value is said
    once, with the accepted ones, and ignored (a typo in an env var must not stop a training run)."""
    value = os.environ.get("FASTFT_LOG") if value is None else value
    if not value:
        return None
    level = value.strip().lower()
    if level not in LEVELS:
        warnings.warn(f"FASTFT_LOG={value!r} is not a level; use one of {', '.join(LEVELS)}", UserWarning, stacklevel=2)
        return None
    logger.setLevel(level.upper())
    if not any(getattr(h, "_fastft_env", False) for h in logger.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        handler._fastft_env = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
    return level


def _record(message: str) -> None:
    _notes.pop(message, None)
    _notes[message] = next(_sequence)
    if len(_notes) > _NOTES_KEPT:
        del _notes[next(iter(_notes))]


def _first_time(message: str, key: str | None) -> bool:
    """Record ``message`` for the summary (every time it is asked for) and say whether its key is new."""
    _record(message)
    key = key or message
    if key in _already_said:
        return False
    _already_said.add(key)
    return True


def mark() -> int:
    """A point in the record: :func:`notes_since` of it lists what was said (or would have been) after it."""
    return next(_sequence)


def notes_since(point: int) -> list[str]:
    """Every message warn_once / info_once was asked to say after ``point``, once each, oldest first; a message
    said before is listed again when it recurred (a second model in a notebook gets its own list)."""
    return [message for message, seq in _notes.items() if seq > point]


def warn_once(message: str, *, key: str | None = None, category: type[Warning] = UserWarning) -> None:
    """Emit ``message`` as a Python warning (visible in notebooks) and a log record, once per ``key``."""
    if _first_time(message, key):
        logger.warning(message)
        warnings.warn(message, category, stacklevel=3)


def info_once(message: str, *, key: str | None = None) -> None:
    """Log ``message`` at INFO level once per ``key`` (and keep it for the start-of-training summary)."""
    if _first_time(message, key):
        logger.info(message)


def reset_once() -> None:
    """Forget which messages were said (tests use this to observe a warning again)."""
    _already_said.clear()


configure_from_env()
