"""``fastft doctor``: versions vs the tested ranges, the host, every row's patches, the trainers; exit status."""

from __future__ import annotations

import json

import pytest
import transformers.models.llama.modeling_llama as llama

import fastft
from fastft.cli import main
from fastft.patches.architectures import ARCHITECTURES
from fastft.versions import TRACKED


@pytest.fixture(autouse=True)
def _fresh():
    fastft.unpatch()
    yield
    fastft.unpatch()


def _doctor(capsys, *args):
    code = main(["doctor", *args])
    return code, capsys.readouterr()


def test_doctor_reports_every_row_patched_and_exits_zero(capsys):
    code, out = _doctor(capsys, "--json")
    result = json.loads(out.out)
    assert code == 0 and result["failures"] == [], result["failures"]
    assert [row["package"] for row in result["versions"]] == list(TRACKED)
    assert all(row["installed"] and row["tested"] for row in result["versions"] if row["package"] != "triton")
    rows = {row["model_type"]: row for row in result["architectures"]}
    assert set(rows) == set(ARCHITECTURES)
    for row in rows.values():
        # every piece, but those the row marks as not fusable identically (reported apart, not a failure)
        by_design = set(row["unfused_by_design"])
        assert by_design == {piece for piece, _ in ARCHITECTURES[row["model_type"]].unfused}, row
        arch = ARCHITECTURES[row["model_type"]]
        # MoE rows: the experts too; the dense MLP only where the tiny model has dense layers (qwen3_moe)
        pieces = {"rope", "rms_norm", "mlp", "fused_loss"} | ({"experts"} if arch.experts_class else set())
        if arch.experts_class and row["model_type"] != "qwen3_moe":
            pieces.discard("mlp")
        assert {name.split(":")[0] for name in row["applied"]} == pieces - by_design and not row["skipped"], row
    from fastft.patches.trl import SUPPORTED_ALGORITHMS

    # every row of PatchFastRL's table (SFT, DPO, GRPO, KTO, RLOO), each patched on the installed TRL
    assert [row["trainer"] for row in result["trainers"]] == [f"{name}Trainer" for name in SUPPORTED_ALGORITHMS]
    assert {"SFTTrainer", "DPOTrainer", "GRPOTrainer"} <= {row["trainer"] for row in result["trainers"]}
    assert all(row["patched"] for row in result["trainers"])
    # the host check compares bitsandbytes' native CPU dequantization with fastft's on this very machine
    assert result["host"]["bitsandbytes_cpu_dequantize_4bit"].split()[0] in ("correct", "WRONG")
    assert fastft.patches.base.applied_patches() == []  # the doctor leaves nothing patched behind


def test_doctor_fails_when_a_contract_fails(capsys, monkeypatch):
    def changed(self, x):  # an MLP that is no longer down(act(gate(x)) * up(x))
        return self.down_proj(self.act_fn(self.up_proj(x)) * self.gate_proj(x))

    monkeypatch.setattr(llama.LlamaMLP, "forward", changed)
    code, out = _doctor(capsys)
    assert code == 1
    assert "llama: mlp left unpatched (LlamaMLP: probe mismatch" in out.out, out.out
    assert "mistral    patched: rope, rms_norm, mlp:swiglu, fused_loss" in out.out


def test_doctor_on_a_model_directory(tmp_path, capsys):
    from fastft.offline import save_tiny_model

    save_tiny_model(str(tmp_path / "qwen"), "qwen2")
    code, out = _doctor(capsys, "--model", str(tmp_path / "qwen"), "--json")
    rows = json.loads(out.out)["architectures"]
    assert code == 0 and [r["model_type"] for r in rows] == ["qwen2"] and rows[0]["skipped"] == {}


def test_doctor_on_an_architecture_outside_the_table_and_on_bad_input(tmp_path, capsys):
    from transformers import GPT2Config

    GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64).save_pretrained(str(tmp_path / "gpt2"))
    code, out = _doctor(capsys, "--model", str(tmp_path / "gpt2"))
    assert code == 1 and "gpt2: not in the architecture table" in out.out, out.out
    code, out = _doctor(capsys, "--model", str(tmp_path / "nope"))
    assert code == 2 and "not a model directory" in out.err
