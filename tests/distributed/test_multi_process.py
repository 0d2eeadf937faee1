"""fastft with more than one process: real 2-process runs on CPU (gloo) against a 1-process run of the same global
batch.

* DDP: one ``accelerate launch`` (config written to tmp_path) runs TRL's SFTTrainer after ``PatchFastRL("SFT")`` on
  a FastModel tiny Llama + LoRA, with fastft's offloaded checkpointing forced on; per-step loss and grad norm must
  equal the 1-process run (fp32 tolerance), and every rank must have run fastft's loss kernel. The same processes
  then run PatchFastRL's GRPO and TRL's own GRPO (same seed): per-step values must agree. The SFT checkpoint feeds
  the resume world-size check.
* FSDP2: ``fully_shard`` per decoder layer + root (what accelerate's FSDP2 ``TRANSFORMER_BASED_WRAP`` does) under
  ``torch.distributed.run``. accelerate 1.15 never enables FSDP on CPU (see _fsdp_worker.py), hence this launcher.
  LoRA run: losses match, fused LoRA ran, and its gate refuses the sharded weights outside the forward. Full
  fine-tuning with lm_head in its own FSDP group: the fused loss reads a DTensor head and must gather it through
  ``fastft.distributed.full_weight`` with a reduce-scattered gradient (the naive ``full_tensor()`` was measured to
  diverge at step 2), both through the patched causal-LM forward and PatchFastRL's fast LM head. The full state
  dict saved under FSDP2 reloads in one process.

The subprocesses run WITHOUT the Triton interpreter (TRITON_INTERPRET is removed from their environment): on CPU the
kernels' torch paths are what a user runs, and the interpreter would make these runs minutes long. Each launch costs
~10 s of imports per process on this machine; the file runs in about 3 minutes on 2 shared cores.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).parent
REPO = HERE.parent.parent
TIMEOUT = 240


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET" and not k.startswith("PYTEST")}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1")
    return env


def _run(cmd: list[str], log: Path) -> None:
    with open(log, "w") as f:
        proc = subprocess.run(cmd, cwd=REPO, env=_env(), stdout=f, stderr=subprocess.STDOUT, timeout=TIMEOUT)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{log.read_text()[-4000:]}")


def _torchrun(worker: str, *args: str) -> list[str]:
    """The command that runs ``HERE / worker`` with ``args`` in 2 processes under ``torch.distributed.run``."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(_free_port()),
        str(HERE / worker),
        *args,
    ]


def _accelerate_ddp_config(path: Path, num_processes: int = 2) -> Path:
    # distributed_type MULTI_GPU (not MULTI_CPU, and no --cpu): accelerate's MULTI_CPU launcher starts ONE process
    # unless mpirun is configured; with MULTI_GPU it uses torch.distributed.run, and each process (use_cpu=True in the
    # TrainingArguments) then joins a gloo group as DistributedType.MULTI_CPU. On GPUs the same file is plain DDP.
    path.write_text(
        "compute_environment: LOCAL_MACHINE\n"
        "distributed_type: MULTI_GPU\n"
        f"num_processes: {num_processes}\n"
        "num_machines: 1\nmachine_rank: 0\nmain_process_ip: 127.0.0.1\n"
        f"main_process_port: {_free_port()}\n"
        "use_cpu: false\nmixed_precision: 'no'\n"
    )
    return path


def _ranks(prefix: Path, world: int) -> list[dict]:
    return [json.loads(Path(f"{prefix}.rank{r}").read_text()) for r in range(world)]


def _close(a, b, what: str, rtol: float = 1e-5, atol: float = 1e-6) -> None:
    torch.testing.assert_close(
        torch.tensor(a, dtype=torch.float64),
        torch.tensor(b, dtype=torch.float64),
        rtol=rtol,
        atol=atol,
        msg=lambda m: f"{what}: {a} vs {b}\n{m}",
    )


# ----------------------------------------------------------------------------------------------------------------
# Fixtures: the tiny model on disk and the 1-process reference runs (shared by the tests of this module)
# ----------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("distributed")


@pytest.fixture(scope="module")
def model_dir(work) -> str:
    from fastft.offline import save_tiny_model

    return save_tiny_model(str(work / "tiny"), "llama")


@pytest.fixture(scope="module")
def sft_single(work, model_dir) -> dict:
    out = work / "sft1.json"
    _run([sys.executable, str(HERE / "_worker.py"), "sft", model_dir, str(out), str(work / "sft1")], work / "sft1.log")
    return _ranks(out, 1)[0]["sft"]


