"""Atomic file writes: a failed export leaves no half-written file under the final name.

Each file is written to a hidden temporary name in the same directory (so the final ``os.replace`` is a rename on
one filesystem, atomic on POSIX and Windows) and renamed only once complete; on any error the temporary is removed.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator


@contextlib.contextmanager
def atomic_path(final_path: str) -> Iterator[str]:
    """Yield a temporary path beside ``final_path``; rename it to ``final_path`` when the block finishes cleanly."""
    directory, name = os.path.split(os.path.abspath(final_path))
    temp = os.path.join(directory, f".{name}.{uuid.uuid4().hex[:8]}.partial")
    try:
        yield temp
        os.replace(temp, final_path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(temp)


def write_text_atomic(final_path: str, text: str) -> str:
    with atomic_path(final_path) as temp, open(temp, "w", encoding="utf-8") as fh:
        fh.write(text)
    return final_path
