"""A failed RMSNorm or MLP probe leaves that piece unpatched through ``Patch._skip``, as a failed RoPE contract does:
one warning, the piece listed in ``skipped_patches()`` with its reason and in the model's PatchReport."""

from __future__ import annotations

import pytest

import fastft
from fastft.offline import build_tiny_model
from fastft.patches import patcher
from fastft.patches.base import skipped_patches


@pytest.mark.parametrize(
    "piece, contract, name", [("rms_norm", "_norm_contract", "llama RMSNorm"), ("mlp", "_mlp_contract", "llama MLP")]
)
def test_a_failed_probe_is_a_skipped_patch_with_its_reason(piece, contract, name, monkeypatch):
    monkeypatch.setattr(patcher, contract, lambda *a, **k: "probe mismatch, max |diff| 1 (forced)")
    model = build_tiny_model("llama")
    try:
        report = patcher.patch_model(model)
        assert piece in report.skipped and "probe mismatch" in report.reasons[piece]
        assert "probe mismatch" in skipped_patches()[name]
        patched = [m for m in model.modules() if "forward" in vars(m)]
        kind = "RMSNorm" if piece == "rms_norm" else "MLP"
        assert not any(type(m).__name__.endswith(kind) for m in patched), "the piece was patched after all"
    finally:
        fastft.unpatch()
