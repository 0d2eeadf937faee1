"""Peak live bytes of one training step per TRL trainer (every PatchFastRL row), TRL vs fastft, on the CPU path.

What is measured: ``fastft.memory.LiveBytesTracker`` around ``trainer.train()`` with ``max_steps=1`` (the forward,
backward and optimizer step; for DPO/KTO the in-step reference pass; for GRPO/RLOO the scoring of fixed completions,
made at TRL's ``_generate_single_turn`` seam so no sampling is mixed in). Tensors that exist before (weights) are not
counted. Model: a random tiny-but-wide Llama (hidden --hidden, 2 layers, vocab --vocab), fp32, LoRA r=8. Runs on CPU
without TRITON_INTERPRET: fastft's kernels take their torch path (same chunked algorithm), TRL's fused head its torch
fallback, which scores every position (on CUDA TRL scores only labelled ones: see bench_grpo_memory.py for that row).
These are CPU measurements of live tensor bytes, not GPU figures.

Reward has no lean head (see ``fastft.patches.trl``): its row shows what the rest of fastft (optimizer) does to the
peak, with TRL's loss as written; it uses a sequence-classification model of the same dimensions. ORPO, CPO and
OnlineDPO run the lean head of ``fastft.patches.trl_preference``; OnlineDPO samples its completions for real
(``max_new_tokens`` = --completion-length, same seed both ways) and scores them with a length reward.

    python benchmarks/bench_trl_trainers_memory.py
"""

from __future__ import annotations

import argparse
import importlib
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
from fastft.offline import build_tiny_model, build_tokenizer, tiny_config
from fastft.patches.trl import _TRAINERS, patched_algorithm

PROMPTS = ["What is 12 plus 7?", "Name a fast animal.", "Why checkpoint?", "Count:"]
ANSWERS = [
    " The answer is 19, as anyone can check by counting.",
    " The quick brown fox jumps over the dog.",
    " It trades compute for memory in the backward pass.",
    " 0 1 2 3 4 5 6 7 8 9 10 11 12",
]


def _completions(length: int):
    def generate(self, prompt_ids, *rest, **kwargs):
        return [[(31 * sum(ids) + 7 * row + 3 * i) % 300 + 20 for i in range(length)] for row, ids in enumerate(prompt_ids)]

    return generate


def _dataset(algorithm: str, tag: str):
    from datasets import Dataset

    if algorithm == "SFT":
        rows = [{"prompt": p, "completion": a} for p, a in zip(PROMPTS, ANSWERS, strict=True)]
    elif algorithm == "Reward":
        rows = [
            {"chosen": p + a, "rejected": p + ANSWERS[i - 1]} for i, (p, a) in enumerate(zip(PROMPTS, ANSWERS, strict=True))
        ]
    elif algorithm in ("DPO", "ORPO", "CPO"):
        rows = [
            {"prompt": p, "chosen": a, "rejected": ANSWERS[i - 1]}
            for i, (p, a) in enumerate(zip(PROMPTS, ANSWERS, strict=True))
        ]
    elif algorithm == "KTO":
        rows = [
            {"prompt": p, "completion": a, "label": i % 2 == 0}
            for i, (p, a) in enumerate(zip(PROMPTS, ANSWERS, strict=True))
        ]
    else:
        rows = [{"prompt": p} for p in PROMPTS]
    # a fingerprint per run: TRL caches per-dataset work (e.g. reference log-probs) by fingerprint
    return Dataset.from_list(rows * 2).map(lambda row: row, new_fingerprint=f"bench-{algorithm}-{tag}")


