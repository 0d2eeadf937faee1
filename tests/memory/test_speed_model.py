"""The roofline speed model (fastft.memory.speed_model) and its `fastft plan` lines: FLOP and byte counts against
analytic values, fused ops counted as one op with their own traffic, the compute/memory-bound choice, the GPU table
and the CLI."""

import json
import math

import pytest
import torch

from fastft.cli import main
from fastft.memory import speed_model
from fastft.memory.speed_model import GPUS, LAUNCH_OVERHEAD_S, OpCounter, OpKey, count_step, roofline
from fastft.memory.step_model import StepModel, StepSpec
from tests.memory._configs import tiny_llama


def test_matmul_flops_and_bytes_are_analytic():
    m, k, n = 96, 160, 224
    a = torch.empty(m, k, device="meta", dtype=torch.bfloat16)
    b = torch.empty(k, n, device="meta", dtype=torch.bfloat16)
    bias = torch.empty(n, device="meta", dtype=torch.bfloat16)
    with OpCounter() as c:
        torch.mm(a, b)
    assert c.flops == 2 * m * k * n and c.bytes == 2 * (m * k + k * n + m * n) and c.launches == 1
    with OpCounter() as c:
        torch.nn.functional.linear(a, b.t(), bias)  # addmm; the transpose is a view: no launch, no bytes
    ((key, calls),) = c.calls.items()
    assert calls == 1 and key.op == "aten.addmm" and key.dtype == "bfloat16" and key.flops == 2 * m * k * n
    assert key.bytes == 2 * (m * k + k * n + n + m * n)  # the bias is read once, not broadcast over the rows


def test_inplace_and_out_args_are_not_double_counted():
    x = torch.empty(64, 32, device="meta")
    y = torch.empty(64, 32, device="meta")
    with OpCounter() as c:
        x.add_(y)  # reads x and y, writes x
        x.copy_(y)  # reads y, writes x (x is not read)
        x.zero_()  # writes x
    per = 64 * 32 * 4
    got = {k.op: k.bytes for k in c.calls}
    assert got == {"aten.add_": 3 * per, "aten.copy_": 2 * per, "aten.zero_": per}


def _analytic_step_flops(cfg, tokens: int, r: int) -> int:
    """Matrix-product FLOPs of one checkpointed LoRA step (batch 1): every decoder GEMM runs forward, again in the
    recompute, and once for dX in the backward (frozen base: no dW); LoRA's rank-r products twice in forward+recompute
    and twice in the backward (dA and dB as well as dX); the LM head forward + dX; causal attention forward twice
    and FlashAttention-2's backward (2.5x the forward). (The rotary frequencies' [D/2, 1] @ [1, T] outer product is
    no GEMM: torch's matmul runs an inner dimension of 1 as a broadcast multiply.)"""
    h, i, d = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    q, kv = cfg.num_attention_heads * d, cfg.num_key_value_heads * d
    shapes = [(h, q), (h, kv), (h, kv), (q, h), (h, i), (h, i), (i, h)]
    base = sum(3 * 2 * tokens * a * b for a, b in shapes)
    lora = sum(4 * 2 * tokens * r * (a + b) for a, b in shapes)
    attention_forward = cfg.num_attention_heads * tokens * tokens * 2 * d  # (QK^T + PV) / 2 for causality
    attention = int(4.5 * attention_forward)
    per_layer = base + lora + attention
    head = 2 * 2 * tokens * h * cfg.vocab_size
    return cfg.num_hidden_layers * per_layer + head


@pytest.mark.parametrize("variant,four_bit", [("baseline", False), ("fastft", True)])
def test_step_flops_equal_the_analytic_count(variant, four_bit):
    cfg = tiny_llama(layers=2)
    model = StepModel(cfg, StepSpec(variant=variant, load_in_4bit=four_bit, lora_r=4))
    result, counter = count_step(model, 64)
    assert counter.flops == _analytic_step_flops(cfg, 64, 4)
    assert not counter.no_flop_formula
    # every layer ran (no replay) and the memory answer is the replayed one's
    assert result.peak_bytes == model.step(64).peak_bytes
    phases = {k.phase for k in counter.calls}
    assert {"activations", "loss", "recompute", "backward", "optimizer_step"} <= phases


def test_counter_refuses_replayed_layers():
    model = StepModel(tiny_llama(layers=2), StepSpec(variant="baseline", load_in_4bit=False, lora_r=4))
    with pytest.raises(ValueError, match="replay_layers=False"):
        model.step(32, replay_layers=True, counter=OpCounter())


def test_fused_op_bytes_are_its_inputs_and_outputs():
    t, h = 48, 96
    x = torch.empty(t, h, device="meta", dtype=torch.bfloat16)
    w = torch.empty(h, device="meta", dtype=torch.bfloat16)
    with OpCounter() as c:
        torch.ops.fastft.rms_norm_forward(x, w, 1e-5, False)
    ((key, calls),) = c.calls.items()
    assert calls == 1 and key.op == "fastft::rms_norm_forward" and key.flops == 0
    assert key.bytes == 2 * t * h + 2 * h + 2 * t * h + 4 * t  # x, w in; y (bf16) and rstd (fp32) out


