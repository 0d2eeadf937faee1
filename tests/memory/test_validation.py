"""The memory model's core claim: the step modelled on meta tensors peaks where the real step does.

Same model, same training step, once on real CPU tensors (attention and NF4 dequant computing real values) and once
on meta tensors; LiveBytesTracker's measured peak must agree within 5%.

fastft's fused kernels are validated under the Triton interpreter (``test_fused_kernels_meta_vs_interpreter``): on plain
CPU they take their torch path, whose fp32 temporaries the GPU kernels do not allocate, so the like-for-like real run is
the interpreter. (The interpreter keeps launched tensors in reference cycles; the tracker collects them after each
fastft op, see fastft/memory/tracker.py -- without that the real run measured 7.6% above the model.)
"""

import pytest

from fastft.kernels import _launch
from fastft.memory.step_model import StepModel, StepSpec
from tests.memory._configs import tiny_llama

CASES = [
    ("fastft", True, "adamw"),
    ("fastft", False, "adamw_8bit"),
    ("baseline", True, "adamw"),
    ("baseline", False, "adamw"),
]


def _compare(spec: StepSpec, tokens: int, layers: int = 2):
    cfg = tiny_llama(layers=layers)
    real = StepModel(cfg, spec, device="cpu").step(tokens)
    modeled = StepModel(cfg, spec, device="meta").step(tokens)
    return real, modeled


@pytest.mark.parametrize("variant,load_in_4bit,optim", CASES)
def test_meta_peak_matches_real_cpu_peak(variant, load_in_4bit, optim):
    # fused_kernels=False: chunked LCE, offloaded checkpointing, flash attention model, 4-bit layers, optimizers.
    spec = StepSpec(variant=variant, lora_r=8, load_in_4bit=load_in_4bit, optim=optim, fused_kernels=False)
    real, modeled = _compare(spec, tokens=192)
    assert real.peak_bytes > 0
    assert abs(modeled.peak_bytes - real.peak_bytes) <= 0.05 * real.peak_bytes, (modeled.peak_bytes, real.peak_bytes,
                                                                                  modeled.breakdown, real.breakdown)
    assert modeled.host_bytes == real.host_bytes


@pytest.mark.parametrize("options", [{}, {"tiled_mlp": 32, "offload_embeddings": True}], ids=["default", "tiled+emb"])
def test_fused_kernels_meta_vs_interpreter(options):
    assert _launch.INTERPRETER, "tests/conftest.py sets TRITON_INTERPRET=1 before triton is imported"
    spec = StepSpec(variant="fastft", lora_r=8, load_in_4bit=True, optim="adamw", **options)
    _launch.path_counts.clear()
    real, modeled = _compare(spec, tokens=96)
    ran = {op for (op, path), n in _launch.path_counts.items() if path == "triton" and n}
    # fused LoRA MLP (in-place GLU backward, NF4 dequantized by fastft), norms and RoPE
    kernels = {"rms_norm", "rms_norm_backward", "rope", "rope_backward", "swiglu", "glu_backward_inplace",
               "dequantize_nf4"}
    assert kernels <= ran, ran  # the fused kernels really ran in the real step
    assert abs(modeled.peak_bytes - real.peak_bytes) <= 0.05 * real.peak_bytes, (modeled.peak_bytes, real.peak_bytes,
                                                                                  modeled.breakdown, real.breakdown)
    assert modeled.host_bytes == real.host_bytes