@pytest.fixture(scope="module")
def ddp(work, model_dir) -> list[dict]:
    """One ``accelerate launch``: fast SFT, then fast GRPO and TRL's own GRPO, in the same 2 processes."""
    cfg = _accelerate_ddp_config(work / "ddp.yaml")
    out = work / "ddp.json"
    accelerate = str(Path(sys.executable).parent / "accelerate")
    _run(
        [
            accelerate,
            "launch",
            "--config_file",
            str(cfg),
            str(HERE / "_worker.py"),
            "sft+grpo+grpo_trl",
            model_dir,
            str(out),
            str(work / "ddp"),
            "gc=offload",
            "save=1",
        ],
        work / "ddp.log",
    )
    return _ranks(out, 2)


FSDP_VARIANTS = ["lora:gc=offload", "full:full=1,shard_head=1", "trl:full=1,shard_head=1,trl=1"]


@pytest.fixture(scope="module")
def fsdp_single(work, model_dir) -> Path:
    out = work / "fsdp1"
    _run([sys.executable, str(HERE / "_fsdp_worker.py"), model_dir, str(out), "lora:", "full:full=1"], work / "fsdp1.log")
    return out


@pytest.fixture(scope="module")
def fsdp_two(work, model_dir) -> Path:
    out = work / "fsdp2"
    _run(_torchrun("_fsdp_worker.py", model_dir, str(out), *FSDP_VARIANTS), work / "fsdp2.log")
    return out


def _result(directory: Path, name: str) -> dict:
    return json.loads((directory / name / "result.json").read_text())


def _trained(directory: Path, name: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(directory / name / "trained.safetensors"))


# ----------------------------------------------------------------------------------------------------------------
# DDP
# ----------------------------------------------------------------------------------------------------------------
def test_sft_ddp_matches_one_process(sft_single, ddp):
    assert sft_single["world"] == 1
    for rank, facts in enumerate(r["sft"] for r in ddp):
        assert facts["world"] == 2 and facts["distributed_type"] == "DistributedType.MULTI_CPU", facts
        assert facts["trainer"] == "SFTTrainer" and facts["fastft_hooks"] == "SFT"
        # fastft's linear cross-entropy (torch path of its chunk loop) ran on every rank, every step.
        assert facts["kernel_calls"].get("cross_entropy:torch", 0) >= len(facts["rows"]), (rank, facts)
        assert len(facts["rows"]) == len(sft_single["rows"]) == 3
        for step, (mine, ref) in enumerate(zip(facts["rows"], sft_single["rows"], strict=True), start=1):
            for key in ("loss", "grad_norm", "entropy", "mean_token_accuracy", "num_tokens"):
                _close(mine[key], ref[key], f"rank {rank} step {step} {key}")


def test_grpo_ddp_fast_matches_trl(ddp):
    """PatchFastRL's GRPO vs TRL's GRPOTrainer, both under DDP with the same seed: same sampled completions (same
    RNG, same weights up to rounding), so the same per-step loss, grad norm and reward, on both ranks."""
    for rank, facts in enumerate(ddp):
        fast, slow = facts["grpo"], facts["grpo_trl"]
        assert fast["fastft_hooks"] == "GRPO" and slow["fastft_hooks"] is None
        assert fast["distributed_type"] == "DistributedType.MULTI_CPU"
        # selective_log_softmax (policy, and reference for the KL) ran through fastft's kernels on every rank.
        assert fast["kernel_calls"].get("cross_entropy:torch", 0) >= 2 * len(fast["rows"]), (rank, fast)
        assert slow["kernel_calls"].get("cross_entropy:torch", 0) == 0, (rank, slow)
        assert len(fast["rows"]) == len(slow["rows"]) == 3
        for step, (f, t) in enumerate(zip(fast["rows"], slow["rows"], strict=True), start=1):
            for key in ("loss", "grad_norm", "reward", "kl", "entropy"):
                _close(f[key], t[key], f"rank {rank} step {step} {key}", rtol=2e-5, atol=2e-6)


def test_ddp_checkpoint_records_world_size_and_resume_check_refuses_mismatch(ddp, work):
    from fastft.distributed import check_resume_world_size, saved_world_size

    ckpt = work / "ddp" / "sft" / "checkpoint-3"
    assert ckpt.is_dir(), sorted(os.listdir(work / "ddp" / "sft"))
    assert saved_world_size(str(ckpt)) == 2  # from the Trainer's rng_state_0/1.pth
    assert check_resume_world_size(str(ckpt), current=2) == 2
    with pytest.raises(ValueError, match="saved by 2 process.*this run has 1.*--num_processes 2"):
        check_resume_world_size(str(ckpt), current=1)
    assert check_resume_world_size(str(ckpt), current=1, allow_change=True) == 2


