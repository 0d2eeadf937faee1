"""GRPO generation through fastft's patched model samples exactly the tokens plain TRL samples (fp32, fixed seed),
while fastft's kernels and fused LoRA really run during generation (their no-grad fast path: no autograd Function,
no custom-op dispatch on plain eager tensors).

The fast run takes the ops' torch paths (``force_path("torch")``), as every CPU user's run does; under the Triton
interpreter (this suite's default) the kernels would sum in another order than transformers' torch code.
"""

from __future__ import annotations

import torch
from datasets import Dataset

import fastft
from fastft.kernels._launch import force_path, path_counts
from fastft.offline import save_tiny_model
from fastft.patches.peft_lora import lora_path_counts

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PROMPTS = [{"prompt": p} for p in ("What is 12 plus 7?", "Name a fast animal.", "Why checkpoint?", "Count:")] * 4


def _reward(completions, **_):
    return [float(len(set(c.split()))) for c in completions]


def _grpo(model_dir: str, tmp_path, fast: bool) -> tuple[list, list[dict]]:
    """Two GRPO steps; returns (each step's sampled completion ids, the logged rows)."""
    import trl
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    fastft.unpatch()
    if fast:
        assert fastft.PatchFastRL("GRPO") == {"GRPO": True}
        model, tokenizer = fastft.FastModel.from_pretrained(model_dir)
        model = fastft.FastModel.get_peft_model(model, r=8, lora_alpha=16, target_modules=TARGETS)
    else:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        torch.manual_seed(3407)  # FastModel.get_peft_model's default random_state: the same adapter init
        model = get_peft_model(
            model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS, task_type="CAUSAL_LM")
        )
    args = trl.GRPOConfig(
        output_dir=str(tmp_path / ("fast" if fast else "plain")),
        use_cpu=True,
        report_to="none",
        bf16=False,
        max_steps=2,
        logging_steps=1,
        seed=0,
        save_strategy="no",
        disable_tqdm=True,
        dataloader_num_workers=0,
        per_device_train_batch_size=8,
        num_generations=4,
        max_completion_length=12,
        learning_rate=1e-2,
    )
    trainer = trl.GRPOTrainer(
        model=model, args=args, train_dataset=Dataset.from_list(PROMPTS), processing_class=tokenizer, reward_funcs=_reward
    )
    sampled: list = []
    generate = trainer._generate_single_turn  # the patched class's hook (for_inference around TRL's) runs inside

    def recording(*a, **k):
        out = generate(*a, **k)
        sampled.append(out[0])
        return out

    trainer._generate_single_turn = recording
    try:
        trainer.train()
    finally:
        fastft.unpatch()
    return sampled, [row for row in trainer.state.log_history if "loss" in row]


def test_grpo_samples_the_same_tokens_as_plain_trl_and_runs_fastft_in_generation(tmp_path):
    model_dir = save_tiny_model(str(tmp_path / "model"), "llama", vocab_size=384)
    plain_tokens, plain_rows = _grpo(model_dir, tmp_path, fast=False)
    norms, mlp_fused = path_counts[("rms_norm", "torch")], lora_path_counts[("mlp", "fused")]
    with force_path("torch"):
        fast_tokens, fast_rows = _grpo(model_dir, tmp_path, fast=True)
    assert len(plain_tokens) == 2 and all(len(step) == 8 for step in plain_tokens)
    assert any(len(c) > 1 for step in plain_tokens for c in step), "nothing was sampled beyond one token"
    assert fast_tokens == plain_tokens, "fastft sampled other tokens than plain TRL for the same seed"
    # fastft's own code ran (generation alone makes >= 12 forwards per step, each with 5 norms and 2 MLPs) ...
    assert path_counts[("rms_norm", "torch")] - norms >= 2 * 12 * 5
    assert lora_path_counts[("mlp", "fused")] - mlp_fused >= 2 * 12 * 2
    # ... and training from those tokens matches too (the loss of step 2 depends on step 1's update).
    for fast_row, plain_row in zip(fast_rows, plain_rows, strict=True):
        torch.testing.assert_close(fast_row["loss"], plain_row["loss"], rtol=1e-5, atol=1e-6)
