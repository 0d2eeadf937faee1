"""SFT's token metrics and label smoothing inside the fused loss pass.

* The loss-only fast head (what SFT runs) computes ``entropy`` and ``is_top1`` (``mean_token_accuracy``) from the
  loss's own logits chunks: a TorchDispatchMode counts the GEMMs that read the LM-head weight and finds exactly one
  logits GEMM per chunk (forward and backward together), and the metrics equal those of the model's full logits.
* SFT with ``label_smoothing_factor`` runs the fused loss (no fallback to full logits) and matches TRL's run. On TRL
  1.14 (no fused-head hook) TRL's code runs: its default ``chunked_nll`` loss fails with a label smoother, patched or
  not (fastft says why), and with ``loss_type="nll"`` both runs match.
"""

import importlib
import types

import pytest
import torch
import trl.trainer.utils
from torch.utils._python_dispatch import TorchDispatchMode

from fastft._log import mark, notes_since
from fastft.kernels import force_path
from fastft.memory.tracker import _custom_op_impl
from fastft.offline import build_tiny_model
from fastft.patches.trl import LOSS_ONLY, _make_fast_forward
from tests.trl._common import assert_head_calls, assert_same_run, common_args, fused_head_available, run
from tests.trl.test_sft import PROMPT_COMPLETION, make_sft_trainer

lce_module = importlib.import_module("fastft.kernels.linear_cross_entropy")  # the module, not the function
add_fused_lm_head = getattr(trl.trainer.utils, "add_fused_lm_head", None)
_GEMMS = {
    torch.ops.aten.mm.default,
    torch.ops.aten.addmm.default,
    torch.ops.aten.addmm_.default,
    torch.ops.aten.mm.out,
    torch.ops.aten.linear.default,
    torch.ops.aten.matmul.default,
}


class HeadGemmCounter(TorchDispatchMode):
    """Records the output shape of every matmul that reads the LM-head weight's storage."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.ptr = weight.untyped_storage().data_ptr()
        self.shapes: list[tuple[int, ...]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "fastft":  # re-enter fastft's custom ops so the GEMMs inside them are seen
            with self:
                return _custom_op_impl(func, args, kwargs or {})
        out = func(*args, **(kwargs or {}))
        if func in _GEMMS:
            tensors = [a for a in (*args, *(kwargs or {}).values()) if isinstance(a, torch.Tensor)]
            if any(t.untyped_storage().data_ptr() == self.ptr for t in tensors):
                self.shapes.append(tuple(out.shape))
        return out


@pytest.mark.skipif(add_fused_lm_head is None, reason="TRL < 1.15 has no fused LM head")
@pytest.mark.parametrize("path", ["triton", "torch"])
@pytest.mark.parametrize("model_type", ["llama", "gemma2"])  # gemma2: tied embeddings + final-logit softcap
def test_sft_metrics_cost_one_lm_head_gemm_per_chunk(model_type, path, monkeypatch):
    model = build_tiny_model(model_type)
    add_fused_lm_head(model, temperature=1.0, outputs=("log_probs", "entropy", "is_top1"))  # as SFTTrainer does
    fast = types.MethodType(
        _make_fast_forward(model.forward, temperature=1.0, outputs=("entropy", "is_top1"), cast_fp32=False), model
    )
    torch.manual_seed(1)
    ids = torch.randint(5, model.config.vocab_size, (2, 12))
    labels = ids.clone()
    labels[:, :3] = -100
    labels[1, 10:] = -100
    n_valid = int((labels[:, 1:] != -100).sum())  # 17 scored tokens
    chunk = 4
    monkeypatch.setattr(lce_module, "choose_chunk_size", lambda *a, **k: chunk)
    n_chunks = -(-n_valid // chunk)
    weight = model.get_output_embeddings().weight
    vocab = weight.shape[0]
    before = lce_module.chunk_counts["chunks"]
    with force_path(path), HeadGemmCounter(weight) as counter:
        out = fast(input_ids=ids, labels=labels, fused_lm_head=LOSS_ONLY)
        out.loss.backward()
    logits_gemms = [s for s in counter.shapes if s[-1] == vocab and s[0] != vocab]
    assert lce_module.chunk_counts["chunks"] - before == n_chunks
    # one logits GEMM per chunk, metrics on; the only other GEMM reading the head is each chunk's dhidden (dweight
    # reads the chunk's dlogits and hidden states, not the weight)
    assert len(logits_gemms) == n_chunks, counter.shapes
    assert len(counter.shapes) == 2 * n_chunks, counter.shapes

    # the metrics equal the ones from the model's full logits (the old extra-pass definition)
    with torch.no_grad():
        logits = _full_logits(model, ids)
    z, y = logits[:, :-1].float(), labels[:, 1:]
    mask = y != -100
    log_p = z.log_softmax(-1)
    assert torch.equal(out.label_mask, mask)
    assert torch.equal(out.is_top1, (z.argmax(-1) == y) & mask)
    torch.testing.assert_close(out.entropy, torch.where(mask, -(log_p.exp() * log_p).sum(-1), 0.0), rtol=1e-5, atol=1e-5)
    nll = -log_p.gather(-1, y.clamp(min=0)[..., None])[..., 0]
    torch.testing.assert_close(out.loss, (nll * mask).sum() / mask.sum(), rtol=1e-5, atol=1e-6)


def _full_logits(model, ids):
    """The model's own logits (softcap included), through the plain transformers forward."""
    return type(model).forward(model, input_ids=ids).logits


