"""Fixtures for the ``fastft train`` / demo / notebook tests.

End-to-end runs take the ops' torch path (``force_path("torch")``) except where a test says otherwise: the kernels'
numerics are proven under the interpreter in tests/kernels, and an interpreted training step costs seconds, which
would put this directory far over its time budget. ``test_sft_run_triton_interpreter`` runs one short SFT through the
Triton kernels (interpreter) to show the training path really dispatches to them.
"""

from __future__ import annotations

import os

import pytest

EXAMPLES = os.path.join(os.path.dirname(__file__), "..", "..", "examples")


@pytest.fixture
def torch_path():
    from fastft.kernels import force_path

    with force_path("torch"):
        yield


@pytest.fixture(autouse=True)
def _unpatch_after():
    """PatchFastRL/FastModel patch TRL classes and transformers functions process-wide; restore them after a test."""
    yield
    import fastft

    fastft.unpatch()


def example(name: str) -> str:
    return os.path.abspath(os.path.join(EXAMPLES, name))
