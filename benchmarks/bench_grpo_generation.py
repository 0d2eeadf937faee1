"""GRPO on CPU: where a step's time goes (generation vs the rest), plain TRL vs the two-line change, and whether
both sample the same tokens.

What it measures, and how
-------------------------
Each run (model x variant x repeat) trains GRPO for ``--steps`` steps in its own subprocess:

* **plain**: ``AutoModelForCausalLM.from_pretrained`` + ``peft.get_peft_model`` + ``trl.GRPOTrainer``;
* **fastft**: ``FastModel.from_pretrained`` + ``FastModel.get_peft_model`` + ``PatchFastRL("GRPO")``;
* **baseline** (only with ``--baseline-src DIR``): the fastft variant importing fastft from ``DIR`` (e.g. an export
  of an older commit: ``git archive <commit> fastft | tar -x -C DIR``), for a before/after comparison.

All get the same LoRA (r=16 on every projection, alpha 16, no dropout, seed 3407), TRL's defaults (its KV cache and
``gradient_checkpointing=True`` included), fp32, ``num_generations`` completions of up to ``max_completion_length``
sampled tokens per prompt. Models are random local checkpoints (no hub):

* ``demo``: the ``fastft demo`` model (Llama, hidden 128, 4 layers, vocab 384);
* ``100m``: a ~100M-parameter Llama (hidden 768, 12 layers, intermediate 2048, GQA 12:4, vocab 32,000 tied).

Per step: wall time (``on_step_begin`` to ``on_step_end``), and the wall time of TRL's ``_generate_single_turn``
(wrapped on the trainer instance, so fastft's for_inference/for_training switch around it is counted as generation),
plus the same two as process CPU time (less sensitive to other processes than wall time on a shared machine). The
first ``--warmup`` steps are dropped; median and min-max over the other steps of all repeats. Sampled tokens: every
completion's token ids of every step, compared run by run against the plain run with the same repeat index (same
seed): "identical" means every token of every step matched.

Runs alternate order (plain first in even repeats). CPU timings; they say nothing about GPU speed. Usage::

    python benchmarks/bench_grpo_generation.py --out benchmarks/results/grpo_generation_cpu.md
    python benchmarks/bench_grpo_generation.py --models demo --repeats 1 --steps 4     # a quick look
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# The sibling benchmark (this directory is on sys.path when run as a script): the same reward, subprocess runner and
# median (min-max) formatting, so the two tables are made the same way.
from bench_trl_cpu import _data, _ms, _reward, run_result

MODELS: dict[str, dict[str, Any]] = {
    "demo": dict(
        model_type="llama",
        vocab_size=384,
        hidden_size=128,
        intermediate_size=344,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
    ),
    "100m": dict(
        model_type="llama",
        vocab_size=32000,
        hidden_size=768,
        intermediate_size=2048,
        num_hidden_layers=12,
        num_attention_heads=12,
        num_key_value_heads=4,
        head_dim=64,
        tie_word_embeddings=True,
    ),
}
#: (prompts per step, completions per prompt, max new tokens) per model: the demo's shape, and a smaller batch for 100M.
SHAPES: dict[str, tuple[int, int, int]] = {"demo": (4, 8, 32), "100m": (2, 4, 16)}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def run_one(model_name: str, variant: str, steps: int, threads: int, model_dir: str, out_dir: str) -> dict:
    """One GRPO run in this process; returns its measurements."""
    import torch

    torch.set_num_threads(threads)
    import trl
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    if variant == "plain":
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        torch.manual_seed(3407)  # FastModel.get_peft_model's default random_state: the same adapter init
        model = get_peft_model(
            model, LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS, task_type="CAUSAL_LM")
        )
    else:
        from fastft import FastModel, PatchFastRL

        PatchFastRL("GRPO")
        model, tokenizer = FastModel.from_pretrained(model_dir)
        model = FastModel.get_peft_model(model, r=16, lora_alpha=16, target_modules=TARGETS)
    prompts, generations, new_tokens = SHAPES[model_name]
    data = _data("grpo", tokenizer, n_rows=64)  # the same prompts as bench_trl_cpu's GRPO cells, 64 of them
    args = trl.GRPOConfig(
        output_dir=out_dir,
        use_cpu=True,
        report_to="none",
        bf16=False,
        max_steps=steps,
        logging_steps=1,
        seed=0,
        save_strategy="no",
        disable_tqdm=True,
        dataloader_num_workers=0,
        per_device_train_batch_size=prompts * generations,
        num_generations=generations,
        max_completion_length=new_tokens,
        learning_rate=1e-3,
    )
    trainer = trl.GRPOTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer, reward_funcs=_reward)

    steps_wall: list[float] = []
    steps_cpu: list[float] = []
    gen_wall: list[float] = []
    gen_cpu: list[float] = []
    tokens: list[str] = []
    generate = trainer._generate_single_turn  # bound: fastft's class-level hook (if any) runs inside this wrapper

    def timed_generate(*a, **k):
        w, c = time.perf_counter(), time.process_time()
        out = generate(*a, **k)
        gen_wall.append(time.perf_counter() - w)
        gen_cpu.append(time.process_time() - c)
        tokens.append(hashlib.sha256(json.dumps(out[0]).encode()).hexdigest()[:16])
        return out

    trainer._generate_single_turn = timed_generate

    class Clock(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.w, self.c = time.perf_counter(), time.process_time()

        def on_step_end(self, *a, **k):
            steps_wall.append(time.perf_counter() - self.w)
            steps_cpu.append(time.process_time() - self.c)

    trainer.add_callback(Clock())
    trainer.train()
    n_params = sum(p.numel() for p in model.parameters())
    return dict(
        model=model_name,
        variant=variant,
        steps_wall=steps_wall,
        steps_cpu=steps_cpu,
        gen_wall=gen_wall,
        gen_cpu=gen_cpu,
        tokens=tokens,
        params=n_params,
        losses=[row["loss"] for row in trainer.state.log_history if "loss" in row],
    )


def _subprocess(model_name: str, variant: str, args: argparse.Namespace, model_dir: str) -> dict:
    with tempfile.TemporaryDirectory() as out:
        cmd = [
            sys.executable,
            __file__,
            "--one",
            model_name,
            variant,
            "--steps",
            str(args.steps),
            "--threads",
            str(args.threads),
            "--model-dir",
            model_dir,
            "--run-dir",
            out,
        ]
        env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
        if variant == "baseline":
            env["PYTHONPATH"] = os.pathsep.join([args.baseline_src, env.get("PYTHONPATH", "")])
        return run_result(cmd, env, f"{model_name} {variant}")


def table(results: list[dict], warmup: int, variants: list[str]) -> str:
    head = (
        "| model | variant | step ms wall (min-max) | generation ms wall (min-max) | generation share | "
        "step ms CPU | generation ms CPU | step ratio vs plain (wall / CPU) | generation ratio vs plain "
        "(wall / CPU) | same tokens as plain |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for model in dict.fromkeys(r["model"] for r in results):
        runs = {v: [r for r in results if r["model"] == model and r["variant"] == v] for v in variants}

        def pooled(v: str, key: str, runs: dict[str, list[dict]] = runs) -> list[float]:
            return [t for r in runs[v] for t in r[key][warmup:]]

        base = {k: statistics.median(pooled("plain", k)) for k in ("steps_wall", "steps_cpu", "gen_wall", "gen_cpu")}
        for v in variants:
            if not runs[v]:
                continue
            med = {k: statistics.median(pooled(v, k)) for k in base}
            same = all(r["tokens"] == p["tokens"] for r, p in zip(runs[v], runs["plain"], strict=False))
            lines.append(
                f"| {model} | {v} | {_ms(pooled(v, 'steps_wall'))} | {_ms(pooled(v, 'gen_wall'))} | "
                f"{med['gen_wall'] / med['steps_wall']:.0%} | {med['steps_cpu'] * 1e3:.0f} | "
                f"{med['gen_cpu'] * 1e3:.0f} | {med['steps_wall'] / base['steps_wall']:.2f} / "
                f"{med['steps_cpu'] / base['steps_cpu']:.2f} | {med['gen_wall'] / base['gen_wall']:.2f} / "
                f"{med['gen_cpu'] / base['gen_cpu']:.2f} | {'yes' if same else 'NO'} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=1, help="steps per run left out of the statistics")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run (1: CPU time ~ work done)")
    parser.add_argument("--baseline-src", help="a directory holding another fastft package to run as 'baseline'")
    parser.add_argument("--out", help="write the markdown table here (and the raw runs beside it as .json)")
    parser.add_argument("--one", nargs=2, metavar=("MODEL", "VARIANT"), help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    parser.add_argument("--run-dir", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.one:
        result = run_one(*args.one, args.steps, args.threads, args.model_dir, args.run_dir)
        print("RESULT " + json.dumps(result), flush=True)
        return 0
    models = [m for m in args.models.split(",") if m]
    bad = [m for m in models if m not in MODELS]
    if bad:
        parser.error(f"unknown models {bad}; choose from {', '.join(MODELS)}")
    if args.steps <= args.warmup:
        parser.error(f"--steps {args.steps} must exceed --warmup {args.warmup}")
    if args.baseline_src and not (Path(args.baseline_src) / "fastft" / "__init__.py").is_file():
        parser.error(f"--baseline-src {args.baseline_src!r} holds no fastft/__init__.py")
    variants = ["plain", "fastft"] + (["baseline"] if args.baseline_src else [])
    from fastft.offline import save_tiny_model

    results: list[dict] = []
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for model in models:
            model_dir = save_tiny_model(str(Path(tmp) / model), **MODELS[model])
            for repeat in range(args.repeats):
                order = variants if repeat % 2 == 0 else variants[::-1]
                for variant in order:
                    r = _subprocess(model, variant, args, model_dir)
                    results.append(r)
                    print(
                        f"{model} {variant} #{repeat}: step {_ms(r['steps_wall'][args.warmup :])} ms, generation "
                        f"{_ms(r['gen_wall'][args.warmup :])} ms (wall)",
                        flush=True,
                    )
    text = table(results, args.warmup, variants)
    elapsed = time.perf_counter() - started
    command = "python benchmarks/bench_grpo_generation.py " + " ".join(argv if argv is not None else sys.argv[1:])
    import torch
    import transformers
    import trl

    shapes = "; ".join(
        f"{m}: {results[[r['model'] for r in results].index(m)]['params'] / 1e6:.1f}M parameters, "
        f"{SHAPES[m][0]} prompts x {SHAPES[m][1]} completions x up to {SHAPES[m][2]} new tokens"
        for m in models
    )
    header = (
        f"# GRPO generation on CPU: plain TRL vs fastft (measured)\n\nCommand: `{command}`  \n"
        f"{os.cpu_count()} CPUs, {args.threads} torch thread(s) per run, torch {torch.__version__}, "
        f"transformers {transformers.__version__}, trl {trl.__version__}; fp32, LoRA r=16 on every projection; "
        f"{shapes}; {args.steps} steps per run ({args.warmup} warm-up dropped), {args.repeats} repeats per "
        f"variant, alternating order; {elapsed:.0f} s in all.  \n"
        "CPU timings, not GPU figures. Ratios < 1 favour fastft.\n\n"
    )
    print(text)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".md.tmp").write_text(header + text + "\n")
        out.with_suffix(".md.tmp").replace(out)
        out.with_suffix(".json.tmp").write_text(json.dumps(results, indent=1))
        out.with_suffix(".json.tmp").replace(out.with_suffix(".json"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