@pytest.mark.filterwarnings("ignore:`label_smoothing_factor` is deprecated")
def test_sft_label_smoothing_runs_the_fused_loss_and_matches_trl(tmp_path, monkeypatch):
    calls = []
    original = lce_module.linear_cross_entropy

    def counting(*args, **kwargs):
        calls.append(kwargs.get("label_smoothing"))
        return original(*args, **kwargs)

    import fastft.kernels

    monkeypatch.setattr(fastft.kernels, "linear_cross_entropy", counting)
    config = dict(completion_only_loss=True, label_smoothing_factor=0.1)
    if _default_sft_loss_type(tmp_path) == "chunked_nll":
        # TRL 1.14: its default chunked loss fails with a label smoother in TRL's own compute_loss (the smoother takes
        # the labels, TRL's chunked forward runs the plain one, TRL reads outputs.num_valid_tokens). Patched SFT fails
        # exactly as unpatched TRL does, and fastft says why once; with loss_type="nll" both train (below).
        since = mark()
        for patched in (False, True):
            with pytest.raises(AttributeError, match="num_valid_tokens"):
                run("SFT", patched, make_sft_trainer(PROMPT_COMPLETION, tmp_path=tmp_path / f"chunked-{patched}", **config))
        assert any("loss_type='chunked_nll'" in note and "loss_type='nll'" in note for note in notes_since(since)), (
            notes_since(since)
        )
        config["loss_type"] = "nll"
    fast, head_calls = run("SFT", True, make_sft_trainer(PROMPT_COMPLETION, tmp_path=tmp_path / "fast", **config))
    slow, _ = run("SFT", False, make_sft_trainer(PROMPT_COMPLETION, tmp_path=tmp_path / "slow", **config))
    assert_head_calls(head_calls, "linear_cross_entropy")
    if fused_head_available():
        assert calls and set(calls) == {0.1}, calls  # the smoothed fused loss ran, no full-logits fallback
    assert_same_run(fast, slow, ("loss", "grad_norm", "entropy", "mean_token_accuracy"))


def _default_sft_loss_type(tmp_path) -> str:
    from trl import SFTConfig

    return SFTConfig(**common_args(tmp_path / "probe")).loss_type  # the default this TRL picks
