"""``fastft plan``: will this fine-tune fit in my GPU, and how long can my sequences be? (modeled, not measured)

The answer comes from :mod:`fastft.memory.step_model`: the real training step run on meta tensors with a GPU's
memory behaviour (flash attention, 4-bit weights as bitsandbytes stores them, fastft's fused kernels, checkpointing
with optional CPU offload, optimizer states). The maximum context is searched -- doubling from 1,024 tokens until the
peak exceeds the budget, then bisecting down to a coarse granularity (1/32 of the bracket, at least 256 tokens) --
with every measured length cached, so asking for several GPU sizes reuses the steps already run.

What a GPU holds beyond tensors -- the CUDA context, kernel images, library workspaces, the caching allocator's slack
-- is not something a meta tensor can show, so the search subtracts ``--reserve`` (default 1 GiB) from
``--gpu-memory`` first. 1 GiB is deliberately on the safe side: the CUDA context alone is ~0.3-0.8 GiB depending on the
CUDA version and lazy module loading (723 MiB reported for a 4-byte tensor on discuss.pytorch.org/t/73021), and an
OOM is worse than a slightly shorter context. ``--reserve 0`` gives the tensor-only answer. ``--host-memory`` bounds
the search by host RAM too (offloaded checkpoints and embeddings live there; a free Colab has about 12 GB).

A model whose ``model_type`` is not in ``fastft.patches.architectures.ARCHITECTURES`` gets none of fastft's kernels,
fused LoRA or fused loss from FastModel, so it is modeled UNPATCHED (the ``"unpatched"`` step-model variant: its own
forward and full logits, PEFT LoRA, fastft's checkpointing), and the output says so.

Memory sizes need a unit ("16" is refused: 16 bytes is never what was meant, and GB and GiB differ by 7%).

``--gpu NAME`` also prints the modeled (roofline) step time and tokens/s of each variant on that GPU
(:mod:`fastft.memory.speed_model`: FLOPs and bytes of every op of the same meta step, priced at the GPU's published
peaks -- an optimistic bound, labelled so), and with ``--tokens N`` the modeled time to train N tokens.

Not modelled: the tokenizer / dataloader, eval passes, and packing (sequences are assumed padded to ``seq_len``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from typing import Any

from fastft.memory import speed_model
from fastft.memory.model_configs import known_models, load_config, lora_targets, unpatched_reason
from fastft.memory.step_model import StepModel, StepResult, StepSpec
from fastft.memory.units import GPU_PRESETS, format_bytes, parse_gpu_memory, parse_size, parse_tokens

#: Order in which breakdown rows are printed; phases are where the bytes alive at the peak were allocated.
PHASE_LABELS = {
    "weights": "weights (base + LoRA + buffers)",
    "optimizer_state": "optimizer state",
    "gradients": "gradients (trainable params)",
    "activations": "activations saved in forward",
    "loss": "loss / logits",
    "recompute": "recomputed layer activations (checkpointing)",
    "backward": "backward temporaries (activation grads)",
    "optimizer_step": "optimizer step temporaries",
    "inputs": "input ids / labels",
}


class Planner:
    """One built step model per variant, with a cache of measured sequence lengths."""

    def __init__(self, config: Any, spec: StepSpec, batch_size: int = 1) -> None:
        self.model = StepModel(config, spec)
        self.batch_size = batch_size
        self.cache: dict[int, StepResult] = {}
        self.counts: dict[int, speed_model.OpCounter] = {}

    def count(self, seq_len: int) -> speed_model.OpCounter:
        """FLOPs and bytes of every op of one step at ``seq_len`` (every layer run: a few seconds at 8B)."""
        if seq_len not in self.counts:
            self.counts[seq_len] = speed_model.count_step(self.model, seq_len, self.batch_size)[1]
        return self.counts[seq_len]

    def step(self, seq_len: int) -> StepResult:
        if seq_len not in self.cache:
            self.cache[seq_len] = self.model.step(seq_len, self.batch_size)
        return self.cache[seq_len]

    def fits(self, seq_len: int, budget: int, host_budget: int | None = None) -> bool:
        result = self.step(seq_len)
        return result.peak_bytes <= budget and (host_budget is None or result.host_bytes <= host_budget)

    def max_context(self, budget: int, host_budget: int | None = None, start: int = 1024, limit: int = 1 << 20) -> int:
        """Largest measured sequence length whose modeled peak fits ``budget`` GPU bytes (and ``host_budget`` host
        bytes, if given); 0 if even 128 tokens do not fit."""
        fits = lambda t: self.fits(t, budget, host_budget)
        lo, hi = 0, start
        while hi <= limit and fits(hi):
            lo, hi = hi, hi * 2
        if lo == 0:  # not even ``start``: look below it
            t = start // 2
            while t >= 128 and not fits(t):
                t //= 2
            if t < 128:
                return 0
            lo, hi = t, t * 2
        if hi > limit:
            return lo
        while hi - lo > max(256, lo // 32):
            mid = (lo + hi) // 2 // 128 * 128
            if mid <= lo:
                break
            if fits(mid):
                lo = mid
            else:
                hi = mid
        return lo


@dataclasses.dataclass
class VariantPlan:
    variant: str
    seq_len: int
    peak_bytes: int  # modeled tensor peak (no reserve)
    fits: bool | None  # peak + reserve <= gpu memory (and host bytes <= host memory, if given)
    breakdown: dict[str, int]
    host_bytes: int
    max_context: int | None
    max_context_host_bytes: int | None
    limited_by: str | None  # "gpu" or "host": which budget stopped the search; "search cap" if nothing did
    seconds: float
    steps_run: int
    notes: list[str]
    speed: dict | None = None  # modeled (roofline) step time on --gpu: a speed_model.SpeedEstimate as a dict


def tensor_budget(gpu_memory: int | None, reserve: int) -> int | None:
    """GPU bytes left for tensors once ``reserve`` (CUDA context, workspaces, allocator slack) is set aside."""
    if gpu_memory is None:
        return None
    if reserve >= gpu_memory:
        raise ValueError(f"--reserve ({format_bytes(reserve)}) leaves nothing of --gpu-memory ({format_bytes(gpu_memory)})")
    return gpu_memory - reserve


def plan_variant(
    config: Any,
    spec: StepSpec,
    seq_len: int,
    batch_size: int,
    budget: int | None,
    host_budget: int | None = None,
    planner: Planner | None = None,
    gpu: speed_model.GPU | None = None,
    train_tokens: int | None = None,
) -> VariantPlan:
    """Model ``seq_len`` and, given a tensor ``budget`` (bytes, reserve already taken off), search the max context;
    given a ``gpu``, the modeled (roofline) step time there (and the time for ``train_tokens``)."""
    t0 = time.perf_counter()
    planner = planner or Planner(config, spec, batch_size)
    result = planner.step(seq_len)
    best = host = limited = None
    if budget is not None:
        best = planner.max_context(budget, host_budget)
        host = planner.step(best).host_bytes if best else 0
        above = [t for t in planner.cache if t > best]
        if not above:
            limited = "search cap"  # even the longest length searched fits: the answer is a lower bound
        elif planner.step(min(above)).peak_bytes <= budget:
            limited = "host"
        else:
            limited = "gpu"
    fits = None if budget is None else planner.fits(seq_len, budget, host_budget)
    speed = None
    if gpu is not None:
        estimate = speed_model.roofline(planner.count(seq_len), gpu, seq_len * batch_size)
        speed = dataclasses.asdict(estimate)
        if train_tokens is not None:
            steps, seconds = speed_model.training_time(estimate.step_seconds, seq_len * batch_size, train_tokens)
            speed["train"] = {"tokens": train_tokens, "steps": steps, "seconds": seconds}
    return VariantPlan(
        spec.variant,
        seq_len,
        result.peak_bytes,
        fits,
        result.breakdown,
        result.host_bytes,
        best,
        host,
        limited,
        time.perf_counter() - t0,
        len(planner.cache),
        result.notes,
        speed,
    )


def _print_speed(p: VariantPlan) -> None:
    s = p.speed
    if not s:
        return
    print(
        f"{s['label']} step time on {s['gpu']}: {s['step_seconds']:.3g} s/step, {s['tokens_per_s']:,.0f} tokens/s "
        f"({s['flops'] / 1e12:,.1f} TFLOP, {s['bytes'] / 1e9:,.1f} GB moved, {s['launches']:,} kernel launches)"
    )
    print(
        f"  compute-bound ops {s['compute_bound_seconds']:.3g} s + memory-bound ops {s['memory_bound_seconds']:.3g} s "
        f"+ launch overhead {s['overhead_seconds']:.3g} s ({s['launch_overhead_s'] * 1e6:.0f} us each)"
    )
    top = ", ".join(f"{o['op']} {o['seconds'] / s['step_seconds']:.0%}" for o in s["top_ops"][:4])
    print(f"  largest shares: {top}")
    if "train" in s:
        t = s["train"]
        print(
            f"{s['label']} time to train {t['tokens']:,} tokens on {s['gpu']}: "
            f"{speed_model.format_duration(t['seconds'])} ({t['steps']:,} steps)"
        )
    for note in s["notes"]:
        print(f"  note: {note}")


def _print_plan(
    p: VariantPlan,
    args: argparse.Namespace,
    gpu_memory: int | None,
    reserve: int,
    host_budget: int | None,
    max_positions: int | None,
    embedding_bytes: int,
) -> None:
    title = {
        "fastft": "fastft",
        "unpatched": "fastft, UNPATCHED: no fastft kernels apply to this architecture",
        "baseline": "baseline: transformers + PEFT LoRA (standard checkpointing)",
    }[p.variant]
    print(f"\n== {title} ==")
    verdict = "" if p.fits is None else ("  -> fits" if p.fits else "  -> DOES NOT FIT")
    with_reserve = f" (+ {format_bytes(reserve)} reserve = {format_bytes(p.peak_bytes + reserve)})" if reserve else ""
    print(
        f"modeled peak GPU memory at {p.seq_len:,} tokens x batch {args.batch_size}: "
        f"{format_bytes(p.peak_bytes)}{with_reserve}{verdict}"
    )
    for phase in list(PHASE_LABELS) + sorted(set(p.breakdown) - set(PHASE_LABELS)):
        if p.breakdown.get(phase, 0) >= 5 * 10**6:  # rows under 5 MB are noise at this precision
            print(f"  {PHASE_LABELS.get(phase, phase):<48} {format_bytes(p.breakdown[phase]):>10}")
    if p.host_bytes:
        print(f"  host RAM for offloaded tensors (not GPU)          {format_bytes(p.host_bytes):>10}")
    if gpu_memory is not None:
        where = f"{format_bytes(gpu_memory)} GPU" + (f" and {format_bytes(host_budget)} host RAM" if host_budget else "")
        if p.max_context:
            extra = f" (host RAM for offload: {format_bytes(p.max_context_host_bytes)})" if p.max_context_host_bytes else ""
            bound = {"host": "; limited by host RAM", "search cap": " (at least: the search stops there)"}.get(
                p.limited_by, ""
            )
            print(f"largest sequence length that fits {where}: {p.max_context:,} tokens{extra}{bound}")
            if max_positions and p.max_context > max_positions:
                print(
                    f"  note: beyond the model's max_position_embeddings ({max_positions:,}); memory would allow "
                    "it, the model was not trained for it"
                )
        else:
            print(f"largest sequence length that fits {where}: none (even 128 tokens exceeds it)")
    _print_speed(p)
    for note in p.notes:
        print(f"  note: {note}")
    if p.variant == "fastft" and args.tiled_mlp is None and p.seq_len > 4096:
        print(
            "  tip: --tiled-mlp (from_pretrained(tiled_mlp=True)) runs each MLP in 4,096-token tiles, so its "
            "[tokens, intermediate] activations never exist whole; costs one extra MLP forward per layer in the "
            "backward, for sequences longer than a tile only"
        )
    if p.variant != "baseline" and not args.offload_embeddings and embedding_bytes:
        print(
            f"  tip: --offload-embeddings (get_peft_model(offload_embeddings=True)) keeps the frozen input embedding "
            f"in host RAM: {format_bytes(embedding_bytes)} less GPU memory"
        )
    print(f"  ({p.steps_run} modeled steps in {p.seconds:.1f} s)")


def add_parser(sub: Any) -> None:
    parser = sub.add_parser(
        "plan",
        help="modeled peak GPU memory and max sequence length for a LoRA/QLoRA run",
        description=__doc__.split("\n")[0],
    )
    parser.add_argument(
        "--model", required=True, help=f"local model dir, config.json, or one of: {', '.join(known_models())}"
    )
    parser.add_argument("--seq-len", type=int, default=8192)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--lora-r", type=int, default=16)
    parser.add_argument("--lora-alpha", type=float, default=None)
    parser.add_argument("--load-in-4bit", action="store_true")
    parser.add_argument(
        "--target-modules",
        nargs="+",
        default=None,
        metavar="NAME",
        help="LoRA target modules (default: FastModel's, every q/k/v/o/gate/up/down projection present)",
    )
    parser.add_argument("--optim", default="adamw", choices=["adamw", "adamw_8bit", "sgd"])
    parser.add_argument(
        "--gpu-memory",
        default=None,
        help="e.g. 16GB, 16GiB, 16000MB (a unit is required), or a GPU "
        f"name: {', '.join(GPU_PRESETS)}; enables the max-length search",
    )
    parser.add_argument(
        "--gpu",
        default=None,
        metavar="NAME",
        help="modeled (roofline) step time and tokens/s on this "
        f"GPU: {', '.join(speed_model.GPUS)}; also its memory unless --gpu-memory is given",
    )
    parser.add_argument(
        "--tokens", default=None, metavar="N", help="with a GPU: the modeled time to train N tokens (e.g. 1e9, 500M, 2B)"
    )
    parser.add_argument(
        "--reserve",
        default="1GiB",
        help="GPU memory set aside for the CUDA context, workspaces and "
        "allocator slack before tensors (default 1GiB; 0 for the tensor-only answer)",
    )
    parser.add_argument(
        "--host-memory",
        default=None,
        help="host RAM free for offloaded tensors, with a unit, e.g. 9GB "
        "on a free Colab (12.7 GB total, of which the process itself takes a few); bounds the search",
    )
    parser.add_argument(
        "--offload-embeddings",
        action="store_true",
        help="fastft variant with the frozen input embedding in host memory (get_peft_model(offload_embeddings=True))",
    )
    parser.add_argument("--no-offload", action="store_true", help="fastft variant without CPU offload of checkpoints")
    parser.add_argument(
        "--tiled-mlp",
        nargs="?",
        type=int,
        const=4096,
        default=None,
        metavar="TOKENS",
        help="fastft variant with the sequence-tiled MLP (FastModel.from_pretrained(tiled_mlp=True); "
        "tiles of TOKENS, default 4096, used for sequences longer than that)",
    )
    parser.add_argument("--baseline", action="store_true", help="also model plain transformers + PEFT")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    parser.set_defaults(func=run_plan)


def run_plan(args: argparse.Namespace) -> int:
    try:
        gpu, train_tokens = speed_gpu(args)
        gpu_memory = parse_gpu_memory(args.gpu_memory) if args.gpu_memory is not None else None
        if gpu is not None and args.gpu is not None and gpu_memory is None:
            gpu_memory = gpu.memory_bytes
        reserve = parse_size(args.reserve, "--reserve")
        host_budget = parse_size(args.host_memory, "--host-memory") if args.host_memory is not None else None
        budget = tensor_budget(gpu_memory, reserve)
        config = load_config(args.model)
        if args.seq_len < 1 or args.batch_size < 1 or args.lora_r < 0:
            raise ValueError("--seq-len and --batch-size must be >= 1, --lora-r >= 0")
        unpatched = unpatched_reason(config)
        if unpatched and args.tiled_mlp is not None:
            raise ValueError(
                f"--tiled-mlp: the tiled MLP is one of fastft's architecture patches, and none apply here ({unpatched})"
            )
        targets, targets_note = lora_targets(config, args.target_modules)
    except ValueError as exc:
        print(f"fastft plan: error: {exc}", file=sys.stderr)
        return 2
    common = dict(
        load_in_4bit=args.load_in_4bit,
        lora_r=args.lora_r,
        lora_alpha=args.lora_alpha,
        optim=args.optim,
        target_modules=targets,
    )
    if args.tiled_mlp is not None and args.tiled_mlp < 1:
        print("fastft plan: error: --tiled-mlp TOKENS must be >= 1", file=sys.stderr)
        return 2
    tiled: bool | int = False if args.tiled_mlp is None else args.tiled_mlp
    specs = [
        StepSpec(
            variant="unpatched" if unpatched else "fastft",
            offload=False if args.no_offload else None,
            tiled_mlp=tiled,
            offload_embeddings=args.offload_embeddings,
            **common,
        )
    ]
    if args.baseline:
        specs.append(StepSpec(variant="baseline", **common))
    plans = [
        plan_variant(config, spec, args.seq_len, args.batch_size, budget, host_budget, gpu=gpu, train_tokens=train_tokens)
        for spec in specs
    ]
    max_positions = getattr(config, "max_position_embeddings", None)
    if args.json:
        print(
            json.dumps(
                {
                    "model": args.model,
                    "modeled": True,
                    "model_type": config.model_type,
                    "architecture_supported": unpatched is None,
                    "unpatched_reason": unpatched,
                    "lora_target_modules": list(targets),
                    "gpu_memory_bytes": gpu_memory,
                    "reserve_bytes": reserve,
                    "tensor_budget_bytes": budget,
                    "host_memory_bytes": host_budget,
                    "max_position_embeddings": max_positions,
                    "settings": {k: v for k, v in vars(args).items() if k != "func"},
                    "variants": [dataclasses.asdict(p) for p in plans],
                },
                indent=2,
            )
        )
        return 0
    print(
        f"fastft plan (MODELED on meta tensors, not measured on a GPU): {args.model}, "
        f"{'4-bit QLoRA' if args.load_in_4bit else 'bf16 LoRA'} r={args.lora_r}, optim={args.optim}"
    )
    if unpatched:
        print(
            f"UNPATCHED: {unpatched}. Modeled that way: the model's own forward with full logits, PEFT LoRA, and "
            "fastft's checkpointing (layer inputs offloaded to host memory), which does not depend on the table"
        )
    if targets_note:
        print(f"LoRA targets: {targets_note}")
    if gpu_memory is not None:
        print(
            f"GPU memory {format_bytes(gpu_memory)} ({gpu_memory / 2**30:.2f} GiB) - reserve {format_bytes(reserve)} "
            f"(CUDA context, workspaces, allocator slack) = {format_bytes(budget)} for tensors"
        )
    if host_budget is not None:
        print(
            f"host RAM for offloaded tensors: {format_bytes(host_budget)} (what is free for them, not the machine "
            "total: the training process itself also needs a few GB)"
        )
    # bf16 input embedding that --offload-embeddings could move (0 when tied to the LM head: it cannot move)
    tied = getattr(config, "tie_word_embeddings", False)
    embedding_bytes = 0 if tied else config.vocab_size * config.hidden_size * 2
    for p in plans:
        _print_plan(p, args, gpu_memory, reserve, host_budget, max_positions, embedding_bytes)
    if gpu is not None:
        _print_speedup(plans, gpu)
    return 0


def speed_gpu(args: argparse.Namespace) -> tuple[speed_model.GPU | None, int | None]:
    """(the GPU whose roofline to print, the --tokens count): --gpu NAME, else a --gpu-memory that names a GPU."""
    gpu = speed_model.find_gpu(args.gpu) if args.gpu is not None else None
    if (
        gpu is None
        and args.gpu_memory is not None
        and str(args.gpu_memory).strip().lower() in {k.lower() for k in speed_model.GPUS}
    ):
        gpu = speed_model.find_gpu(args.gpu_memory, "--gpu-memory")
    tokens = parse_tokens(args.tokens) if args.tokens is not None else None
    if tokens is not None and gpu is None:
        raise ValueError(
            f"--tokens {args.tokens}: the time to train depends on the GPU; add --gpu NAME ({', '.join(speed_model.GPUS)})"
        )
    return gpu, tokens


def _print_speedup(plans: list[VariantPlan], gpu: speed_model.GPU) -> None:
    by_variant = {p.variant: p.speed for p in plans if p.speed}
    fast = by_variant.get("fastft") or by_variant.get("unpatched")
    base = by_variant.get("baseline")
    print()
    if fast and base:
        print(
            f"{speed_model.LABEL} speedup over the baseline on {gpu.name}: "
            f"{base['step_seconds'] / fast['step_seconds']:.2f}x ({fast['tokens_per_s']:,.0f} vs "
            f"{base['tokens_per_s']:,.0f} tokens/s); a bound from published peaks, not a measurement"
        )
    else:
        print(
            f"({speed_model.LABEL} figures are bounds from published peaks, not measurements; add --baseline for "
            "the modeled speedup over transformers + PEFT)"
        )
