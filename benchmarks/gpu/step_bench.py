"""End-to-end LoRA / QLoRA SFT training step: fastft vs transformers + PEFT (SDPA) vs Liger, on random weights.

One process per (config, mode, implementation), so patches never leak between implementations and each starts with
an empty GPU. All three load the same checkpoint (random weights, written once by :func:`checkpoint_dir`), train
the same tokens with the same seed and the same optimizer (torch AdamW on the LoRA weights), so tokens/s, peak memory
and the per-step losses are comparable. Peak memory is ``torch.cuda.max_memory_allocated`` over the timed steps,
weights included.

    python -m benchmarks.gpu.step_bench --config 1b --mode lora --impl fastft --tokens 2048,8192 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from fastft.offline import TINY_SIZES

if TYPE_CHECKING:
    from transformers import LlamaConfig

#: Llama-shaped configs (random weights): "1b" ~ Llama-3.2-1B (tied head), "8b" ~ Llama-3.1-8B; "tiny" for --dry-run.
CONFIGS = {
    "1b": dict(
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=64,
        vocab_size=128256,
        tie_word_embeddings=True,
    ),
    "8b": dict(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        vocab_size=128256,
        tie_word_embeddings=False,
    ),
    "tiny": dict(**TINY_SIZES, vocab_size=384, tie_word_embeddings=False),  # the test fixtures' tiny model
}
MODES = ("lora", "qlora")
IMPLS = ("fastft", "baseline", "liger")
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def llama_config(config_name: str) -> LlamaConfig:
    """The ``LlamaConfig`` of ``CONFIGS[config_name]`` (Llama 3 RoPE and norm eps, the offline tokenizer's special ids):
    what the measured run loads and the modeled one (benchmarks/gpu/modeled.py) builds on meta."""
    from transformers import LlamaConfig

    return LlamaConfig(
        **CONFIGS[config_name],
        max_position_embeddings=8192,
        rms_norm_eps=1e-5,
        rope_theta=500000.0,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=4,
    )


def checkpoint_dir(config_name: str) -> Path:
    """Write (once) a random-weight bf16 checkpoint and an offline tokenizer; /dev/shm when there is one (fast)."""
    from transformers import AutoModelForCausalLM

    from fastft.offline import build_tokenizer

    root = Path("/dev/shm") if Path("/dev/shm").is_dir() and os.access("/dev/shm", os.W_OK) else Path(tempfile.gettempdir())
    path = root / f"fastft-gpu-check-{config_name}"
    if (path / "done").exists():
        return path
    config = llama_config(config_name)
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(path, safe_serialization=True)
    build_tokenizer(config.vocab_size).save_pretrained(path)
    del model
    (path / "done").write_text("ok")
    return path


def _load(impl: str, mode: str, path: Path):
    """The model as each implementation's user would build it; returns (model, what ran)."""
    qlora = mode == "qlora"
    if impl == "fastft":
        from fastft import FastModel

        model, _ = FastModel.from_pretrained(str(path), load_in_4bit=qlora, dtype=torch.bfloat16)
        model = FastModel.get_peft_model(
            model, r=16, lora_alpha=16, target_modules=LORA_TARGETS, use_gradient_checkpointing="fastft"
        )
        return model, "FastModel.from_pretrained + get_peft_model (offloaded checkpointing)"
    import peft
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    note = "transformers + PEFT, SDPA, gradient checkpointing (non-reentrant)"
    if impl == "liger":
        from liger_kernel.transformers import apply_liger_kernel_to_llama

        apply_liger_kernel_to_llama()  # this process only: one process per implementation
        note = "Liger-Kernel (apply_liger_kernel_to_llama) + " + note
    kwargs = dict(dtype=torch.bfloat16, attn_implementation="sdpa")
    if torch.cuda.is_available():
        kwargs["device_map"] = {"": 0}
    if qlora:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
    model = AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
    if qlora:
        model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    model = peft.get_peft_model(
        model, peft.LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0, target_modules=LORA_TARGETS, task_type="CAUSAL_LM")
    )
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    model.config.use_cache = False
    return model, note


def run(config_name: str, mode: str, impl: str, tokens: list[int], steps: int, warmup: int) -> dict:
    t_load = time.perf_counter()
    path = checkpoint_dir(config_name)
    model, note = _load(impl, mode, path)
    model.train()
    device = next(p.device for p in model.parameters() if p.requires_grad)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    result = {
        "config": config_name,
        "mode": mode,
        "impl": impl,
        "what_ran": note,
        "device": str(device),
        "load_seconds": round(time.perf_counter() - t_load, 1),
        "rows": [],
    }
    vocab = model.config.vocab_size if hasattr(model.config, "vocab_size") else CONFIGS[config_name]["vocab_size"]
    for n in tokens:
        ids = torch.randint(0, vocab, (1, n), generator=torch.Generator().manual_seed(n)).to(device)
        losses = []

        def step(ids=ids, losses=losses):
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))

        row = {"tokens": n}
        try:
            for _ in range(warmup):
                step()
            if device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            for _ in range(steps):
                step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            seconds = (time.perf_counter() - t0) / steps
            row.update(
                seconds_per_step=round(seconds, 4),
                tokens_per_s=round(n / seconds, 1),
                losses=losses,
                peak_gib=(round(torch.cuda.max_memory_allocated() / 2**30, 3) if device.type == "cuda" else None),
            )
        except torch.OutOfMemoryError as exc:
            row.update(error=f"out of memory: {str(exc).splitlines()[0]}")
        finally:
            if device.type == "cuda":
                torch.cuda.empty_cache()
        result["rows"].append(row)
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", choices=sorted(CONFIGS), required=True)
    ap.add_argument("--mode", choices=MODES, required=True)
    ap.add_argument("--impl", choices=IMPLS, required=True)
    ap.add_argument("--tokens", default="2048,8192", help="comma-separated sequence lengths (batch 1)")
    ap.add_argument("--steps", type=int, default=2, help="timed steps per length")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--json", required=True, help="where to write the result")
    args = ap.parse_args(argv)
    tokens = [int(t) for t in args.tokens.split(",") if t]
    try:
        result = run(args.config, args.mode, args.impl, tokens, args.steps, args.warmup)
    except Exception as exc:  # noqa: BLE001 - recorded, not hidden: the report shows which implementation could not run and why
        result = {
            "config": args.config,
            "mode": args.mode,
            "impl": args.impl,
            "error": f"{type(exc).__name__}: {str(exc)[:800]}",
            "rows": [],
        }
    Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
