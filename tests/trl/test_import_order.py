"""Import order does not matter: the user's script as they really write it.

An existing TRL script keeps ``from trl import SFTTrainer`` (and friends) at its top and gets the two fastft lines
added below; PatchFastRL may also come after the trainer is built, or twice. Each order must run fastft's hooks and
the fast LM head (by kernel path counts), and FastModel must patch the model whichever of trl / peft / transformers
was imported first. The scripts run in fresh interpreters, since "imported first" only means something there.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
from datasets import Dataset

import fastft
from fastft.kernels._launch import path_counts
from fastft.patches.trl import _fused_head_problem, patched_algorithm
from tests.trl._common import common_args

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
#: TRL < 1.15 has no fused-head hook: there the losses run TRL's code (said once) and no fastft head kernel runs.
FUSED_HEAD = _fused_head_problem() is None

USER_SCRIPT = textwrap.dedent("""
    import json, sys
    from trl import DPOConfig, DPOTrainer, GRPOConfig, GRPOTrainer, SFTConfig, SFTTrainer  # the script's old top
    from datasets import Dataset

    from fastft import FastModel, PatchFastRL  # the two added lines
    from fastft.kernels._launch import path_counts
    from fastft.offline import build_tiny_model, build_tokenizer
    from fastft.patches.trl import patched_algorithm

    model_dir = sys.argv[1]
    build_tiny_model("llama").save_pretrained(model_dir)
    build_tokenizer().save_pretrained(model_dir)
    common = dict(output_dir=model_dir + "/out", use_cpu=True, report_to="none", bf16=False, max_steps=1,
                  logging_steps=1, save_strategy="no", disable_tqdm=True, per_device_train_batch_size=2, seed=0)
    facts = {}

    def head_calls():
        return sum(n for (op, _), n in path_counts.items() if op.startswith("cross_entropy"))

    def train(name, make):
        model, tokenizer = FastModel.from_pretrained(model_dir)
        model = FastModel.get_peft_model(model, r=4, target_modules=["q_proj", "v_proj"])
        assert PatchFastRL(name) == {name: True}
        before = head_calls()
        trainer = make(model, tokenizer)
        trainer.train()
        facts[name] = {"class": type(trainer).__qualname__, "hooks": patched_algorithm(trainer),
                       "head_calls": head_calls() - before, "loss": trainer.state.log_history[0]["loss"]}

    texts = Dataset.from_list([{"text": "The quick brown fox jumps over the lazy dog."}] * 4)
    pairs = Dataset.from_list([{"prompt": "What is 12 plus 7?", "chosen": " 19.", "rejected": " 20."}] * 4)
    prompts = Dataset.from_list([{"prompt": "Count:"}] * 4)
    train("SFT", lambda m, t: SFTTrainer(model=m, args=SFTConfig(**common), train_dataset=texts, processing_class=t))
    train("DPO", lambda m, t: DPOTrainer(model=m, args=DPOConfig(**common, max_length=32), train_dataset=pairs,
                                         processing_class=t))
    train("GRPO", lambda m, t: GRPOTrainer(
        model=m, reward_funcs=lambda completions, **kw: [float(len(c)) for c in completions], train_dataset=prompts,
        args=GRPOConfig(**common, num_generations=2, max_completion_length=4), processing_class=t))
    print("FACTS " + json.dumps(facts))
""")


def _run(code: str, *args: str, timeout: int = 300) -> str:
    env = {**os.environ, "TRITON_INTERPRET": "0", "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO
    )
    assert out.returncode == 0, out.stderr[-4000:]
    return out.stdout


def test_trainers_imported_at_the_top_of_the_script_run_fastft(tmp_path):
    stdout = _run(USER_SCRIPT, str(tmp_path / "model"))
    facts = json.loads(next(line for line in stdout.splitlines() if line.startswith("FACTS "))[6:])
    for name in ("SFT", "DPO", "GRPO"):
        fact = facts[name]
        assert fact["class"] == f"{name}Trainer" and fact["hooks"] == name, fact
        if FUSED_HEAD:
            assert fact["head_calls"] > 0, f"{name}: fastft's LM-head kernels never ran: {fact}"
        else:  # the losses run TRL's own code there (tests/trl/test_patch_api.py checks the note)
            assert fact["head_calls"] == 0, fact


@pytest.mark.parametrize("first", ["trl,peft,transformers", "fastft"])
def test_fast_model_patches_whichever_library_was_imported_first(first, tmp_path):
    imports = "import fastft\n" if first == "fastft" else "".join(f"import {m}\n" for m in first.split(","))
    code = imports + textwrap.dedent("""
        import sys
        from fastft import FastModel
        from fastft.offline import build_tiny_model, build_tokenizer

        build_tiny_model("qwen2").save_pretrained(sys.argv[1])
        build_tokenizer().save_pretrained(sys.argv[1])
        model, _ = FastModel.from_pretrained(sys.argv[1])
        print("APPLIED " + ",".join(sorted(model._fastft_patch_report.applied)))
    """)
    stdout = _run(code, str(tmp_path / "model"))
    applied = next(line for line in stdout.splitlines() if line.startswith("APPLIED "))[8:].split(",")
    assert applied == ["fused_loss", "mlp:swiglu", "rms_norm", "rope"], applied


def _sft_trainer(cls, tmp_path):
    from trl import SFTConfig

    from fastft.model import FastModel
    from fastft.offline import build_tiny_model, build_tokenizer

    model_dir = str(tmp_path / "model")
    build_tiny_model("llama").save_pretrained(model_dir)
    build_tokenizer().save_pretrained(model_dir)
    model, tokenizer = FastModel.from_pretrained(model_dir)
    model = FastModel.get_peft_model(model, r=4, target_modules=["q_proj", "v_proj"])
    args = SFTConfig(**common_args(tmp_path, per_device_train_batch_size=2, max_steps=2, max_length=32))
    return cls(
        model=model,
        args=args,
        processing_class=tokenizer,
        train_dataset=Dataset.from_list([{"text": "The quick brown fox jumps over the lazy dog."}] * 4),
    )


@pytest.mark.parametrize("when", ["after_the_trainer_is_built", "twice"])
def test_patch_fast_rl_after_building_the_trainer_or_twice(when, tmp_path):
    from trl import SFTTrainer

    fastft.unpatch()
    if when == "twice":
        assert fastft.PatchFastRL("SFT") == {"SFT": True}
    trainer = _sft_trainer(SFTTrainer, tmp_path)
    assert fastft.PatchFastRL("SFT") == {"SFT": True}
    assert patched_algorithm(trainer) == "SFT"
    before = sum(n for (op, _), n in path_counts.items() if op.startswith("cross_entropy"))
    trainer.train()
    calls = sum(n for (op, _), n in path_counts.items() if op.startswith("cross_entropy")) - before
    assert (calls > 0) if FUSED_HEAD else (calls == 0), calls
    assert len([r for r in trainer.state.log_history if "loss" in r]) == 2
    fastft.unpatch()
    assert patched_algorithm(trainer) is None  # unpatch reaches the already-built trainer too
