"""fastft: faster, leaner fine-tuning for Hugging Face TRL.

Public API: ``FastModel``, ``PatchFastRL``, ``unpatch``. Importing fastft changes nothing; patches are applied only by
those calls, and ``unpatch()`` reverts them all.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"


def unpatch() -> int:
    """Restore every class, function and module attribute fastft changed; returns how many patches were reverted."""
    from fastft.patches.base import revert_all

    return revert_all()


def __getattr__(name: str) -> Any:
    # Lazy so `import fastft` stays cheap and has no side effects on transformers/trl.
    if name == "FastModel":
        from fastft.model import FastModel

        return FastModel
    if name == "PatchFastRL":
        from fastft.patches.trl import PatchFastRL

        return PatchFastRL
    raise AttributeError(f"module 'fastft' has no attribute {name!r}")


__all__ = ["FastModel", "PatchFastRL", "unpatch", "__version__"]
