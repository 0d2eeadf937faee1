"""Peak live bytes of one LoRA training step: FastModel vs plain transformers + PEFT (standard checkpointing).

Measured on CPU (kernels take their torch path: no GPU here, no interpreter), fp32, with
``fastft.memory.LiveBytesTracker``: the high-water mark of tensor storages allocated during the step (forward with
labels, backward), on top of the weights, which exist before and are not counted. Each variant runs in its own process
so fastft's process-wide RoPE patch cannot leak into the baseline.

    python benchmarks/bench_model_step_memory.py [--seq 2048] [--hidden 1024] [--layers 4] [--vocab 32000]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

MIB = 2**20


def _measure(variant: str, model_dir: str, seq: int) -> dict:
    import torch

    from fastft.memory import LiveBytesTracker

    torch.manual_seed(0)
    lora = dict(r=16, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                       "down_proj"])
    if variant == "baseline":
        import peft
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")
        model = peft.get_peft_model(model, peft.LoraConfig(task_type="CAUSAL_LM", **lora))
        model.base_model.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        from fastft import FastModel

        model, _ = FastModel.from_pretrained(model_dir, dtype=torch.float32)
        model = FastModel.get_peft_model(model, use_gradient_checkpointing="fastft", **lora)
    model.train()
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (1, seq))
    start = time.perf_counter()
    with LiveBytesTracker() as tracker:
        with tracker.in_phase("forward"):
            loss = model(input_ids=ids, labels=ids).loss
        with tracker.in_phase("backward"):
            loss.backward()
        del loss
    seconds = time.perf_counter() - start
    return {"variant": variant, "peak_bytes": tracker.peak_bytes, "breakdown": tracker.peak_breakdown,
            "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--child", nargs=2, metavar=("VARIANT", "DIR"))
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_measure(args.child[0], args.child[1], args.seq)))
        return

    from fastft.offline import save_tiny_model

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    with tempfile.TemporaryDirectory() as tmp:
        save_tiny_model(tmp, "llama", vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=2816,
                        num_hidden_layers=args.layers, num_attention_heads=16, num_key_value_heads=4, head_dim=64,
                        max_position_embeddings=max(4096, args.seq))
        results = {}
        for variant in ("baseline", "fastft"):
            out = subprocess.run([sys.executable, __file__, "--seq", str(args.seq), "--child", variant, tmp],
                                 capture_output=True, text=True, env=env, check=True)
            results[variant] = json.loads(out.stdout.strip().splitlines()[-1])
    base, fast = results["baseline"]["peak_bytes"], results["fastft"]["peak_bytes"]
    print(f"One LoRA (r=16, all linear) training step, llama hidden={args.hidden} layers={args.layers} "
          f"vocab={args.vocab} seq={args.seq} batch=1 fp32, measured on CPU (torch paths), weights excluded")
    print(f"{'variant':<44} {'peak live MiB':>14} {'CPU s':>7}")
    print(f"{'transformers + PEFT + standard checkpointing':<44} {base / MIB:>14.1f} "
          f"{results['baseline']['seconds']:>7.2f}")
    print(f"{'fastft FastModel (checkpointing, fused loss)':<44} {fast / MIB:>14.1f} "
          f"{results['fastft']['seconds']:>7.2f}")
    print(f"fastft / baseline = {fast / base:.1%} (goal <= 40%)")
    print("command: python benchmarks/bench_model_step_memory.py " + " ".join(sys.argv[1:]))


if __name__ == "__main__":
    main()
