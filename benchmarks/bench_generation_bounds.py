"""How much faster could GRPO's sampling get on CPU without changing transformers' decode loop? Two upper bounds.

Issue 19 asks for generation 2x faster than plain TRL's on CPU with the same sampled tokens. Anything that keeps
PEFT's LoRA arithmetic (the only way to keep the logits, and so the tokens, bitwise equal) is bounded by what the
adapter costs; this measures that bound and one that changes the loop:

* ``peft``: the PEFT LoRA model, eager, dynamic KV cache -- what plain TRL samples with;
* ``merged``: the same adapter merged into the base weights (``merge_and_unload``): the cost of a model with no LoRA
  at all, i.e. the floor for any LoRA speed-up inside the eager loop (its logits round differently);
* ``compiled`` (``--compile``): the PEFT model with a static cache and transformers' compiled decoding
  (``torch.compile``, inductor on CPU), after its first call (which compiles, timed separately).

Each variant samples ``--rows`` x ``--new-tokens`` tokens (fp32, temperature 1, top-k/top-p off, seed 1) from the same
prompts, ``--repeats`` times alternating, 1 torch thread; process CPU time, min and median. Prints whether each variant
sampled the same tokens as ``peft``. CPU timings, not GPU figures. Usage::

    python benchmarks/bench_generation_bounds.py --model demo --compile
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from bench_grpo_generation import MODELS


def _build(name: str) -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    spec = dict(MODELS[name])
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(spec.pop("model_type"), **spec))
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    torch.manual_seed(3407)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0, target_modules=targets))
    for param_name, param in model.named_parameters():
        if "lora_B" in param_name:  # a trained-looking adapter (PEFT starts B at zero)
            torch.nn.init.normal_(param, std=0.02)
    return model.eval()


def _sample(model: torch.nn.Module, prompts: torch.Tensor, new_tokens: int, **kwargs) -> tuple[float, torch.Tensor]:
    torch.manual_seed(1)
    start = time.process_time()
    with torch.no_grad():
        out = model.generate(
            input_ids=prompts,
            attention_mask=torch.ones_like(prompts),
            do_sample=True,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            top_k=0,
            top_p=1.0,
            temperature=1.0,
            pad_token_id=0,
            **kwargs,
        )
    return time.process_time() - start, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="demo")
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--prompt-len", type=int, default=12)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--compile", action="store_true", help="also time static cache + compiled decoding")
    args = parser.parse_args()
    torch.set_num_threads(1)
    peft_model = _build(args.model)
    variants = {"peft": (peft_model, {}), "merged": (copy.deepcopy(peft_model).merge_and_unload().eval(), {})}
    if args.compile:
        from transformers.generation.configuration_utils import CompileConfig

        config = CompileConfig(mode="default")
        config._compile_all_devices = True  # transformers compiles decoding on accelerators only unless told
        variants["compiled"] = (peft_model, {"cache_implementation": "static", "compile_config": config})
    torch.manual_seed(2)
    prompts = torch.randint(1, MODELS[args.model]["vocab_size"], (args.rows, args.prompt_len))
    times: dict[str, list[float]] = {name: [] for name in variants}
    outputs: dict[str, torch.Tensor] = {}
    for name, (model, kwargs) in variants.items():  # warm-up (and the compile) outside the timed runs
        seconds, _ = _sample(model, prompts, args.new_tokens, **kwargs)
        print(f"{name}: first call {seconds:.2f} s CPU (this process; compile workers not counted)")
    for repeat in range(args.repeats):
        order = list(variants) if repeat % 2 == 0 else list(reversed(variants))
        for name in order:
            model, kwargs = variants[name]
            seconds, outputs[name] = _sample(model, prompts, args.new_tokens, **kwargs)
            times[name].append(seconds)
    print(
        f"{args.model}: {args.rows} rows x {args.new_tokens} new tokens, fp32, 1 thread, {args.repeats} repeats "
        f"(CPU seconds per generate(), min / median; speed-up = peft median / variant median)"
    )
    base = statistics.median(times["peft"])
    for name, values in times.items():
        same = torch.equal(outputs[name], outputs["peft"])
        print(
            f"  {name:9s} {min(values):.3f} / {statistics.median(values):.3f} s   speed-up "
            f"{base / statistics.median(values):.2f}x   same tokens as peft: {same}"
        )


if __name__ == "__main__":
    main()
