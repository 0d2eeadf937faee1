"""``fastft.kernels.chunk_loop_in_place``: the memory models' way to run the LM-head chunk loop itself on meta tensors
(the custom op's fake impl models only its outputs). Outside the block the op runs; inside, the loop, whose [C, V]
logits chunk the tracker then sees, with the per-chunk softmax's launches handed to the hook."""

import contextlib

import pytest
import torch

from fastft.kernels import TRITON_AVAILABLE, chunk_loop_in_place, linear_cross_entropy, selective_log_softmax
from fastft.kernels.linear_cross_entropy import chunk_counts
from fastft.memory import LiveBytesTracker

N, H, V, CHUNK = 64, 16, 1000, 16


def _meta_inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    hidden = torch.empty(1, N, H, device="meta", requires_grad=True)
    weight = torch.empty(V, H, device="meta")
    labels = torch.empty(1, N, device="meta", dtype=torch.long)
    return hidden, weight, labels


def _peak_and_chunks(op, hook_block) -> tuple[int, int]:
    hidden, weight, labels = _meta_inputs()
    before = chunk_counts["chunks"]
    with hook_block, LiveBytesTracker() as tracker:
        out = op(hidden, weight, labels, chunk_size=CHUNK)
        out.sum().backward()
    return tracker.peak_bytes, chunk_counts["chunks"] - before


# passes over the chunks: the mean loss takes its gradients in the forward; per-token log-probs recompute in backward
@pytest.mark.parametrize(("op", "passes"), [(linear_cross_entropy, 1), (selective_log_softmax, 2)], ids=["lce", "sls"])
def test_loop_runs_in_place_only_inside_the_block(op, passes):
    peak_op, chunks_op = _peak_and_chunks(op, contextlib.nullcontext())
    # launches dropped: the interpreter (tests/conftest.py) cannot run a kernel on meta tensors
    peak_loop, chunks_loop = _peak_and_chunks(op, chunk_loop_in_place(lambda kernel, grid, args, kwargs: None))
    assert chunks_op == 0, "on meta the custom op's fake impl runs: no chunk of the loop"
    assert chunks_loop == passes * N // CHUNK
    # the loop's fp32 [CHUNK, V] logits chunk is live at the peak; the fake impl allocates outputs only
    assert peak_loop >= CHUNK * V * 4 > peak_op
    assert _peak_and_chunks(op, contextlib.nullcontext())[1] == 0, "the op is back after the block"


@pytest.mark.skipif(not TRITON_AVAILABLE, reason="the hook receives Triton launches; without triton none happen")
def test_hook_gets_the_softmax_launches_and_blocks_nest():
    outer, inner = [], []
    hidden, weight, labels = _meta_inputs()
    with chunk_loop_in_place(lambda kernel, grid, args, kwargs: outer.append(kernel)):
        with chunk_loop_in_place(lambda kernel, grid, args, kwargs: inner.append(kernel)):
            linear_cross_entropy(hidden, weight, labels, chunk_size=CHUNK).backward()
        n_inner, n_outer = len(inner), len(outer)
        linear_cross_entropy(hidden, weight, labels, chunk_size=CHUNK).backward()
    assert n_inner >= N // CHUNK, "one softmax-stats launch per chunk at least"
    assert n_outer == 0, "the innermost hook gets the launches"
    assert len(inner) == n_inner and len(outer) == n_inner, "the outer hook is back once the inner block closes"
