"""The lean heads of PatchFastRL("ORPO" / "CPO" / "OnlineDPO") (fastft.patches.trl_preference) vs unpatched TRL.

Per trainer, a few steps on a tiny offline model, patched and unpatched from the same seed: every logged metric
(losses, grad norm, rewards, log-probs, the ``logits/*`` means, NLL, KL, ...) equal to fp32 rounding; the lean path
ran (its own counter and fastft's head-kernel path counts); no ``[B, T, V]`` logits tensor was created in the patched
run (a dispatch-mode watch over every aten op's output, which sees them in the unpatched run). Fallbacks (a subclass
overriding ``get_batch_loss_metrics``; a TRL whose methods differ from the text the lean head implements) run TRL's
code and say why.
"""

from __future__ import annotations

import importlib

import pytest
import torch
from datasets import Dataset
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from fastft.patches import trl_preference
from tests.trl._common import assert_same_run, common_args, lora_config, run
from tests.trl.test_dpo import PAIRS

VOCAB = 397  # the tiny models' vocabulary: no other dimension of theirs (hidden, positions, cache) equals it
STEPS = 2  # step 2 runs on weights moved by step 1's gradients: the backward is compared too
MODULES = {"ORPO": "orpo", "CPO": "cpo", "OnlineDPO": "online_dpo"}

#: The TRL whose text the lean heads implement: on it (and any later TRL with the same text) every row has one.
CONTRACT_TRL = "1.16"


def _contract_trl() -> bool:
    import trl
    from packaging.version import Version

    return Version(trl.__version__).release[:2] == Version(CONTRACT_TRL).release[:2]


pytestmark = pytest.mark.skipif(
    any(importlib.util.find_spec(f"trl.experimental.{m}") is None for m in MODULES.values()),
    reason="this TRL has no trl.experimental ORPO/CPO/OnlineDPO",
)