def test_fused_op_inside_the_tracker_is_one_op_on_real_tensors():
    """Under the step model's tracker a fastft op runs its implementation (its inner ops allocate and are tracked);
    the counter, inside the tracker, records the fused op once and none of the unfused intermediates."""
    from fastft.kernels._launch import force_path
    from fastft.memory.tracker import LiveBytesTracker

    x, w = torch.randn(40, 64), torch.randn(64)
    counter = OpCounter(device="cpu")
    with force_path("torch"), LiveBytesTracker() as tracker, counter:
        y, rstd = torch.ops.fastft.rms_norm_forward(x, w, 1e-6, False)
    assert tracker.peak_bytes > y.numel() * 4  # the implementation's temporaries were there
    assert [k.op for k in counter.calls] == ["fastft::rms_norm_forward"]
    assert next(iter(counter.calls)).bytes == 4 * (40 * 64 + 64 + 40 * 64 + 40)


def _counter(*calls: tuple[OpKey, int]) -> OpCounter:
    c = OpCounter()
    for key, n in calls:
        c.calls[key] += n
    return c


def test_roofline_picks_compute_or_memory_bound():
    gpu = GPUS["H100"]
    big = OpKey("aten.mm", "activations", "bfloat16", 2 * 4096**3, 3 * 2 * 4096**2, True)  # ~1365 FLOP/byte
    skinny = OpKey("aten.mm", "activations", "bfloat16", 2 * 4096 * 4096 * 16, 2 * (4096 * 4096 + 2 * 4096 * 16), True)
    add = OpKey("aten.add", "backward", "", 0, 3 * 4 * 2**20, True)
    est = roofline(_counter((big, 2), (skinny, 3), (add, 5)), gpu, tokens_per_step=4096)
    bf16 = gpu.tflops["bf16"] * 1e12
    assert est.compute_bound_seconds == pytest.approx(2 * big.flops / bf16)
    assert est.memory_bound_seconds == pytest.approx((3 * skinny.bytes + 5 * add.bytes) / gpu.bandwidth)
    assert est.overhead_seconds == pytest.approx(10 * LAUNCH_OVERHEAD_S)
    assert est.step_seconds == pytest.approx(est.compute_bound_seconds + est.memory_bound_seconds + est.overhead_seconds)
    assert est.tokens_per_s == pytest.approx(4096 / est.step_seconds) and est.label == "modeled (roofline)"
    (mm,) = [o for o in est.top_ops if o.op == "aten.mm"]
    assert mm.calls == 5 and mm.compute_bound_calls == 2
    assert est.by_phase["backward"] == pytest.approx(5 * (add.bytes / gpu.bandwidth + LAUNCH_OVERHEAD_S))
    # the same bytes on a GPU with less bandwidth take proportionally longer
    t4 = roofline(_counter((add, 1)), GPUS["T4"], 1, launch_overhead_s=0)
    assert t4.step_seconds == pytest.approx(add.bytes / 320e9)


def test_peak_per_dtype():
    assert speed_model.peak_flops(GPUS["A100-80GB"], "float32") == (19.5e12, None)  # torch's default: no TF32
    assert speed_model.peak_flops(GPUS["A100-80GB"], "float32", tf32=True)[0] == 156e12
    value, note = speed_model.peak_flops(GPUS["T4"], "bfloat16")
    assert value == 65e12 and "no bf16" in note
    assert speed_model.peak_flops(GPUS["H200"], "bfloat16")[0] == pytest.approx(989.5e12)
    with pytest.raises(ValueError, match="int8"):
        speed_model.peak_flops(GPUS["H100"], "int8")


def test_gpu_names():
    assert speed_model.find_gpu("h100-sxm").name == "H100" and speed_model.find_gpu("a100-40gb").name == "A100-40GB"
    with pytest.raises(ValueError, match="did you mean A100-40GB or A100-80GB"):
        speed_model.find_gpu("A100")
    assert speed_model.gpu_from_device_name("NVIDIA H200").name == "H200"
    assert speed_model.gpu_from_device_name("NVIDIA A100-SXM4-80GB").name == "A100-80GB"
    assert speed_model.gpu_from_device_name("Tesla T4").name == "T4"
    assert speed_model.gpu_from_device_name("NVIDIA L4").name == "L4"
    assert speed_model.gpu_from_device_name("NVIDIA L40S") is None


def test_training_time_arithmetic():
    assert speed_model.training_time(0.5, 1000, 10_500) == (11, 5.5)  # a partial last step is a whole step
    assert speed_model.training_time(2.0, 4096, 4096) == (1, 2.0)
    with pytest.raises(ValueError):
        speed_model.training_time(1.0, 4096, 0)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    tiny_llama(layers=2).save_pretrained(path)
    return path


_SMALL = ["--seq-len", "128", "--lora-r", "4", "--load-in-4bit", "--gpu-memory", "3MB", "--reserve", "0"]


