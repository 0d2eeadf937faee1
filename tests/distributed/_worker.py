"""One training run, launched by the tests with ``accelerate launch`` (2 processes, gloo) or plain ``python`` (1).

Usage: ``python _worker.py TASK MODEL_DIR OUT_JSON WORK_DIR [key=value ...]``. Rank 0 writes the per-step log rows,
the kernel path counts and task-specific facts to OUT_JSON. Runs on the torch paths of the kernels (the caller unsets
TRITON_INTERPRET), like a CPU user would.
"""

from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

torch.set_num_threads(1)

PROMPT_COMPLETION = [
    {"prompt": "What is 12 plus 7?", "completion": " The answer is 19."},
    {"prompt": "Name a fast animal.", "completion": " The quick brown fox."},
    {"prompt": "Why checkpoint?", "completion": " It trades compute for memory."},
    {"prompt": "Count:", "completion": " 0 1 2 3 4 5"},
] * 4

GRPO_PROMPTS = [{"prompt": p} for p in ("Say hi.", "Count to three.", "Name a color.", "What is 2+2?")] * 4


def _reward_len(completions, **kwargs):
    # Deterministic, varied rewards so advantages are non-zero.
    return [float(len(c)) / 10.0 for c in completions]


def _kernel_calls() -> dict[str, int]:
    from fastft.kernels._launch import path_counts

    return {f"{op}:{path}": n for (op, path), n in path_counts.items()}


def main() -> None:
    task, model_dir, out_json, work_dir = sys.argv[1:5]
    opts = dict(item.split("=", 1) for item in sys.argv[5:])
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    global_batch = int(opts.get("global_batch", "4"))
    per_device = global_batch // world
    steps = int(opts.get("steps", "3"))

    import fastft
    from datasets import Dataset

    from fastft.model import FastModel

    patched = opts.get("patched", "1") == "1"
    algorithm = "GRPO" if task == "grpo" else "SFT"
    if patched:
        assert fastft.PatchFastRL(algorithm) == {algorithm: True}
    import trl

    model, tokenizer = FastModel.from_pretrained(model_dir, max_seq_length=64)
    model = FastModel.get_peft_model(model, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "gate_proj",
                                                                              "up_proj", "down_proj"],
                                     use_gradient_checkpointing=opts.get("gc", "fastft") if opts.get("gc") != "0"
                                     else False, random_state=0)
    common = dict(output_dir=work_dir, use_cpu=opts.get("use_cpu", "1") == "1", report_to="none", bf16=False, max_steps=steps, logging_steps=1,
                  learning_rate=5e-3, seed=0, disable_tqdm=True, dataloader_num_workers=0,
                  lr_scheduler_type="constant", per_device_train_batch_size=per_device,
                  save_strategy="steps" if opts.get("save") == "1" else "no", save_steps=steps,
                  optim=opts.get("optim", "adamw_torch"))
    if "optim_target_modules" in opts:
        common["optim_target_modules"] = opts["optim_target_modules"].split("+")
    torch.manual_seed(0)
    if task == "sft":
        args = trl.SFTConfig(max_length=48, completion_only_loss=True, **common)
        trainer = trl.SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(PROMPT_COMPLETION),
                                 processing_class=tokenizer)
    elif task == "grpo":
        # generation_batch_size = global batch; num_generations divides it
        args = trl.GRPOConfig(max_completion_length=8, num_generations=2, temperature=1.0, beta=0.04,
                              generation_batch_size=global_batch, **common)
        trainer = trl.GRPOTrainer(model=model, args=args, reward_funcs=_reward_len,
                                  train_dataset=Dataset.from_list(GRPO_PROMPTS), processing_class=tokenizer)
    else:
        raise SystemExit(f"unknown task {task}")
    trainer.train()
    facts = {
        "world": world,
        "trainer": type(trainer).__name__,
        "optimizer": type(trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer")
                          else trainer.optimizer).__name__,
        "distributed_type": str(trainer.accelerator.distributed_type),
        "rows": [r for r in trainer.state.log_history if "loss" in r],
        "kernel_calls": _kernel_calls(),
    }
    if opts.get("save") == "1":
        trainer.save_model(os.path.join(work_dir, "final"))
        trainer.accelerator.wait_for_everyone()
        facts["saved"] = os.path.join(work_dir, "final")
    # Every rank reports, so the test can check each one ran the fused kernels.
    with open(f"{out_json}.rank{rank}", "w") as f:
        json.dump(facts, f)


if __name__ == "__main__":
    main()
