"""GGUF export, measured: relative logit error (max |diff| / max |logit|) of each exported row and quantization, read
back by transformers' GGUF loader (rows it cannot read: by gguf's tensor-name table, see tests/export/gguf_reader.py),
vs the merged fp32 model. Tiny offline models (hidden 64, 2 layers), one prompt; the same computation and fixtures as
tests/export/test_gguf_roundtrip.py. Run from the repository root:
    PYTHONPATH=. python benchmarks/bench_gguf_roundtrip.py
"""

import tempfile

import torch

from fastft.export import save_gguf
from fastft.offline import build_tokenizer
from tests.export.gguf_reader import READ_BY_NAMES, read_back, relative_logit_error
from tests.export.test_gguf_roundtrip import ROWS, build_fixture, fixture_overrides

QUANTS = ["f32", "f16", "bf16", "q8_0"]


def main() -> None:
    tok = build_tokenizer()
    ids = torch.tensor([tok("The quick brown fox: what is 12 plus 7? The answer is 19.")["input_ids"]])
    print("relative logit error, transformers' GGUF reader vs the merged fp32 model (measured, CPU)")
    print("| row | reader | " + " | ".join(QUANTS) + " |\n|---|---|" + "---|" * len(QUANTS))
    for model_type in ROWS:
        errors = []
        for quant in QUANTS:
            overrides = fixture_overrides(model_type, quant)
            model = build_fixture(model_type, overrides)
            with tempfile.TemporaryDirectory() as directory:
                path = save_gguf(model, directory, tok, quant)
                with torch.no_grad():
                    got = read_back(model_type, path, overrides)(ids).logits
                    errors.append(relative_logit_error(model(ids).logits, got))
        reader = "gguf names" if model_type in READ_BY_NAMES else "transformers"
        print(
            f"| {model_type} | {reader} | "
            + " | ".join(f"{e:.1e}" if q == "f32" else f"{100 * e:.2f}%" for q, e in zip(QUANTS, errors))
            + " |",
            flush=True,
        )


if __name__ == "__main__":
    main()
