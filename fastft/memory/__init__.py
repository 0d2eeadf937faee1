"""Memory accounting: a live-bytes tracker for real (or fake/meta) tensors."""

from fastft.memory.tracker import LiveBytesTracker

__all__ = ["LiveBytesTracker"]