def test_cli_prints_modeled_step_time_for_both_variants(tiny_dir, capsys):
    assert main(["plan", "--model", str(tiny_dir), *_SMALL, "--gpu", "l4", "--baseline", "--tokens", "1M"]) == 0
    out = capsys.readouterr().out
    lines = [ln for ln in out.splitlines() if ln.startswith("modeled (roofline) step time on L4:")]
    assert len(lines) == 2 and all("tokens/s" in ln for ln in lines)
    assert out.count("modeled (roofline) time to train 1,000,000 tokens on L4:") == 2
    assert "(7,813 steps)" in out  # ceil(1e6 / 128)
    assert "modeled (roofline) speedup over the baseline on L4:" in out


def test_cli_tokens_arithmetic_in_json(tiny_dir, capsys):
    assert main(["plan", "--model", str(tiny_dir), *_SMALL, "--gpu", "H200", "--tokens", "2.5e6", "--json"]) == 0
    (fast,) = json.loads(capsys.readouterr().out)["variants"]
    speed = fast["speed"]
    assert speed["gpu"] == "H200" and speed["label"] == "modeled (roofline)" and speed["tokens_per_step"] == 128
    assert speed["tokens_per_s"] == pytest.approx(128 / speed["step_seconds"])
    train = speed["train"]
    assert train["tokens"] == 2_500_000 and train["steps"] == math.ceil(2_500_000 / 128)
    assert train["seconds"] == pytest.approx(train["steps"] * speed["step_seconds"])


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--gpu", "H1000"], "--gpu H1000: not a GPU in the roofline table; did you mean H100 or H200?"),
        (["--tokens", "5M"], "--tokens 5M: the time to train depends on the GPU; add --gpu NAME"),
        (["--gpu", "T4", "--tokens", "lots"], "--tokens lots: not a token count"),
    ],
)
def test_cli_rejects_bad_speed_options(argv, message, capsys):
    assert main(["plan", "--model", "Llama-3.2-1B", *argv]) == 2
    assert message in capsys.readouterr().err


def test_gpu_memory_flag_wins_over_the_gpu_preset(tiny_dir, capsys):
    assert (
        main(
            [
                "plan",
                "--model",
                str(tiny_dir),
                "--seq-len",
                "64",
                "--lora-r",
                "4",
                "--gpu",
                "T4",
                "--gpu-memory",
                "2MB",
                "--reserve",
                "0",
                "--json",
            ]
        )
        == 0
    )
    assert json.loads(capsys.readouterr().out)["gpu_memory_bytes"] == 2 * 10**6
    from fastft.memory.units import GPU_PRESETS, parse_tokens

    assert GPU_PRESETS["T4"] == GPUS["T4"].memory_bytes == 15_360 * 2**20
    assert parse_tokens("2B") == 2 * 10**9 and parse_tokens("1,000") == 1000 and parse_tokens("250k") == 250_000


def test_custom_gemm_ops_have_their_flops():
    import fastft.kernels.grouped_gemm  # noqa: F401  (registers fastft::grouped_gemm_*)
    from fastft.memory.step_model import flash_attention_forward

    m, k, n, e = 40, 32, 48, 4
    x = torch.empty(m, k, device="meta", dtype=torch.bfloat16)
    w = torch.empty(e, n, k, device="meta", dtype=torch.bfloat16)
    offsets = torch.empty(e + 1, device="meta", dtype=torch.int64)
    q = torch.empty(1, 6, 64, 16, device="meta", dtype=torch.bfloat16)
    kv = torch.empty(1, 2, 64, 16, device="meta", dtype=torch.bfloat16)
    with OpCounter() as c:
        torch.ops.fastft.grouped_gemm_forward(x, w, offsets, False)
        flash_attention_forward(q, kv, kv, 0.25, 0.0)
    flops = {key.op: key.flops for key in c.calls}
    assert flops["fastft::grouped_gemm_forward"] == 2 * m * k * n
    assert flops["fastft_memmodel::flash_attention_forward"] == 6 * 64 * 64 * 2 * 16  # (QK^T + PV) / 2, causal
    assert not c.no_flop_formula
    lce = speed_model._custom_flops(
        "fastft::linear_cross_entropy_chunks",
        {"hidden": x, "weight": torch.empty(320, k, device="meta"), "d_ce": x, "compute_dh": True, "compute_dw": False},
    )
    assert lce == 2 * (2 * m * k * 320)  # logits and dhidden


def test_unknown_custom_op_is_reported_not_silently_free():
    lib = torch.library.Library("fastft_speedtest", "FRAGMENT")  # noqa: TOR901
    lib.define("mystery(Tensor x) -> Tensor")
    lib.impl("mystery", lambda x: x.new_empty(x.shape), "Meta")
    x = torch.empty(8, 8, device="meta")
    with OpCounter() as c:
        torch.ops.fastft_speedtest.mystery(x)
    assert c.no_flop_formula == {"fastft_speedtest::mystery"}
    assert "no FLOP formula for fastft_speedtest::mystery" in roofline(c, GPUS["H100"], 1).notes[0]
