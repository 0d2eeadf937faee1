"""One training run, launched by the tests with ``accelerate launch`` (2 processes, gloo) or plain ``python`` (1).

Usage: ``python _worker.py TASK[+TASK...] MODEL_DIR OUT_JSON WORK_DIR [key=value ...]``; tasks run one after the
other in the same processes (one launch, one import cost). Each rank writes ``OUT_JSON.rank<r>``: per task the
per-step log rows and the kernel path counts. Runs on the torch paths of the kernels (the caller unsets
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

import torch

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


def run_task(task: str, model_dir: str, work_dir: str, opts: dict[str, str], world: int) -> dict:
    """One training run; ``task`` is "sft", "grpo" (both after PatchFastRL) or "grpo_trl" (TRL's own GRPOTrainer)."""
    from datasets import Dataset

    import fastft
    from fastft.kernels._launch import path_counts
    from fastft.model import FastModel

    path_counts.clear()
    fastft.unpatch()
    algorithm = "SFT" if task == "sft" else "GRPO"
    if task != "grpo_trl":
        assert fastft.PatchFastRL(algorithm) == {algorithm: True}
    import trl

    global_batch = int(opts.get("global_batch", "4"))
    steps = int(opts.get("steps", "3"))
    model, tokenizer = FastModel.from_pretrained(model_dir, max_seq_length=64)
    model = FastModel.get_peft_model(
        model,
        r=4,
        lora_alpha=8,
        random_state=0,
        use_gradient_checkpointing="fastft",
        target_modules=["q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"],
    )
    if opts.get("gc") == "offload":
        # fastft's offloaded checkpointing (host copies on CPU), forced: on CPU "fastft" mode runs standard
        # checkpointing; this exercises its nested backward under DDP's gradient hooks.
        from fastft.patches.checkpointing import offloaded_checkpoint

        model.get_base_model()._set_gradient_checkpointing(True, offloaded_checkpoint)
        model.get_base_model().enable_input_require_grads()
    out_dir = os.path.join(work_dir, task)
    common = dict(
        output_dir=out_dir,
        use_cpu=True,
        report_to="none",
        bf16=False,
        max_steps=steps,
        logging_steps=1,
        learning_rate=5e-3,
        seed=0,
        disable_tqdm=True,
        dataloader_num_workers=0,
        lr_scheduler_type="constant",
        per_device_train_batch_size=global_batch // world,
        save_strategy="steps" if opts.get("save") == "1" else "no",
        save_steps=steps,
        optim=opts.get("optim", "adamw_torch"),
    )
    if "optim_target_modules" in opts:
        common["optim_target_modules"] = opts["optim_target_modules"].split("+")
    torch.manual_seed(0)
    if task == "sft":
        args = trl.SFTConfig(max_length=48, completion_only_loss=True, **common)
        trainer = trl.SFTTrainer(
            model=model, args=args, train_dataset=Dataset.from_list(PROMPT_COMPLETION), processing_class=tokenizer
        )
    else:
        # one generation batch = the global batch; 2 completions per prompt
        args = trl.GRPOConfig(
            max_completion_length=8,
            num_generations=2,
            temperature=1.0,
            beta=0.04,
            generation_batch_size=global_batch,
            **common,
        )
        trainer = trl.GRPOTrainer(
            model=model,
            args=args,
            reward_funcs=_reward_len,
            train_dataset=Dataset.from_list(GRPO_PROMPTS),
            processing_class=tokenizer,
        )
    trainer.train()
    trainer.accelerator.wait_for_everyone()
    from fastft.patches.trl import patched_algorithm

    hooks = patched_algorithm(trainer)
    fastft.unpatch()
    return {
        "world": world,
        "trainer": type(trainer).__name__,
        "fastft_hooks": hooks,
        "distributed_type": str(trainer.accelerator.distributed_type),
        "rows": [r for r in trainer.state.log_history if "loss" in r],
        "kernel_calls": _kernel_calls(),
    }


def main() -> None:
    tasks, model_dir, out_json, work_dir = sys.argv[1:5]
    opts = dict(item.split("=", 1) for item in sys.argv[5:])
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    facts = {task: run_task(task, model_dir, work_dir, opts, world) for task in tasks.split("+")}
    # Every rank reports, so the test can check each one ran the fused kernels.
    with open(f"{out_json}.rank{rank}", "w") as f:
        json.dump(facts, f)


if __name__ == "__main__":
    main()
