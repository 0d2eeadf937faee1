"""`fastft plan` knows every row of the architecture table: each tiny row is modeled patched (not as an unpatched
model), its patch report on the meta model names every piece the row patches, and the step runs."""

import pytest

from fastft.memory.plan import unpatched_reason
from fastft.memory.step_model import StepModel, StepSpec
from fastft.offline import tiny_config
from fastft.patches.architectures import ARCHITECTURES


@pytest.mark.parametrize("model_type", sorted(ARCHITECTURES))
def test_every_row_is_modeled_patched(model_type):
    config = tiny_config(model_type)
    assert unpatched_reason(config) is None
    model = StepModel(config, StepSpec(variant="fastft", load_in_4bit=True, lora_r=4))
    report = next(note for note in model.notes if note.startswith("patch_model: applied"))
    assert "fused_loss" in report and "failed" not in " ".join(model.notes), model.notes
    unfused = {piece for piece, _ in ARCHITECTURES[model_type].unfused}
    for piece in {"rope", "rms_norm"} - unfused:
        assert f"'{piece}" in report, report
    assert model.step(32).peak_bytes > 0