# ----------------------------------------------------------------------------------------------------------------
# FSDP2
# ----------------------------------------------------------------------------------------------------------------
def test_fsdp2_lora_matches_one_process(fsdp_single, fsdp_two):
    one, two = _result(fsdp_single, "lora"), _result(fsdp_two, "lora")
    assert two["world"] == 2 and one["world"] == 1
    _close(two["losses"], one["losses"], "per-step loss, FSDP2 LoRA vs 1 process")
    # Inside the root's forward FSDP2 has swapped in the unsharded head: the fused loss read a plain tensor.
    assert two["head_weight_seen"] == ["Tensor"]
    assert two["kernel_calls"].get("cross_entropy:torch", 0) >= 3
    # Fused LoRA ran inside the decoder layers' forwards (full weights there) ...
    assert two["kernel_calls"].get("glu_backward_inplace:torch", 0) > 0
    # ... and its gate refuses the sharded weights outside a forward.
    ok, reason = two["can_fuse_outside_forward"]
    assert not ok and "DTensor" in reason, reason
    a, b = _trained(fsdp_single, "lora"), _trained(fsdp_two, "lora")
    assert sorted(a) == sorted(b) and len(a) > 0
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-6, msg=lambda m, k=key: f"{k}: {m}")


def test_fsdp2_sharded_lm_head_is_gathered_with_reduced_gradient(fsdp_single, fsdp_two):
    one, two = _result(fsdp_single, "full"), _result(fsdp_two, "full")
    assert two["head_weight_seen"] == ["DTensor"], "lm_head in its own FSDP group should be sharded at the loss"
    assert two["kernel_calls"].get("cross_entropy:torch", 0) >= 3, "the fused loss fell back to full logits"
    _close(two["losses"], one["losses"], "per-step loss, FSDP2 sharded head vs 1 process")
    a, b = _trained(fsdp_single, "full"), _trained(fsdp_two, "full")
    for key in ("lm_head.weight", "model.embed_tokens.weight", "model.layers.1.mlp.down_proj.weight"):
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-5, msg=lambda m, k=key: f"{k}: {m}")


def test_fsdp2_patchfastrl_head_gathers_sharded_lm_head(fsdp_single, fsdp_two):
    """PatchFastRL's fast LM head (FastSFTTrainer's loss-only call) with a DTensor lm_head: fastft's kernel runs on
    the gathered weight and training matches one process. (Falling back to TRL 1.16's own fused head here was
    measured wrong: its plain ``full_tensor()`` leaves the shards an un-reduced gradient, step-2 loss 5.99265 vs
    5.99753.)"""
    one, two = _result(fsdp_single, "full"), _result(fsdp_two, "trl")
    assert two["head_weight_seen"] == ["DTensor"]
    assert two["kernel_calls"].get("cross_entropy:torch", 0) >= 3, "fastft's fast head fell back to TRL's"
    _close(two["losses"], one["losses"], "per-step loss, PatchFastRL head on a sharded lm_head vs 1 process")


def test_fsdp2_checkpoint_reloads_in_one_process(fsdp_single, fsdp_two, model_dir):
    """The full state dict gathered under FSDP2 (rank 0) loads into a fresh 1-process FastModel + LoRA."""
    from fastft.kernels import force_path
    from fastft.model import FastModel

    model, _ = FastModel.from_pretrained(model_dir, max_seq_length=64)
    model = FastModel.get_peft_model(
        model,
        r=4,
        lora_alpha=8,
        random_state=0,
        use_gradient_checkpointing=False,
        target_modules=["q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"],
    )
    saved = _trained(fsdp_two, "lora")
    missing, unexpected = model.load_state_dict(saved, strict=False)
    assert not unexpected, unexpected
    assert not [k for k in missing if "lora_" in k], "some LoRA weights were not in the FSDP2 checkpoint"
    reference = _trained(fsdp_single, "lora")
    state = model.state_dict()
    for key, value in reference.items():
        torch.testing.assert_close(state[key], value, rtol=1e-4, atol=1e-6)
    ids = torch.randint(5, model.config.vocab_size, (2, 10), generator=torch.Generator().manual_seed(0))
    model.eval()
    with torch.no_grad(), force_path("torch"):
        loss = model(input_ids=ids, labels=ids).loss
    assert torch.isfinite(loss)


# ----------------------------------------------------------------------------------------------------------------
# Refusals that need no second process
# ----------------------------------------------------------------------------------------------------------------
def test_galore_layerwise_refuses_ddp():
    from fastft.offline import build_tiny_model
    from fastft.optim import create_optimizer

    args = types.SimpleNamespace(
        optim="galore_adamw_layerwise",
        gradient_accumulation_steps=1,
        world_size=2,
        fp16=False,
        max_grad_norm=0.0,
        learning_rate=1e-3,
        weight_decay=0.0,
        adam_beta1=0.9,
        adam_beta2=0.999,
        adam_epsilon=1e-8,
        optim_args=None,
        optim_target_modules=["mlp"],
    )
    with pytest.raises(ValueError, match="not supported under DDP/FSDP.*world_size=2"):
        create_optimizer(build_tiny_model("llama"), args)