class FullLogitsWatch(TorchDispatchMode):
    """Records every aten op output shaped like full logits: 3-D, last dim = the vocabulary, more than one position
    (OnlineDPO's generation makes one-position ``[B, 1, V]`` logits per sampled token; those are not the loss's)."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.vocab, self.seen = vocab, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.is_view:  # views and expands allocate nothing
            return out
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.dim() == 3 and t.shape[-1] == self.vocab and t.shape[1] > 1:
                self.seen.append((str(func), tuple(t.shape)))
        return out


def _make(algorithm: str, tmp_path, trainer_base: type | None = None, peft: bool = True, bf16: bool = False, **config):
    def make(cls, model, tokenizer):
        module = importlib.import_module(f"trl.experimental.{MODULES[algorithm]}")
        config_cls = getattr(module, f"{algorithm}Config")
        base = common_args(tmp_path, per_device_train_batch_size=2, max_steps=STEPS, bf16=bf16)
        if algorithm == "OnlineDPO":
            args = config_cls(**base, max_new_tokens=6, max_length=48, temperature=1.0, **config)
            dataset = Dataset.from_list([{"prompt": row["prompt"]} for row in PAIRS])
            extra = dict(reward_funcs=lambda completions, **_: [float(len(c)) for c in completions])
        else:
            args = config_cls(**base, max_length=48, **config)
            dataset, extra = Dataset.from_list(PAIRS), {}
        if trainer_base is not None:  # a user subclass of the (patched) TRL class
            methods = {name: value for name, value in vars(trainer_base).items() if callable(value)}
            cls = type(f"User{cls.__name__}", (cls,), methods)
        return cls(
            model=model,
            args=args,
            train_dataset=dataset,
            processing_class=tokenizer,
            peft_config=lora_config() if peft else None,
            **extra,
        )

    return make


def _compare(
    algorithm: str, tmp_path, *, model_type: str = "llama", trainer_base: type | None = None, **config
) -> tuple[list[dict], list[dict], dict, FullLogitsWatch, FullLogitsWatch]:
    before = dict(trl_preference.LEAN_CALLS)
    with FullLogitsWatch(VOCAB) as fast_watch:
        fast, _ = run(
            algorithm, True, _make(algorithm, tmp_path / "fast", trainer_base, **config), model_type, vocab_size=VOCAB
        )
    calls = {path: trl_preference.LEAN_CALLS[algorithm, path] - before.get((algorithm, path), 0) for path in ("lean", "trl")}
    with FullLogitsWatch(VOCAB) as slow_watch:
        slow, _ = run(
            algorithm, False, _make(algorithm, tmp_path / "slow", trainer_base, **config), model_type, vocab_size=VOCAB
        )
    return fast, slow, calls, fast_watch, slow_watch


def _all_keys(fast: list[dict], slow: list[dict]) -> tuple[str, ...]:
    keys = tuple(key for key in slow[0] if isinstance(slow[0][key], float) and key not in ("epoch", "learning_rate"))
    assert set(fast[0]) == set(slow[0]), (sorted(fast[0]), sorted(slow[0]))
    return keys


#: case -> (row, model type, config, rtol). All fp32 LoRA but one: CPO's default loss (sigmoid, summed log-probs,
#: cpo_alpha=1) is test_experimental.py's case.
CASES = {
    "ORPO": ("ORPO", "llama", {}, 1e-5),
    # SimPO: averaged log-probs, no NLL (cpo_alpha=0 -> TRL's tensor(0.0)); Gemma-2: softcapped, tied head.
    "CPO-simpo-gemma2": ("CPO", "gemma2", {"loss_type": "simpo", "cpo_alpha": 0.0}, 1e-5),
    "CPO-ipo-alpha": ("CPO", "llama", {"loss_type": "ipo", "cpo_alpha": 0.5}, 1e-5),
    "OnlineDPO": ("OnlineDPO", "llama", {}, 1e-5),
    # bf16 mixed precision. LoRA: accelerate's autocast wrapper is on the PEFT model, above the replaced forward. No
    # PEFT: the wrapper sits on the very forward the lean head replaces (re-created around it), and Online DPO's
    # reference is a separate model. TRL's logits/* means are taken over bf16 logits (fastft's in fp32), hence the
    # looser tolerance for the metrics; losses and grad norms are held to 1e-5 in every case.
    "ORPO-bf16-lora": ("ORPO", "llama", {"bf16": True}, 2e-3),
    "OnlineDPO-bf16-full": ("OnlineDPO", "llama", {"bf16": True, "peft": False}, 2e-3),
}


@pytest.mark.parametrize("case", list(CASES))
def test_lean_head_matches_trl(case, tmp_path):
    from fastft._log import mark, notes_since
    from fastft.patches.trl import lean_head_absent

    algorithm, model_type, config, rtol = CASES[case]
    absent = lean_head_absent(algorithm)  # e.g. TRL 1.14's OnlineDPOTrainer._forward differs from TRL 1.16's
    assert absent is None or not _contract_trl(), absent
    since = mark()
    fast, slow, calls, fast_watch, slow_watch = _compare(algorithm, tmp_path, model_type=model_type, **config)
    assert slow_watch.seen, "the watch saw no full logits in TRL's run: it cannot see them at all"
    if absent is None:
        assert calls["lean"] > 0 and calls["trl"] == 0, calls
        assert not fast_watch.seen, f"full logits in the lean run: {fast_watch.seen[:3]}"
    else:  # TRL's own method runs (full logits), said once with the contract check's reason
        assert calls["lean"] == 0 and calls["trl"] > 0, (absent, calls)
        assert fast_watch.seen, absent
        assert any(absent in note for note in notes_since(since)), (absent, notes_since(since))
    keys = _all_keys(fast, slow)
    assert {"loss", "grad_norm"} <= set(keys) and len(keys) >= 5, keys
    if algorithm != "OnlineDPO":
        assert {"logits/chosen", "logits/rejected", "nll_loss", "logps/chosen"} <= set(keys), keys
    assert_same_run(fast, slow, keys, rtol=rtol, atol=rtol / 10)
    assert_same_run(fast, slow, ("loss", "grad_norm"), rtol=1e-5, atol=1e-6)


def test_user_override_of_get_batch_loss_metrics_gets_trls_path(tmp_path):
    """A subclass overriding the consumer may read the full logits: TRL's concatenated_forward runs, said once."""

    class Override:
        def get_batch_loss_metrics(self, model, batch, train_eval="train"):
            chosen_logps, rejected_logps, chosen_logits, rejected_logits, nll = self.concatenated_forward(model, batch)
            assert chosen_logits.shape[-1] == VOCAB  # the full logits this override relies on
            loss = nll - (chosen_logps - rejected_logps).mean() * 0.1
            return loss, {"logits_max": chosen_logits.detach().max().item()}

    from fastft._log import mark, notes_since

    since = mark()
    fast, slow, calls, fast_watch, _ = _compare("ORPO", tmp_path, trainer_base=Override)
    assert calls["lean"] == 0 and calls["trl"] > 0, calls
    assert fast_watch.seen  # TRL's path: the full logits exist, as the override needs
    assert any(
        "runs TRL's code with full logits" in note and "get_batch_loss_metrics" in note for note in notes_since(since)
    ), notes_since(since)
    assert_same_run(fast, slow, ("loss", "grad_norm", "logits_max"))


