"""Peak live bytes of one GRPO training step, TRL 1.16's GRPOTrainer vs fastft's (PatchFastRL), on the CPU torch path.

What is measured: ``fastft.memory.LiveBytesTracker`` around ``trainer.train()`` with ``max_steps=1`` -- scoring the
completions, the loss forward and backward, the optimizer step. Tensors that exist before (the model weights) are not
counted, so the figure is what the step itself allocates: activations, LM-head temporaries, LoRA grads and optimizer
state. Generation is replaced by fixed completions of exactly ``--completion-length`` tokens (TRL's own seam,
``GRPOTrainer._generate_single_turn``), so both runs score identical batches and no sampling cost is mixed in.

Model: a randomly initialized, tiny-but-wide Llama (hidden 1024, 2 layers, vocab 32,000), fp32, LoRA r=8 on the
attention and MLP projections; num_generations=4, per-device batch 4, TRL's GRPOConfig defaults otherwise (beta=0:
no reference pass). Runs on CPU without TRITON_INTERPRET, so fastft's kernels take their torch path (which keeps the
chunked algorithm); these are CPU measurements of live tensor bytes, not GPU timings.

Caveat for reading the ratio: on CPU, TRL 1.16's fused head takes its torch fallback, which projects *every* position
(prompt and padding too) through ``[tokens, 32768]`` fp32 tiles plus several same-sized temporaries. On CUDA, TRL
scores only the completion tokens with Triton folds. The second row emulates that token selection on CPU (TRL's torch
folds still allocate a few tile-sized temporaries that its Triton folds do not), as a closer stand-in for TRL on GPU.

    python benchmarks/bench_grpo_memory.py
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch

import fastft
from fastft.memory import LiveBytesTracker
from fastft.offline import build_tiny_model, build_tokenizer
from fastft.patches.trl import patched_algorithm


def fixed_generations(length: int):
    def generate(self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
        return [
            [(31 * sum(ids) + 7 * row + 3 * i) % 300 + 20 for i in range(length)] for row, ids in enumerate(prompt_ids)
        ], None

    return generate


def measure(mode: str, args: argparse.Namespace) -> tuple[int, list[float], list[float]]:
    """mode: "trl" (TRL as it runs on CPU), "trl-compact" (TRL scoring only completion tokens, as it does on CUDA,
    with its torch folds), "fastft" (PatchFastRL). Returns peak live bytes, step losses, grad norms."""
    import trl.trainer.grpo_trainer as grpo_module
    import trl.trainer.utils as trl_utils
    from datasets import Dataset
    from peft import LoraConfig

    patched = mode == "fastft"
    fastft.unpatch()
    if patched:
        assert fastft.PatchFastRL("GRPO") == {"GRPO": True}
    import trl

    original_generate = grpo_module.GRPOTrainer._generate_single_turn
    original_use_triton = trl_utils._use_triton
    grpo_module.GRPOTrainer._generate_single_turn = fixed_generations(args.completion_length)
    if mode == "trl-compact":
        # `add_fused_lm_head` keeps only the labelled positions when this says "Triton device"; the folds themselves
        # check their own module's copy, so they stay on torch.
        trl_utils._use_triton = lambda device: True
    try:
        model = build_tiny_model(
            "llama",
            vocab_size=args.vocab,
            hidden_size=args.hidden,
            intermediate_size=args.intermediate,
            num_hidden_layers=args.layers,
            num_attention_heads=args.hidden // 64,
            num_key_value_heads=args.hidden // 128,
            head_dim=64,
            max_position_embeddings=1024,
        )
        tokenizer = build_tokenizer()
        torch.manual_seed(0)
        with tempfile.TemporaryDirectory() as out:
            config = trl.GRPOConfig(
                output_dir=out,
                use_cpu=True,
                report_to="none",
                bf16=False,
                max_steps=1,
                logging_steps=1,
                per_device_train_batch_size=args.generations,
                num_generations=args.generations,
                max_completion_length=args.completion_length,
                save_strategy="no",
                disable_tqdm=True,
                seed=0,
            )
            trainer = trl.GRPOTrainer(
                model=model,
                reward_funcs=lambda completions, **kw: [float(len(c) % 7) for c in completions],
                args=config,
                processing_class=tokenizer,
                train_dataset=Dataset.from_list([{"prompt": "What is 12 plus 7?"}, {"prompt": "Count:"}] * 4),
                peft_config=LoraConfig(
                    r=8,
                    lora_alpha=16,
                    target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                ),
            )
            assert patched_algorithm(trainer) == ("GRPO" if patched else None)
            tracker = LiveBytesTracker()
            with tracker:
                trainer.train()
            rows = [row for row in trainer.state.log_history if "loss" in row]
        return tracker.peak_bytes, [r["loss"] for r in rows], [r["grad_norm"] for r in rows]
    finally:
        grpo_module.GRPOTrainer._generate_single_turn = original_generate
        trl_utils._use_triton = original_use_triton
        fastft.unpatch()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--intermediate", type=int, default=2816)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--generations", type=int, default=4)
    parser.add_argument("--completion-length", type=int, default=128)
    args = parser.parse_args()
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("run without TRITON_INTERPRET=1: this measures the CPU torch path")
    torch.set_num_threads(1)

    names = {"trl": "TRL 1.16 (CPU path)", "trl-compact": "TRL 1.16 (CUDA token sel.)", "fastft": "fastft PatchFastRL"}
    rows = []
    for mode in names:
        peak, losses, grad_norms = measure(mode, args)
        rows.append((names[mode], peak, losses, grad_norms))
    base = rows[0][1]
    print(
        f"command: python benchmarks/bench_grpo_memory.py --hidden {args.hidden} --intermediate "
        f"{args.intermediate} --layers {args.layers} --vocab {args.vocab} --generations {args.generations} "
        f"--completion-length {args.completion_length}"
    )
    print("CPU, fp32, torch path; peak live tensor bytes of one GRPO training step (weights excluded)")
    print(f"{'trainer':<27} {'peak MiB':>9} {'vs TRL CPU':>11} {'vs TRL CUDA-sel.':>17}  step loss / grad norm")
    for name, peak, losses, grad_norms in rows:
        print(
            f"{name:<27} {peak / 2**20:>9.1f} {peak / base:>11.1%} {peak / rows[1][1]:>17.1%}  "
            f"{losses[0]:.3e} / {grad_norms[0]:.6f}"
        )


if __name__ == "__main__":
    main()
