"""Every notebook in notebooks/ runs end to end with its parameters overridden to the tiny offline model.

Parameters are injected the way papermill does it: a cell tagged ``injected-parameters`` right after the cell tagged
``parameters``. The kernel takes the ops' torch path (TRITON_INTERPRET=0, one thread) to stay within the suite's time
budget; the notebooks' defaults (hub models, T4 settings) are checked to be what users run.
"""

from __future__ import annotations

import glob
import os

import nbformat
import pytest

NOTEBOOKS = sorted(glob.glob(os.path.join(os.path.dirname(__file__), "..", "..", "notebooks", "*.ipynb")))
TINY = {
    "model_name": "tiny:llama",
    "dataset_name": "builtin:arithmetic",
    "max_samples": 16,
    "max_steps": 2,
    "max_seq_length": 64,
    "load_in_4bit": False,
}


def test_there_are_three_notebooks():
    assert {os.path.basename(p) for p in NOTEBOOKS} == {"sft_qlora_t4.ipynb", "grpo_t4.ipynb", "dpo_t4.ipynb"}


def _inject(book, params: dict) -> None:
    index = next(i for i, c in enumerate(book.cells) if "parameters" in c.metadata.get("tags", []))
    source = "\n".join(f"{k} = {v!r}" for k, v in params.items())
    cell = nbformat.v4.new_code_cell(source)
    cell.metadata["tags"] = ["injected-parameters"]
    book.cells.insert(index + 1, cell)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_notebook_runs_on_tiny_model(path, tmp_path, monkeypatch):
    from nbclient import NotebookClient

    book = nbformat.read(path, as_version=4)
    params = next(c for c in book.cells if "parameters" in c.metadata.get("tags", []))
    assert "Qwen/" in params.source or "meta-llama/" in params.source  # written for real users on a T4
    extra = {"num_generations": 4, "max_completion_length": 6} if "grpo" in path else {}
    _inject(book, {**TINY, **extra, "output_dir": str(tmp_path / "out")})
    for key, value in {
        "TRITON_INTERPRET": "0",
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
    }.items():
        monkeypatch.setenv(key, value)
    NotebookClient(book, timeout=240, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = "".join(o.get("text", "") for c in book.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "with fastft hooks: True" in outputs  # TRL's trainer ran with fastft's hooks (printed by the notebook)
    assert os.path.isfile(tmp_path / "out" / "lora" / "adapter_model.safetensors")