def test_call_guards_name_why_trls_path_runs():
    """The per-call guard of concatenated_forward: TRL's caller only, TRL's get_batch_logps only, causal LMs only."""
    from trl.experimental.cpo import CPOTrainer

    metrics = trl_preference._trl_function(CPOTrainer, "get_batch_loss_metrics").__code__

    class OwnLogps(CPOTrainer):
        @staticmethod
        def get_batch_logps(logits, labels, average_log_prob=False, is_encoder_decoder=False):
            return logits.logsumexp(-1).sum(-1)

    class EncoderDecoder(CPOTrainer):
        is_encoder_decoder, aux_loss_enabled = True, False

    class Moe(CPOTrainer):
        is_encoder_decoder, aux_loss_enabled = False, True

    def problem(cls, caller=metrics):
        return trl_preference._pair_call_problem(object.__new__(cls), None, caller, "CPO")

    assert "other than TRL's get_batch_loss_metrics" in problem(
        Moe, caller=test_call_guards_name_why_trls_path_runs.__code__
    )
    assert problem(OwnLogps) == "OwnLogps overrides get_batch_logps (it takes the full logits)"
    assert problem(EncoderDecoder) == "an encoder-decoder model"
    assert problem(Moe) == "an MoE aux loss (output_router_logits)"


def test_changed_trl_text_makes_the_lean_head_absent(monkeypatch):
    """A TRL whose methods differ from the text the lean head implements: the row says so, TRL's code runs."""
    import fastft
    from fastft._log import reset_once
    from fastft.patches.trl import lean_head_absent

    # A row whose contract holds on the installed TRL (on TRL 1.14 OnlineDPO's is already absent), and another
    # pair row whose text is left alone: altering one row's text must not touch the other's.
    if _contract_trl():
        assert all(lean_head_absent(row) is None for row in MODULES), {row: lean_head_absent(row) for row in MODULES}
    holding = [row for row in ("ORPO", "CPO") if lean_head_absent(row) is None]
    if not holding:
        pytest.skip(f"no preference row's lean head is present on this TRL: {lean_head_absent('ORPO')}")
    row, other = holding[0], ("CPO" if holding[0] == "ORPO" else "ORPO")
    other_before = lean_head_absent(other)
    module, name, digests = trl_preference._CONTRACTS[row]
    monkeypatch.setitem(trl_preference._CONTRACTS, row, (module, name, {**digests, "get_batch_logps": "0" * 16}))
    trl_preference.contract_problem.cache_clear()
    try:
        reason = lean_head_absent(row)
        assert reason is not None and f"{row}Trainer.get_batch_logps" in reason and "TRL 1.16" in reason, reason
        assert lean_head_absent(other) == other_before
        # The hook then calls TRL's method: the reason is the one the hook logs.
        assert trl_preference._pair_call_problem(None, None, None, row) == reason
        reset_once()
        with pytest.warns(UserWarning, match=rf"PatchFastRL\('{row}'\): no lean head: TRL .*get_batch_logps differ"):
            assert fastft.PatchFastRL(row) == {row: True}  # the rest of the row still applies
    finally:
        monkeypatch.undo()
        trl_preference.contract_problem.cache_clear()
        fastft.unpatch()
    assert lean_head_absent(row) is None


def test_mean_logits_equals_full_mean():
    """The logits/* metric: per-position vocabulary means whose .mean() is the full logits' mean (linear and softcap
    paths, bias and scale)."""
    from fastft.kernels.cross_entropy_math import transform_reference

    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, 7, 16, generator=g)
    weight = torch.randn(50, 16, generator=g) * 0.3
    bias = torch.randn(50, generator=g)
    for softcap, scale in ((None, None), (None, 0.25), (2.0, None), (2.0, 1.5)):
        full = transform_reference(torch.nn.functional.linear(hidden, weight, bias), softcap, scale, 1.0)
        lean = trl_preference.mean_logits(hidden, weight, bias, softcap, scale)
        assert lean.shape == (3, 7)
        torch.testing.assert_close(lean, full.mean(-1), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(lean[:, :-1].mean(), full[:, :-1].mean(), rtol=1e-5, atol=1e-6)


def test_instance_forward_guard():
    """The lean forward stands in only for the class's forward, or accelerate's wrapper around it."""
    import functools
    import types

    from fastft.offline import build_tiny_model

    model = build_tiny_model("llama", vocab_size=VOCAB)
    assert trl_preference._instance_forward_problem(model) is None
    own = type(model).forward

    @functools.wraps(own)
    def wrapper(self, *args, **kwargs):  # as accelerate's convert_outputs_to_fp32(autocast(...)) keeps __wrapped__
        return own(self, *args, **kwargs)

    model.forward = types.MethodType(wrapper, model)
    assert trl_preference._instance_forward_problem(model) is None
    model.forward = types.MethodType(lambda self, *a, **k: None, model)
    assert "instance forward fastft does not know" in trl_preference._instance_forward_problem(model)
    assert "instance forward" in trl_preference._head_problem(
        types.SimpleNamespace(accelerator=types.SimpleNamespace(unwrap_model=lambda m: m)), model
    )
