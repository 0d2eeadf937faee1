"""`fastft plan` knows every row of the architecture table: each tiny row is modeled patched (not as an unpatched
model), its patch report on the meta model names every piece the row patches, and the step runs; every shipped
config is a table row, and the newer rows' shipped configs (gpt-oss, Granite 3.3, Gemma 3 text) plan patched."""

import pytest

from fastft.memory.model_configs import known_models, load_config, unpatched_reason
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


@pytest.mark.parametrize("name", known_models())
def test_every_shipped_config_is_a_table_row(name):
    """No shipped config is modeled as an unpatched model."""
    config = load_config(name)
    assert unpatched_reason(config) is None, (name, config.model_type)


#: Shipped configs of newer rows -> the pieces their plan must show patched (the row's unfused pieces aside).
NEW_ROW_CONFIGS = {
    "gpt-oss-20b": {"experts", "fused_loss"},
    "granite-3.3-8b-instruct": {"rope", "rms_norm", "mlp", "fused_loss"},
    "gemma-3-1b-it": {"rope", "rms_norm", "mlp", "fused_loss"},
}


@pytest.mark.parametrize("name", sorted(NEW_ROW_CONFIGS))
def test_shipped_configs_of_newer_rows_plan_patched(name):
    model = StepModel(load_config(name), StepSpec(variant="fastft", load_in_4bit=True, lora_r=4))
    report = next(note for note in model.notes if note.startswith("patch_model: applied"))
    for piece in NEW_ROW_CONFIGS[name]:
        assert f"'{piece}" in report, report
    assert model.step(64).peak_bytes > 0
