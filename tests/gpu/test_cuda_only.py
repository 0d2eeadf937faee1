"""What only a CUDA GPU can test: the offloaded checkpoint's side stream and pinned host buffers, the embedding
offload's host hop, and ``torch.cuda.max_memory_allocated`` against the meta-tensor memory model.

CUDA-only (``FASTFT_TEST_DEVICE=cuda``); on CPU these collect and skip with the reason.
"""

import pytest
import torch
from torch import nn

from fastft.patches import checkpointing
from fastft.patches.checkpointing import offloaded_checkpoint

pytestmark = pytest.mark.cuda


class _Block(nn.Module):
    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.up = nn.Linear(hidden, 4 * hidden)
        self.down = nn.Linear(4 * hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(torch.nn.functional.dropout(torch.nn.functional.gelu(self.up(x)), 0.1))


def test_offloaded_checkpoint_uses_pinned_host_buffers_and_a_side_stream():
    torch.manual_seed(0)
    blocks = nn.ModuleList(_Block(1024) for _ in range(4)).cuda()
    x = torch.randn(8, 512, 1024, device="cuda", requires_grad=True)

    def run(checkpointed: bool):
        torch.manual_seed(1)  # same dropout masks: the recompute must restore the CUDA RNG state
        h = x
        for block in blocks:
            h = offloaded_checkpoint(block, h) if checkpointed else block(h)
        return torch.autograd.grad(h.square().mean(), [x, *blocks.parameters()])

    expected = run(False)
    checkpointing._PREFETCHERS.clear()
    before = torch.cuda.memory_allocated()
    torch.manual_seed(1)
    h = x
    for block in blocks:
        h = offloaded_checkpoint(block, h)
    prefetcher = checkpointing._PREFETCHERS[torch.cuda.current_device()]
    hosts = [slot[0] for slot in prefetcher._slots]
    assert len(hosts) == 4 and all(t.device.type == "cpu" and t.is_pinned() for t in hosts)
    assert prefetcher.stream is not None and prefetcher.stream != torch.cuda.current_stream()
    # the layer inputs live on the host: what stays on the GPU is about the final output, not 4 saved inputs
    held = torch.cuda.memory_allocated() - before
    assert held < 2.5 * h.numel() * h.element_size(), held
    got = torch.autograd.grad(h.square().mean(), [x, *blocks.parameters()])
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert prefetcher._slots == []  # every buffer handed back


def test_embedding_offload_keeps_weight_on_host_and_output_on_gpu():
    from fastft.offline import build_tiny_model
    from fastft.patches.embedding_offload import HostEmbedding, offload_input_embeddings

    model = build_tiny_model("llama").cuda()
    model.config.tie_word_embeddings = False
    ids = torch.randint(0, model.config.vocab_size, (2, 33), device="cuda")
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    reason = offload_input_embeddings(model)
    if model.get_input_embeddings().weight.data_ptr() == model.get_output_embeddings().weight.data_ptr():
        assert reason is not None  # tied: refused, with a reason
        return
    assert reason is None, reason
    emb = model.get_input_embeddings()
    assert isinstance(emb, HostEmbedding) and emb.weight.device.type == "cpu"
    assert all(p.is_cuda for p in model.parameters())
    with torch.no_grad():
        got = model(input_ids=ids).logits
    assert got.is_cuda
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("variant", ["fastft", "baseline"])
@pytest.mark.parametrize("tokens", [1024, 2048])
def test_memory_model_peak_within_5_percent_of_cuda_peak(variant, tokens):
    """The meta-tensor step model's peak vs ``torch.cuda.max_memory_allocated`` of the same step run for real on a
    ~1B Llama-shaped config (random weights, bf16, 4-bit LoRA r16)."""
    from transformers import LlamaConfig

    from fastft.memory.step_model import StepModel, StepSpec

    cfg = LlamaConfig(
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=64,
        vocab_size=128256,
        max_position_embeddings=8192,
        tie_word_embeddings=False,
        rms_norm_eps=1e-5,
    )
    spec = StepSpec(variant=variant, lora_r=16, load_in_4bit=True, optim="adamw")
    modeled = StepModel(cfg, spec, device="meta").step(tokens)
    torch.cuda.empty_cache()
    real_model = StepModel(cfg, spec, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    resident = torch.cuda.memory_allocated()
    real_model.step(tokens)
    torch.cuda.synchronize()
    measured = torch.cuda.max_memory_allocated()
    assert modeled.peak_bytes > resident * 0.5
    assert abs(modeled.peak_bytes - measured) <= 0.05 * measured, (
        f"modeled {modeled.peak_bytes / 2**30:.3f} GiB vs measured {measured / 2**30:.3f} GiB "
        f"(resident before the step {resident / 2**30:.3f} GiB); breakdown {modeled.breakdown}"
    )


def test_fp16_gradscaler_step_as_on_a_t4(tmp_path):
    """A T4 (sm_75) has no bf16: its users train under fp16 autocast with a GradScaler. A FastModel LoRA step there
    must run fastft's compiled kernels, never make a bf16 tensor (sm_75 has no bf16 math), keep the scaler stepping
    (finite scaled grads), and give per-step losses within fp16 rounding of the same model's fp32 run."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from fastft import FastModel
    from fastft.kernels import path_counts
    from fastft.offline import build_tiny_model

    model_dir = tmp_path / "llama"
    build_tiny_model("llama").save_pretrained(model_dir)
    torch.manual_seed(0)
    ids = torch.randint(3, 200, (2, 64), device="cuda")

    class NoBf16(TorchDispatchMode):
        seen: set = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor) and t.dtype == torch.bfloat16:
                    NoBf16.seen.add(str(func))
            return out

    def losses(model: nn.Module, fp16: bool) -> list[float]:
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        scaler = torch.amp.GradScaler("cuda", enabled=fp16)
        out = []
        for _ in range(3):
            with torch.autocast("cuda", dtype=torch.float16, enabled=fp16):
                loss = model(input_ids=ids, labels=ids).loss
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            opt.zero_grad(set_to_none=True)
            out.append(loss.item())
        if fp16:
            assert scaler.get_scale() >= 2.0**16, "the scaler skipped a step: a non-finite scaled gradient"
        return out

    def fast_model() -> nn.Module:
        model, _ = FastModel.from_pretrained(str(model_dir), dtype=torch.float32, device_map="cuda")
        return FastModel.get_peft_model(model, r=8, lora_alpha=16, use_gradient_checkpointing=False)

    expected = losses(fast_model(), fp16=False)  # same init (random_state), fp32: the kernels' fp32 parity is tested
    model = fast_model()
    before = dict(path_counts)
    with NoBf16():
        got = losses(model, fp16=True)
    assert not NoBf16.seen, f"bf16 tensors under fp16 autocast (sm_75 has no bf16): {sorted(NoBf16.seen)}"
    ran = {op for (op, path), n in path_counts.items() if path == "triton" and n > before.get((op, path), 0)}
    assert {"rms_norm", "rope"} <= ran, ran
    torch.testing.assert_close(torch.tensor(got), torch.tensor(expected), rtol=2e-2, atol=2e-2)
