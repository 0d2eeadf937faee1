"""Memory accounting: a live-bytes tracker for real (or fake/meta) tensors, the meta-tensor step model
(``fastft.memory.step_model``) and ``fastft plan`` (``fastft.memory.plan``), imported on demand (they import
transformers)."""

from fastft.memory.tracker import LiveBytesTracker

__all__ = ["LiveBytesTracker"]