def test_full_weight_is_identity_and_zero3_placeholder_is_refused():
    from fastft.distributed import direct_read_problem, full_weight, is_plain_linear, sharded_reason

    w = torch.nn.Parameter(torch.randn(7, 5))
    assert full_weight(w) is w and sharded_reason(w) is None and direct_read_problem(w) is None
    assert is_plain_linear(torch.nn.Linear(3, 4)) and not is_plain_linear(torch.nn.Embedding(3, 4))

    # What a DeepSpeed ZeRO-3 partitioned parameter looks like outside its module's forward.
    placeholder = torch.nn.Parameter(torch.empty(0))
    placeholder.ds_id = 3
    placeholder.ds_status = types.SimpleNamespace(name="NOT_AVAILABLE")
    assert "ZeRO-3" in direct_read_problem(placeholder)
    assert "ZeRO-3" in sharded_reason(placeholder)
    with pytest.raises(RuntimeError, match="ZeRO-3"):
        full_weight(placeholder)


# ----------------------------------------------------------------------------------------------------------------
# `fastft train` unchanged under accelerate launch
# ----------------------------------------------------------------------------------------------------------------
def _report_losses(directory: Path) -> list[float]:
    rows = [line.split("|") for line in (directory / "report.md").read_text().splitlines()]
    return [float(r[2]) for r in rows if len(r) == 4 and r[1].strip().isdigit()]


def test_fastft_train_cli_under_accelerate_launch_matches_one_process(work, model_dir):
    """``accelerate launch -m fastft train examples/sft_tiny.yaml`` (2 x per-device 4) trains the same adapters as
    ``python -m fastft train`` with per-device 8 in one process.

    The model is a local directory (what users pass), not ``tiny:llama``: with ``tiny:`` every rank builds the tiny
    model into the same directory at once (a race in fastft.train.run.resolve_model_name, reported to the lead)."""
    from safetensors.torch import load_file

    config = str(REPO / "examples" / "sft_tiny.yaml")
    cfg = _accelerate_ddp_config(work / "ddp_cli.yaml")
    accelerate = str(Path(sys.executable).parent / "accelerate")
    two, one = work / "cli2", work / "cli1"
    _run(
        [
            accelerate,
            "launch",
            "--config_file",
            str(cfg),
            "-m",
            "fastft",
            "train",
            config,
            "--set",
            f"output_dir={two}",
            "--set",
            f"model.name={model_dir}",
        ],
        work / "cli2.log",
    )
    _run(
        [
            sys.executable,
            "-m",
            "fastft",
            "train",
            config,
            "--set",
            f"output_dir={one}",
            "--set",
            f"model.name={model_dir}",
            "--set",
            "trainer.per_device_train_batch_size=8",
        ],
        work / "cli1.log",
    )
    losses_two, losses_one = _report_losses(two), _report_losses(one)
    assert len(losses_two) == len(losses_one) == 6
    _close(losses_two, losses_one, "report losses (printed to 4 digits)", rtol=0, atol=1.5e-3)
    a, b = load_file(str(two / "adapter_model.safetensors")), load_file(str(one / "adapter_model.safetensors"))
    assert sorted(a) == sorted(b) and a
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-6, msg=lambda m, k=key: f"{k}: {m}")


# ----------------------------------------------------------------------------------------------------------------
# DeepSpeed ZeRO-3 (optional: DeepSpeed is not a fastft dependency)
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.benchmark  # DeepSpeed is not a fastft dependency and is not installed by ./run.sh: run by hand
def test_deepspeed_zero3_fused_loss_matches_zero0(work, model_dir):
    """Full fine-tuning with every parameter partitioned (ZeRO-3, persistence threshold 0) gives the same per-step
    losses as ZeRO-0 (replicated): the fused loss either read a gathered head or fell back (logits built)."""
    import deepspeed  # noqa: F401  (fails loudly when run without it: `pip install deepspeed` first)

    results = {}
    for stage in (0, 3):
        out = work / f"zero{stage}.json"
        env_cmd = _torchrun("_deepspeed_worker.py", model_dir, str(out))
        os.environ["ZERO"] = str(stage)
        try:
            _run(env_cmd, work / f"zero{stage}.log")
        finally:
            os.environ.pop("ZERO", None)
        results[stage] = json.loads(out.read_text())
    _close(results[3]["losses"], results[0]["losses"], "per-step loss, ZeRO-3 vs ZeRO-0", rtol=1e-5)
    for facts in results.values():
        # Fused exactly when the head was readable; never a fused loss on a placeholder.
        assert facts["fused"] == [p is None for p in facts["head_problems"]], facts
