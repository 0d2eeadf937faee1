"""FSDP2 (``fully_shard``) training loop for the distributed tests; also the single-process reference (world 1).

Why not ``accelerate launch`` with an FSDP config: accelerate 1.15 turns on FSDP only on accelerator devices
(``AcceleratorState`` switches to ``DistributedType.FSDP`` from MULTI_GPU/XPU/..., never from MULTI_CPU), so on this
CPU-only machine an FSDP config silently trains as plain DDP. This worker applies ``fully_shard`` exactly as
accelerate's ``fsdp2_prepare_model`` does with ``TRANSFORMER_BASED_WRAP`` (each decoder layer, then the root) and
runs under ``torch.distributed.run`` (gloo).

Usage: ``python -m torch.distributed.run --nproc_per_node 2 _fsdp_worker.py MODEL_DIR OUT_DIR NAME:k=v,k=v ...``
or plain ``python _fsdp_worker.py MODEL_DIR OUT_DIR NAME:...`` for world 1 (no sharding); one run per NAME. Options:
``shard_head=1`` wraps lm_head in its own fully_shard group (so the fused loss reads a DTensor and must gather it);
``full=1`` trains every weight (lm_head included) instead of LoRA; ``trl=1`` computes the loss through PatchFastRL's
fast LM head (TRL's fused-head contract) instead of the patched causal-LM forward; ``gc=offload`` forces fastft's
offloaded checkpointing (host copies on CPU). Rank 0 writes ``OUT_DIR/NAME/result.json`` (per-step losses, kernel
counts) and the trained weights as a full (unsharded) safetensors state dict.
"""

from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch

torch.set_num_threads(1)

GLOBAL_BATCH, SEQ, STEPS = 4, 12, 3


def batches(vocab: int, steps: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1234)
    out = []
    for _ in range(steps):
        ids = torch.randint(5, vocab, (GLOBAL_BATCH, SEQ), generator=g)
        labels = ids.clone()
        labels[:, : SEQ // 3] = -100  # a "prompt" that is not scored
        labels[1, -2:] = -100  # uneven valid-token counts per rank
        out.append((ids, labels))
    return out


def train_variant(model_dir: str, out_dir: str, opts: dict[str, str], world: int, rank: int) -> None:
    from fastft.distributed import is_dtensor
    from fastft.kernels._launch import path_counts
    from fastft.model import FastModel
    from fastft.patches.checkpointing import offloaded_checkpoint
    from fastft.patches.peft_lora import can_fuse

    path_counts.clear()
    full = opts.get("full") == "1"
    model, _ = FastModel.from_pretrained(model_dir, max_seq_length=64, full_finetuning=full)
    if not full:
        model = FastModel.get_peft_model(
            model,
            r=4,
            lora_alpha=8,
            random_state=0,
            target_modules=["q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"],
            use_gradient_checkpointing="fastft",
        )
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if opts.get("gc") == "offload":
        base._set_gradient_checkpointing(True, offloaded_checkpoint)
        base.enable_input_require_grads()
    model.train()

    if world > 1:
        from torch.distributed.fsdp import fully_shard

        for layer in base.model.layers:
            fully_shard(layer)
        if opts.get("shard_head") == "1":
            fully_shard(base.lm_head)
        fully_shard(model)
    facts: dict = {"world": world}
    if not full:
        # Outside any forward the LoRA base weights are shards: the fused LoRA gate must say no (and why).
        facts["can_fuse_outside_forward"] = list(can_fuse(base.model.layers[0].mlp.gate_proj))
    use_trl = opts.get("trl") == "1"
    if use_trl:
        # PatchFastRL's fast LM head exactly as FastSFTTrainer installs it: TRL's fused forward on the model, swapped
        # for fastft's for the loss-only call.
        import types

        from trl.trainer.utils import add_fused_lm_head

        from fastft.patches.trl import LOSS_ONLY, _make_fast_forward

        add_fused_lm_head(base, temperature=1.0, cast_lm_head_to_fp32=False, outputs=("log_probs",))
        base.forward = types.MethodType(_make_fast_forward(base.forward, temperature=1.0, outputs=(), cast_fp32=False), base)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=5e-3)

    per_rank = GLOBAL_BATCH // world
    losses, head_types = [], set()
    head = base.lm_head

    def spy(module, args):  # what the fused loss will read as the lm_head weight
        head_types.add("DTensor" if is_dtensor(head.weight) else "Tensor")

    base.model.norm.register_forward_pre_hook(spy)
    for ids, labels in batches(base.config.vocab_size, STEPS):
        n_items = int((labels[:, 1:] != -100).sum())  # global target count (shifted labels)
        mine = slice(rank * per_rank, (rank + 1) * per_rank)
        if use_trl:
            out = model(input_ids=ids[mine], labels=labels[mine], num_items_in_batch=n_items, fused_lm_head=LOSS_ONLY)
        else:
            out = model(input_ids=ids[mine], labels=labels[mine], num_items_in_batch=n_items)
            assert out.logits is None, "the fused loss did not run"
        # FSDP averages gradients over ranks: scale so the step is the gradient of sum(loss_r) (= the global mean).
        (out.loss * world).backward()
        loss = out.loss.detach().clone()
        if world > 1:
            torch.distributed.all_reduce(loss)
        losses.append(float(loss))
        opt.step()
        opt.zero_grad()

    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = (
        get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if world > 1
        else {k: v.detach() for k, v in model.state_dict().items()}
    )
    if rank == 0:
        from safetensors.torch import save_file

        os.makedirs(out_dir, exist_ok=True)
        trained = {k: v.contiguous() for k, v in state.items() if "lora_" in k or full}
        save_file(trained, os.path.join(out_dir, "trained.safetensors"))
        facts.update(
            losses=losses,
            head_weight_seen=sorted(head_types),
            kernel_calls={f"{op}:{p}": n for (op, p), n in path_counts.items()},
        )
        with open(os.path.join(out_dir, "result.json"), "w") as f:
            json.dump(facts, f)


def main() -> None:
    model_dir, out_dir = sys.argv[1:3]
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world > 1:
        torch.distributed.init_process_group("gloo")
    # Each argument after OUT_DIR is one variant: "name:key=value,key=value".
    for spec in sys.argv[3:]:
        name, _, rest = spec.partition(":")
        opts = dict(item.split("=", 1) for item in rest.split(",") if item)
        train_variant(model_dir, os.path.join(out_dir, name), opts, world, rank)
        if world > 1:
            torch.distributed.barrier()
    if world > 1:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
    # Every result is written (the test reads and checks them). Skip the interpreter's teardown: with gloo, a C++
    # thread destroyed at exit sometimes aborts the process ("terminate called without an active exception", seen
    # once in CI here after all three variants had finished), which would fail a run whose work is complete.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
