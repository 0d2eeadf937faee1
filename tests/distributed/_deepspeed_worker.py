"""DeepSpeed (ZeRO stage from ``ZERO``) training loop for the distributed tests, same data and loss as
_fsdp_worker.py. Usage: ``ZERO=3 python -m torch.distributed.run --nproc_per_node 2 _deepspeed_worker.py MODEL_DIR
OUT_JSON``. ``stage3_param_persistence_threshold`` is 0 so every parameter (lm_head included) is partitioned."""

from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

torch.set_num_threads(1)
sys.path.insert(0, os.path.dirname(__file__))

from _fsdp_worker import GLOBAL_BATCH, STEPS, batches  # noqa: E402


def main() -> None:
    import deepspeed

    from fastft.distributed import direct_read_problem
    from fastft.kernels._launch import path_counts
    from fastft.model import FastModel

    model_dir, out = sys.argv[1:3]
    world, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
    deepspeed.init_distributed(dist_backend="gloo")
    model, _ = FastModel.from_pretrained(model_dir, max_seq_length=64, full_finetuning=True)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    config = {
        "train_micro_batch_size_per_gpu": GLOBAL_BATCH // world,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": int(os.environ.get("ZERO", "3")), "stage3_param_persistence_threshold": 0},
        "optimizer": {"type": "AdamW", "params": {"lr": 5e-3, "torch_adam": True}},
    }
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    engine.train()
    head_problems: list[str | None] = []
    model.register_forward_pre_hook(lambda m, a: head_problems.append(direct_read_problem(model.lm_head.weight)))
    losses, fused = [], []
    per_rank = GLOBAL_BATCH // world
    for ids, labels in batches(model.config.vocab_size, STEPS):
        n_items = int((labels[:, 1:] != -100).sum())
        mine = slice(rank * per_rank, (rank + 1) * per_rank)
        output = engine(input_ids=ids[mine], labels=labels[mine], num_items_in_batch=n_items)
        fused.append(output.logits is None)
        engine.backward(output.loss * world)  # DeepSpeed averages gradients over ranks, like DDP
        engine.step()
        loss = output.loss.detach().clone()
        torch.distributed.all_reduce(loss)
        losses.append(float(loss))
    if rank == 0:
        with open(out, "w") as f:
            json.dump(
                {
                    "losses": losses,
                    "fused": fused,
                    "head_problems": head_problems,
                    "kernel_calls": {f"{a}:{b}": n for (a, b), n in path_counts.items()},
                },
                f,
            )


if __name__ == "__main__":
    main()