def measure(algorithm: str, patched: bool, args: argparse.Namespace) -> tuple[int, float]:
    import trl
    from peft import LoraConfig

    fastft.unpatch()
    if patched:
        assert fastft.PatchFastRL(algorithm) == {algorithm: True}
    generating = algorithm in ("GRPO", "RLOO")
    spec = _TRAINERS[algorithm]
    module = importlib.import_module(spec.module)
    cls = getattr(module, spec.class_name)
    # trl.<X>Config, or the experimental trainer's package's
    config_cls = getattr(trl, f"{algorithm}Config", None) or getattr(
        importlib.import_module(spec.module.rsplit(".", 1)[0]), f"{algorithm}Config"
    )
    original = vars(cls).get("_generate_single_turn")
    if generating:
        seam = _completions(args.completion_length)
        if algorithm == "GRPO":
            cls._generate_single_turn = lambda self, *a, **k: (seam(self, *a, **k), None)
        else:
            cls._generate_single_turn = seam
    try:
        dims = dict(
            vocab_size=args.vocab,
            hidden_size=args.hidden,
            intermediate_size=2 * args.hidden,
            num_hidden_layers=2,
            num_attention_heads=args.hidden // 64,
            num_key_value_heads=args.hidden // 128,
            head_dim=64,
            max_position_embeddings=1024,
        )
        if algorithm == "Reward":
            from transformers import AutoModelForSequenceClassification

            config = tiny_config("llama", num_labels=1, pad_token_id=build_tokenizer().pad_token_id, **dims)
            torch.manual_seed(0)
            model = AutoModelForSequenceClassification.from_config(config, attn_implementation="eager")
        else:
            model = build_tiny_model("llama", **dims)
        torch.manual_seed(0)
        with tempfile.TemporaryDirectory() as out:
            common = dict(
                output_dir=out,
                use_cpu=True,
                report_to="none",
                bf16=False,
                max_steps=1,
                logging_steps=1,
                save_strategy="no",
                disable_tqdm=True,
                seed=0,
                per_device_train_batch_size=4,
            )
            extra: dict = {}
            length_reward = dict(reward_funcs=lambda completions, **kw: [float(len(c) % 7) for c in completions])
            task = "SEQ_CLS" if algorithm == "Reward" else None  # the other rows: as first measured
            if generating:
                common.update(num_generations=4, max_completion_length=args.completion_length)
                extra = length_reward
            elif algorithm == "OnlineDPO":
                common.update(max_new_tokens=args.completion_length, max_length=128 + args.completion_length)
                extra = length_reward
            else:
                common.update(max_length=128)
            config = config_cls(**common)
            trainer = cls(
                model=model,
                args=config,
                processing_class=build_tokenizer(),
                train_dataset=_dataset(algorithm, f"{patched}"),
                **extra,
                peft_config=LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "up_proj"], task_type=task),
            )
            assert patched_algorithm(trainer) == (algorithm if patched else None)
            tracker = LiveBytesTracker()
            with tracker:
                trainer.train()
            loss = [row for row in trainer.state.log_history if "loss" in row][0]["loss"]
        return tracker.peak_bytes, loss
    finally:
        if generating:
            if original is None:
                del cls._generate_single_turn
            else:
                cls._generate_single_turn = original
        fastft.unpatch()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--completion-length", type=int, default=64)
    parser.add_argument("--trainers", default=",".join(_TRAINERS))
    args = parser.parse_args()
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("run without TRITON_INTERPRET=1: this measures the CPU torch path")
    torch.set_num_threads(1)
    import trl

    print(
        f"command: python benchmarks/bench_trl_trainers_memory.py --hidden {args.hidden} --vocab {args.vocab} "
        f"--completion-length {args.completion_length} --trainers {args.trainers}"
    )
    print(
        f"CPU, fp32, torch path, TRL {trl.__version__}; peak live tensor bytes of one training step (weights "
        "excluded); measured, not modeled\n"
    )
    print("| trainer | TRL peak MiB | fastft peak MiB | fastft / TRL | step-1 loss TRL | step-1 loss fastft |")
    print("|---|---:|---:|---:|---:|---:|")
    for algorithm in args.trainers.split(","):
        slow, slow_loss = measure(algorithm, False, args)
        fast, fast_loss = measure(algorithm, True, args)
        print(
            f"| {algorithm} | {slow / 2**20:.1f} | {fast / 2**20:.1f} | {fast / slow:.1%} | {slow_loss:.6g} | "
            f"{fast_loss:.6g} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
