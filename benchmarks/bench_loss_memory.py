"""Peak live memory of the LM-head loss, forward + backward: fastft's chunked ops vs the full-logits baseline.

What is measured: ``fastft.memory.LiveBytesTracker`` (a TorchDispatchMode) counts the bytes of every tensor storage
created INSIDE the measured region (loss forward, ``.backward()``, gradients included) and reports the high-water
mark. ``hidden`` and ``weight`` exist before the region and are not counted; the weight gradient (when the lm_head
trains) and the hidden gradient are counted, since the region creates them.

Cases
    linear cross-entropy:  fastft.kernels.linear_cross_entropy(hidden, W, labels)
                           vs F.cross_entropy(hidden @ W.T, labels)
    selective log-softmax: fastft.kernels.selective_log_softmax(hidden, W, ids)       (GRPO/DPO per-token log-probs)
                           vs log_softmax(hidden @ W.T, -1).gather(-1, ids)
    each with the lm_head frozen (LoRA) and trainable.

How
    * "measured (cpu)": real fp32 CPU tensors, 4,096 tokens, hidden 1,024, vocab 128,256. This machine has no GPU and
      the Triton interpreter is off here, so fastft runs its plain-CPU torch path -- the same chunked memory algorithm
      the Triton path uses (chunk of logits, in-place gradient, dhidden/dweight accumulation), with the per-chunk
      softmax in torch instead of the Triton kernel. Bytes, not time, are the point: no timing is reported.
    * "modeled (meta)": the same code on meta tensors (no data, storages still sized), 16,384 tokens. fastft's op
      runs its chunk loop directly (the custom op's fake impl would only model its outputs, not the chunk inside).
      The 4,096-token meta run is printed next to the measured one to show the model reproduces the measurement.

Run: ``python benchmarks/bench_loss_memory.py`` (about 3-5 minutes on 1 CPU thread; needs ~9 GB of free RAM for the
baseline). ``--tokens N`` changes the measured size, ``--modeled-tokens N`` the modeled one.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import time

os.environ.pop("TRITON_INTERPRET", None)  # plain CPU path: the interpreter would run the kernels ~100x slower

import torch
import torch.nn.functional as F

from fastft.kernels import (
    INTERPRETER,
    chunk_loop_in_place,
    linear_cross_entropy,
    path_counts,
    selective_log_softmax,
)
from fastft.kernels.linear_cross_entropy import choose_chunk_size
from fastft.memory import LiveBytesTracker

GB = 1e9


def chunk_loop_on_meta(device: str) -> contextlib.AbstractContextManager:
    """On meta, run the chunk loop itself instead of the custom op's fake impl, so chunk temporaries are counted."""
    return chunk_loop_in_place() if device == "meta" else contextlib.nullcontext()


def measure(fn, hidden, weight, labels, train_weight: bool, device: str) -> int:
    hidden.grad = None
    weight.grad = None
    weight.requires_grad_(train_weight)
    gc.collect()
    with chunk_loop_on_meta(device), LiveBytesTracker() as tracker:
        out = fn(hidden, weight, labels)
        out.sum().backward() if out.dim() else out.backward()
        del out
    assert hidden.grad is not None and (weight.grad is not None) == train_weight
    hidden.grad = None
    weight.grad = None
    return tracker.peak_bytes


def baseline_ce(h, w, y):
    return F.cross_entropy((h @ w.T).view(-1, w.shape[0]), y.view(-1))


def fused_ce(h, w, y):
    return linear_cross_entropy(h, w, y)


def baseline_logp(h, w, ids):
    return torch.log_softmax(h @ w.T, dim=-1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)


def fused_logp(h, w, ids):
    return selective_log_softmax(h, w, ids)


def run(tokens: int, hidden_size: int, vocab: int, device: str) -> list[tuple]:
    torch.manual_seed(0)
    hidden = torch.randn(1, tokens, hidden_size, device=device).requires_grad_()
    weight = (
        (torch.randn(vocab, hidden_size, device=device) * 0.02)
        if device != "meta"
        else torch.empty(vocab, hidden_size, device=device)
    )
    labels = (
        torch.randint(0, vocab, (1, tokens), device=device)
        if device != "meta"
        else torch.empty(1, tokens, dtype=torch.long, device=device)
    )
    rows = []
    for name, base, fused in (
        ("linear_cross_entropy", baseline_ce, fused_ce),
        ("selective_log_softmax", baseline_logp, fused_logp),
    ):
        for train in (False, True):
            t0 = time.perf_counter()
            b = measure(base, hidden, weight, labels, train, device)
            f = measure(fused, hidden, weight, labels, train, device)
            rows.append((name, "trainable" if train else "frozen", tokens, device, b, f, time.perf_counter() - t0))
            print(
                f"  done: {name} {rows[-1][1]} {tokens} tokens on {device}: baseline {b / GB:.3f} GB, fastft "
                f"{f / GB:.3f} GB ({rows[-1][-1]:.0f} s)",
                flush=True,
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--modeled-tokens", type=int, default=16384)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--modeled-only", action="store_true", help="skip the real CPU run (meta tensors only)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    assert not INTERPRETER, "run without TRITON_INTERPRET: this measures the plain CPU path"
    chunk = choose_chunk_size(args.tokens, args.hidden, args.vocab, torch.float32, torch.device("cpu"))
    print(
        f"hidden={args.hidden} vocab={args.vocab} fp32; fastft chunk_size={chunk} tokens at {args.tokens} tokens "
        f"(logits chunk {chunk * args.vocab * 4 / 1e6:.1f} MB); weight gradient alone "
        f"{args.vocab * args.hidden * 4 / GB:.3f} GB; torch {torch.__version__}, {args.threads} thread(s)"
    )
    rows = []
    if not args.modeled_only:
        rows += run(args.tokens, args.hidden, args.vocab, "cpu")
        assert path_counts[("cross_entropy", "torch")] > 0 and path_counts[("cross_entropy", "triton")] == 0
    rows += run(args.tokens, args.hidden, args.vocab, "meta")
    rows += run(args.modeled_tokens, args.hidden, args.vocab, "meta")
    print(
        f"\n{'op':<22} {'lm_head':<10} {'tokens':>7} {'how':<15} {'baseline GB':>12} {'fastft GB':>10} "
        f"{'fastft/base':>12} {'goal':>6}"
    )
    for name, train, tokens, device, b, f, _secs in rows:
        how = "measured (cpu)" if device == "cpu" else "modeled (meta)"
        goal = ("<20%" if train == "trainable" else "<5%") if name == "linear_cross_entropy" else ""
        print(
            f"{name:<22} {train:<10} {tokens:>7} {how:<15} {b / GB:>12.3f} {f / GB:>10.3f} {100 * f / b:>11.2f}% {goal:>6}"
        )
    print(
        "\nbaseline = F.cross_entropy(hidden @ W.T) / log_softmax(hidden @ W.T).gather, forward + backward; "
        "peak live bytes created inside the region (LiveBytesTracker). CPU figures are CPU-path bytes, not GPU."
    )


if __name__ == "__main__":
    main()
