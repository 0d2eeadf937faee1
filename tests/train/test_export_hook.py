"""``export: {gguf: ...}`` in a ``fastft train`` config: checked with the rest of the config (fastft.export's own
check, and llama.cpp's presence for k-quants), written after the run ends."""

from __future__ import annotations

import os
import sys

import pytest

from fastft.train.config import ConfigError, load_config, validate
from fastft.train.run import run
from tests.train.conftest import example


def _raw(export):
    return {
        "model": {"name": "tiny:llama"},
        "data": {"path": "builtin:arithmetic"},
        "trainer": {"type": "sft", "max_steps": 1},
        "output_dir": "/tmp/unused",
        "export": export,
    }


def _errors(raw) -> list[str]:
    with pytest.raises(ConfigError) as info:
        validate(raw)
    return info.value.errors


def test_export_section_is_checked_before_training(monkeypatch):
    assert validate(_raw({"gguf": "Q8_0"})).export == {"gguf": "q8_0"}
    assert validate(_raw(None)).export == {}
    # the wording is fastft.export's; here: the dotted key, and the suggestion or the accepted key
    unknown = _errors(_raw({"gguf": "q8_1"}))
    assert len(unknown) == 1 and unknown[0].startswith("export.gguf: ") and "'q8_0'" in unknown[0], unknown
    misspelt = _errors(_raw({"ggfu": "q8_0"}))
    assert len(misspelt) == 1 and misspelt[0].startswith("export: ") and "'gguf'" in misspelt[0], misspelt
    assert _errors(_raw("q8_0")) == ["export: expected dict or null, got str 'q8_0'"]
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # as if fastft[gguf]'s llama-cpp-python were missing
    missing = _errors(_raw({"gguf": "q4_k_m"}))
    assert len(missing) == 1 and missing[0].startswith("export.gguf: ") and "fastft[gguf]" in missing[0], missing


@pytest.mark.usefixtures("torch_path")
def test_sft_run_writes_the_gguf_file(tmp_path):
    cfg = load_config(example("sft_tiny.yaml"), [f"output_dir={tmp_path}", "trainer.max_steps=1", "export={gguf: f16}"])
    result = run(cfg, quiet=True)
    assert len(result.exported) == 1 and result.exported[0].startswith(os.path.join(str(tmp_path), "gguf"))
    with open(result.exported[0], "rb") as fh:
        assert fh.read(4) == b"GGUF"
    assert result.exported[0] in open(result.report_path, encoding="utf-8").read()
