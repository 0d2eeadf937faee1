"""``fastft export --adapter DIR --gguf q8_0``: a saved LoRA run exported without the training script."""

import os

import pytest
import torch

pytest.importorskip("gguf")

from fastft.cli import main
from tests.export.gguf_reader import read_back, relative_logit_error


@pytest.fixture
def saved_adapter(tmp_path):
    """A base model directory and a LoRA adapter saved from FastModel with non-zero adapters; the merged fp32
    logits of a prompt, computed before saving."""
    import fastft
    from fastft import FastModel
    from fastft.offline import save_tiny_model

    base_dir = save_tiny_model(str(tmp_path / "base"), "qwen3")
    model, tok = FastModel.from_pretrained(base_dir)
    model = FastModel.get_peft_model(model, r=4, lora_alpha=8, init_lora_weights=False)
    model.eval()
    ids = torch.tensor([tok("What is 12 plus 7? The answer is 19.")["input_ids"]])
    with torch.no_grad():
        want = model(input_ids=ids).logits
    adapter_dir = model.save_pretrained_merged(str(tmp_path / "run"), tok, save_method="lora")
    fastft.unpatch()
    return adapter_dir, ids, want


def test_export_saved_adapter(saved_adapter, capsys):
    adapter_dir, ids, want = saved_adapter
    assert main(["export", "--adapter", adapter_dir, "--gguf", "f32"]) == 0
    path = os.path.join(adapter_dir, "gguf", "model.F32.gguf")
    assert f"wrote {path}" in capsys.readouterr().out
    assert os.path.isfile(os.path.join(adapter_dir, "gguf", "Modelfile"))
    with torch.no_grad():
        err = relative_logit_error(want, read_back("qwen3", path)(ids).logits)
    assert err <= 1e-4  # merged in fp32 onto the saved base: only summation order differs


def test_export_cli_errors_before_loading(saved_adapter, tmp_path, capsys):
    adapter_dir, _, _ = saved_adapter
    assert main(["export", "--adapter", adapter_dir, "--gguf", "q5_k"]) == 2
    assert "unknown GGUF quantization 'q5_k'. Did you mean" in capsys.readouterr().err
    assert main(["export", "--adapter", str(tmp_path), "--gguf", "f16"]) == 2
    assert "is not a saved LoRA adapter (no adapter_config.json)" in capsys.readouterr().err
    assert main(["export", "--adapter", adapter_dir, "--gguf", "f16", "--base", str(tmp_path / "nowhere")]) == 2
    assert "is not a local directory; pass --base PATH" in capsys.readouterr().err
    assert not os.path.exists(os.path.join(adapter_dir, "gguf"))
