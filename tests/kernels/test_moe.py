"""Fused expert MLP vs the transformers MoE block's own forward: output and every gradient (router and experts)."""

import pytest
import torch

from fastft.kernels import moe
from fastft.kernels._launch import path_counts
from tests.tolerances import BACKWARD, FORWARD, assert_close

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _block(family: str, dtype: torch.dtype) -> torch.nn.Module:
    torch.manual_seed(0)
    if family == "qwen3_moe":
        from transformers import Qwen3MoeConfig
        from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock as cls

        cfg = Qwen3MoeConfig(hidden_size=24, moe_intermediate_size=20, num_experts=5, num_experts_per_tok=2,
                             norm_topk_prob=True)  # fmt: skip
    elif family == "mixtral":
        from transformers import MixtralConfig
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock as cls

        cfg = MixtralConfig(hidden_size=24, intermediate_size=20, num_local_experts=5, num_experts_per_tok=2)
    else:
        from transformers import GptOssConfig
        from transformers.models.gpt_oss.modeling_gpt_oss import GptOssMLP as cls

        cfg = GptOssConfig(hidden_size=24, intermediate_size=20, num_local_experts=5, num_experts_per_tok=2)
    block = cls(cfg)
    with torch.no_grad():
        for p in block.parameters():  # the modules leave their weights torch.empty: give them real values
            p.copy_(torch.randn_like(p) * 0.3)
    return block.to(dtype)


def _run(block, x, forward):
    block.zero_grad()
    x = x.detach().clone().requires_grad_()
    out = forward(x)
    if isinstance(out, tuple):
        out = out[0]
    dy = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.dtype)
    out.backward(dy)
    return out.detach(), x.grad, {n: p.grad.clone() for n, p in block.named_parameters()}


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral", "gpt_oss"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_moe_matches_block_forward(family, dtype):
    block = _block(family, dtype)
    x = torch.randn(2, 13, 24).to(dtype)  # 26 tokens x 2 slots over 5 experts: uneven counts
    ref_out, ref_dx, ref_grads = _run(block, x, block)
    path_counts.clear()
    out, dx, grads = _run(block, x, lambda h: moe.fused_moe_forward(block, h))
    assert path_counts[("grouped_gemm", "triton")] == 2 and path_counts[("grouped_gemm_backward", "triton")] == 2
    assert_close(out, ref_out, FORWARD, dtype, "output")
    assert_close(dx, ref_dx, BACKWARD, dtype, "dx")
    assert set(grads) == set(ref_grads)
    for name, g in grads.items():
        assert ref_grads[name].abs().max() > 0, name
        assert_close(g, ref_grads[name], BACKWARD, dtype, name)


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])
def test_experts_with_zero_tokens(family):
    """Routing fixed by hand: experts 0 and 3 get no token, expert 1 gets most: vs the model's expert loop."""
    block = _block(family, torch.float32)
    x = torch.randn(9, 24)
    index = torch.tensor([[1, 2], [1, 4], [2, 1], [1, 4], [4, 1], [1, 2], [2, 4], [1, 2], [1, 4]])
    weights = torch.rand(9, 2)
    grads = []
    for forward in (block.experts, lambda *a: moe.fused_experts(block.experts, *a)):
        block.zero_grad()
        xi = x.clone().requires_grad_()
        wi = weights.clone().requires_grad_()
        out = forward(xi, index, wi)
        out.backward(torch.ones_like(out))
        grads.append((out.detach(), xi.grad, wi.grad, {n: p.grad.clone() for n, p in block.experts.named_parameters()}))
    (ref_out, ref_dx, ref_dw, ref_p), (out, dx, dw, p) = grads
    assert_close(out, ref_out, FORWARD, torch.float32)
    assert_close(dx, ref_dx, BACKWARD, torch.float32)
    assert_close(dw, ref_dw, BACKWARD, torch.float32)
    for name, g in p.items():
        assert g[[0, 3]].abs().max() == 0, name
        assert g[1].abs().max() > 0, name
        assert_close(g, ref_p[name], BACKWARD, torch.float32, name)


def test_unsupported_experts_error_is_clear():
    with pytest.raises(TypeError, match="lacks"):
        moe.expert_layout(torch.nn.Linear(2, 2))


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss"])
def test_torch_path_matches_block_forward(family):
    from fastft.kernels._launch import force_path

    block = _block(family, torch.float32)
    x = torch.randn(1, 11, 24)
    ref_out, ref_dx, ref_grads = _run(block, x, block)
    path_counts.clear()
    with force_path("torch"):
        out, dx, grads = _run(block, x, lambda h: moe.fused_moe_forward(block, h))
    assert path_counts[("grouped_gemm", "torch")] == 2 and path_counts[("grouped_gemm", "triton")] == 0
    assert_close(out, ref_out, FORWARD, torch.float32)
    assert_close(dx, ref_dx, BACKWARD, torch.float32)
    for name, g in grads.items():
        assert_close(g, ref_grads[name], BACKWARD, torch.float32, name)
