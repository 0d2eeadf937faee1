"""GGUF export, measured: relative logit error (max |diff| / max |logit|) of each exported row and quantization, read
back by transformers' GGUF loader, vs the merged fp32 model. Tiny offline models (hidden 64, 2 layers), one prompt;
the same computation as tests/export/test_gguf_roundtrip.py. Run from the repository root:
    PYTHONPATH=. python benchmarks/bench_gguf_roundtrip.py
"""

import tempfile

import torch

from fastft.export import save_gguf
from fastft.offline import build_tiny_model, build_tokenizer
from tests.export.gguf_reader import read_back, relative_logit_error

ROWS = ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3", "qwen3_moe"]
QUANTS = ["f32", "f16", "bf16", "q8_0"]
OVERRIDES = {"qwen3_moe": {"mlp_only_layers": []}}


def main() -> None:
    tok = build_tokenizer()
    ids = torch.tensor([tok("The quick brown fox: what is 12 plus 7? The answer is 19.")["input_ids"]])
    print("relative logit error, transformers' GGUF reader vs the merged fp32 model (measured, CPU)")
    print("| row | " + " | ".join(QUANTS) + " |\n|---|" + "---|" * len(QUANTS))
    for model_type in ROWS:
        model = build_tiny_model(model_type, **OVERRIDES.get(model_type, {}))
        errors = []
        for quant in QUANTS:
            with tempfile.TemporaryDirectory() as directory:
                path = save_gguf(model, directory, tok, quant)
                with torch.no_grad():
                    errors.append(relative_logit_error(model(ids).logits, read_back(model_type, path)(ids).logits))
        print(
            f"| {model_type} | "
            + " | ".join(f"{e:.1e}" if q == "f32" else f"{100 * e:.2f}%" for q, e in zip(QUANTS, errors))
            + " |",
            flush=True,
        )


if __name__ == "__main__":
    main()
