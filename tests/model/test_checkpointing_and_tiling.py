import pytest
import torch
from torch import nn

from fastft.patches.checkpointing import offloaded_checkpoint
from fastft.patches.tiled_mlp import tiled_mlp


class _Layer(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(16, 32)
        self.b = nn.Linear(32, 16)

    def forward(self, x, scale=1.0):
        return x + self.b(torch.tanh(self.a(x))) * scale


def test_offloaded_checkpoint_gradients_equal_plain_autograd():
    torch.manual_seed(0)
    layers = nn.ModuleList([_Layer() for _ in range(3)])
    x = torch.randn(2, 5, 16, requires_grad=True)

    def run(checkpointed):
        h = x
        for layer in layers:
            h = offloaded_checkpoint(layer, h, scale=0.5) if checkpointed else layer(h, scale=0.5)
        return h.square().sum()

    run(False).backward()
    ref = [p.grad.clone() for p in layers.parameters()] + [x.grad.clone()]
    layers.zero_grad()
    x.grad = None
    run(True).backward()
    got = [p.grad for p in layers.parameters()] + [x.grad]
    for g, r in zip(got, ref):
        torch.testing.assert_close(g, r)


def test_offloaded_checkpoint_recomputes_under_the_forward_autocast():
    # The Trainer's bf16 autocast wraps the forward only; the recompute in the backward must see it too.
    torch.manual_seed(0)
    layer = _Layer()
    seen = []

    def run(x):
        seen.append(torch.is_autocast_enabled("cpu"))
        return layer(x)

    x = torch.randn(2, 5, 16, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = layer(x)
    ref.float().square().sum().backward()
    ref_grads = [p.grad.clone() for p in layer.parameters()] + [x.grad.clone()]
    layer.zero_grad()
    x.grad = None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = offloaded_checkpoint(run, x)
    assert out.dtype == ref.dtype
    out.float().square().sum().backward()  # outside autocast, as in the Trainer
    assert seen == [True, True]  # forward and recompute
    for g, r in zip([p.grad for p in layer.parameters()] + [x.grad], ref_grads, strict=True):
        torch.testing.assert_close(g, r)


@pytest.mark.parametrize("tile", [1, 4, 7, 100])
def test_tiled_mlp_equals_untiled(tile):
    torch.manual_seed(0)
    mlp = _Layer()
    x = torch.randn(3, 9, 16, requires_grad=True)
    mlp(x).sum().backward()
    ref = [p.grad.clone() for p in mlp.parameters()] + [x.grad.clone()]
    mlp.zero_grad()
    x.grad = None
    out = tiled_mlp(mlp, x, tile)
    assert out.shape == (3, 9, 16)
    (out.sum()).backward()
    for g, r in zip([p.grad for p in mlp.parameters()] + [x.grad], ref):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-6)


def test_tiled_mlp_rejects_bad_tile():
    with pytest.raises(ValueError):
        tiled_mlp(_Layer(), torch.randn(2, 16), 0)
