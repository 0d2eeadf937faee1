"""FastModel: patched vs unpatched for every supported architecture, LoRA training parity, QLoRA, save, unpatch."""

import warnings

import peft
import pytest
import torch
from transformers import AutoModelForCausalLM

import fastft
from fastft import FastModel
from fastft.kernels import force_path, path_counts
from fastft.kernels.activation import Activation
from fastft.model import ALL_LINEAR_PROJECTIONS
from fastft.offline import TINY_ARCHITECTURES, save_tiny_model
from fastft.patches.architectures import ARCHITECTURES
from fastft.patches.peft_lora import lora_path_counts


@pytest.fixture(autouse=True)
def _unpatch():
    fastft.unpatch()
    yield
    fastft.unpatch()


@pytest.fixture
def model_dir(tmp_path, model_type):
    return save_tiny_model(str(tmp_path / model_type), model_type)


def _batch(vocab=384, batch=2, seq=13, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (batch, seq), generator=g)
    labels = ids.clone()
    labels[0, :4] = -100  # a prompt that is not trained on
    return ids, labels


def _plain(model_dir):
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)


def _loss_and_grads(model, ids, labels):
    model.train()
    model.zero_grad()
    out = model(input_ids=ids, labels=labels)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.loss.detach(), grads


def test_every_table_row_has_a_fixture():
    assert set(ARCHITECTURES) <= set(TINY_ARCHITECTURES)


def _expected_kernels(model_type, model):
    """The pieces the row patches and the kernel ops they run: all of them, minus what the row marks unfused; the
    dense MLP where the model has one, the experts' grouped GEMM (and SwiGLU for silu experts) on MoE rows."""
    row = ARCHITECTURES[model_type]
    unfused = dict(row.unfused)
    pieces = {"rope", "rms_norm", "fused_loss"} - set(unfused)
    ops = [op for op in ("rms_norm", "rope") if op not in unfused] + ["cross_entropy"]
    if any(type(m).__name__ == row.mlp_class for m in model.modules()):
        pieces.add("mlp")
        ops.append(Activation.from_config(getattr(_plain_config(model_type), row.activation_field)).kernel)
    if row.experts_class:
        pieces.add("experts")
        ops += ["grouped_gemm"] + (["swiglu"] if model_type != "gpt_oss" else [])
    return pieces, ops


def _plain_config(model_type):
    from fastft.offline import tiny_config

    return tiny_config(model_type)


def _projections(model):
    """The default LoRA targets this model has (Phi-3's fused qkv_proj / gate_up_proj included; on qwen3_moe not the
    names PEFT remaps onto the experts)."""
    present = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    remapped = {"gate_proj", "up_proj", "down_proj"} if model.config.model_type == "qwen3_moe" else set()
    return [t for t in ALL_LINEAR_PROJECTIONS if t in present and t not in remapped]


def _expert_parameters(model):
    """PEFT target_parameters for the stacked experts of an MoE fixture (None for dense rows)."""
    return ["experts.gate_up_proj", "experts.down_proj"] if ARCHITECTURES[model.config.model_type].experts_class else None


def test_patched_matches_unpatched(model_dir, model_type):
    ids, labels = _batch()
    ref = _plain(model_dir)
    with torch.no_grad():
        ref_logits = ref.eval()(input_ids=ids).logits
    ref_loss, ref_grads = _loss_and_grads(ref, ids, labels)

    model, _ = FastModel.from_pretrained(model_dir, full_finetuning=True)
    report = model._fastft_patch_report
    pieces, ops = _expected_kernels(model_type, model)
    assert {a.split(":")[0] for a in report.applied} == pieces, str(report)
    assert set(report.skipped) == {piece for piece, _ in ARCHITECTURES[model_type].unfused}, str(report)
    before = dict(path_counts)
    with torch.no_grad():
        logits = model.eval()(input_ids=ids).logits
    torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-4)
    loss, grads = _loss_and_grads(model, ids, labels)
    if ARCHITECTURES[model_type].experts_class:  # the fused head added the router aux loss as the model does
        model.train()
        with torch.no_grad():
            out, ref_out = model(input_ids=ids, labels=labels), ref.train()(input_ids=ids, labels=labels)
        assert out.logits is None and ref_out.aux_loss is not None
        torch.testing.assert_close(out.aux_loss, ref_out.aux_loss, rtol=1e-5, atol=1e-6)
    for op in ops:
        assert path_counts.get((op, "triton"), 0) > before.get((op, "triton"), 0), f"{op} kernel did not run"
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-3, atol=1e-5, msg=name)


def test_patched_matches_unpatched_in_bf16(model_dir, model_type):
    """bf16 weights and activations: patched logits and loss equal transformers' within the bf16 forward table."""
    from tests.tolerances import FORWARD, assert_close

    ids, labels = _batch()
    # MoE: torch's CPU grouped_mm (transformers' default experts path) refuses bf16 rows that are not 16-byte aligned,
    # as the fixtures' odd expert width is; the reference runs transformers' loop over experts instead.
    moe = {"experts_implementation": "eager"} if ARCHITECTURES[model_type].experts_class else {}
    ref = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16, **moe).train()
    with torch.no_grad():
        ref_logits, ref_loss = ref.eval()(input_ids=ids).logits, ref.train()(input_ids=ids, labels=labels).loss
    model, _ = FastModel.from_pretrained(model_dir, dtype=torch.bfloat16, full_finetuning=True)
    assert model.dtype == torch.bfloat16
    with torch.no_grad():
        logits, loss = model.eval()(input_ids=ids).logits, model.train()(input_ids=ids, labels=labels).loss
    if ARCHITECTURES[model_type].experts_class:
        # Top-k routing is discontinuous: where two router logits tie in bf16, one rounding upstream picks the other
        # expert for that token (measured on mixtral: position 8 of sequence 1, layer 0's 2nd and 3rd logits both
        # -0.1064). Every other token must agree within the table; at most one token may take the other expert.
        table = FORWARD[torch.bfloat16]
        bad = (logits.float() - ref_logits.float()).abs() > table["atol"] + table["rtol"] * ref_logits.float().abs()
        assert int(bad.any(-1).sum()) <= 1, f"{model_type}: {int(bad.any(-1).sum())} tokens differ"
    else:
        assert_close(logits, ref_logits, FORWARD, torch.bfloat16, msg=f"{model_type} logits")
    assert_close(loss, ref_loss, FORWARD, torch.bfloat16, msg=f"{model_type} loss")


def _train(model, steps, batches, lr=1e-2):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    model.train()
    losses = []
    for step in range(steps):
        ids, labels = batches[step % len(batches)]
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


#: Learning rate of the LoRA parity runs. OLMo 2/3's tiny fixtures are chaotic at 1e-2: plain PEFT against itself with
#: lora_A scaled by (1 + 1e-7) drifts to 3e-3 relative by step 20 (and its loss falls less than at 3e-3, where the
#: same perturbation stays under 1e-7), so a step-by-step comparison there would measure the chaos, not fastft.
#: gemma4_text likewise: plain PEFT vs itself so perturbed drifts 7.6e-3 relative at 1e-2, 2.9e-6 at 3e-3 (where
#: fastft's 1-ulp step-1 differences grow to 1.2e-5 at step 17, at the same step as that drift peaks), and stays at
#: 1-2 ulp (<= 2.5e-7) at 1e-3, as does fastft vs PEFT there. ministral3: plain PEFT vs itself so perturbed drifts
#: 3.6e-6 relative at 1e-2 (fastft's 1-ulp step-1 differences reach 1.4e-5 there), 8.5e-8 at 3e-3.
_LORA_LR = {"olmo2": 3e-3, "olmo3": 3e-3, "gemma4_text": 1e-3, "ministral3": 3e-3}


def _lora_run_matches(model_dir, steps, path, lr=1e-2, model_type=None):
    batches = [_batch(seed=s, seq=11) for s in range(4)]
    plain = _plain(model_dir)
    lora = dict(
        r=8,
        lora_alpha=16,
        target_modules=_projections(plain),
        target_parameters=_expert_parameters(plain),
        lora_dropout=0.0,
        task_type="CAUSAL_LM",
    )
    torch.manual_seed(3407)
    ref = peft.get_peft_model(plain, peft.LoraConfig(**lora))
    ref.base_model.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ref_losses = _train(ref, steps, batches, lr=lr)

    model, _ = FastModel.from_pretrained(model_dir)
    model = FastModel.get_peft_model(model, r=8, lora_alpha=16, use_gradient_checkpointing="fastft")
    fused_before = lora_path_counts[("linear", "fused")] + lora_path_counts[("mlp", "fused")]
    experts_before = path_counts.get(("grouped_gemm_backward", path), 0)
    with force_path(path):
        losses = _train(model, steps, batches, lr=lr)
    assert losses[-1] < losses[0]
    if model_type != "gpt_oss":  # gpt-oss: q/k/v/o have biases (PEFT's path, said once) and there is no dense MLP
        assert lora_path_counts[("linear", "fused")] + lora_path_counts[("mlp", "fused")] > fused_before, (
            "no fused LoRA path ran"
        )
    if ARCHITECTURES[model_type].experts_class:  # the experts were adapted, through the grouped GEMM
        assert {n for n, p in model.named_parameters() if p.requires_grad and ".experts." in n}
        assert path_counts.get(("grouped_gemm_backward", path), 0) > experts_before
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=1e-5, atol=0)


def test_lora_training_run_matches_step_by_step(model_dir, model_type):
    """20 LoRA steps, fused paths (kernels' torch paths, fused loss, fused LoRA MLP/projections) vs plain PEFT.
    The kernels themselves run under the interpreter in the parity test above and in the short run below."""
    _lora_run_matches(model_dir, 20, "torch", lr=_LORA_LR.get(model_type, 1e-2), model_type=model_type)


@pytest.mark.parametrize("model_type", ["llama", "gemma2", "phi3"])  # phi3: the split gate_up MLP's kernels
def test_lora_training_run_matches_under_the_interpreter(model_dir, model_type):
    _lora_run_matches(model_dir, 5, "triton", model_type=model_type)


@pytest.mark.parametrize("model_type", ["llama"])
def test_generation_greedy_tokens_equal(model_dir, model_type):
    ids, _ = _batch(batch=1, seq=6)
    ref = _plain(model_dir).eval()
    ref_tokens = ref.generate(ids, max_new_tokens=8, do_sample=False)
    model, _ = FastModel.from_pretrained(model_dir)
    model = FastModel.get_peft_model(model, r=4)
    FastModel.for_inference(model)
    tokens = model.generate(input_ids=ids, max_new_tokens=8, do_sample=False)
    assert torch.equal(tokens, ref_tokens)  # LoRA B starts at zero, so the adapter model equals the base
    FastModel.for_training(model)
    assert model.training and model.get_base_model().is_gradient_checkpointing


@pytest.mark.parametrize("model_type", ["qwen2"])
def test_packed_batch_position_ids(model_dir, model_type):
    """Padding-free packing: two sequences in one row, position_ids restarting; RoPE kernel follows them."""
    ids, _ = _batch(batch=1, seq=12)
    position_ids = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5, 6]])
    ref = _plain(model_dir).eval()
    with torch.no_grad():
        ref_logits = ref(input_ids=ids, position_ids=position_ids).logits
    model, _ = FastModel.from_pretrained(model_dir)
    with torch.no_grad():
        logits = model.eval()(input_ids=ids, position_ids=position_ids).logits
    torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("model_type", ["llama"])
def test_unpatch_restores_everything(model_dir, model_type):
    import transformers.models.llama.modeling_llama as modeling

    original_rope = modeling.apply_rotary_pos_emb
    model, _ = FastModel.from_pretrained(model_dir)
    assert modeling.apply_rotary_pos_emb is not original_rope
    patched = [m for m in model.modules() if "forward" in vars(m)]
    assert patched
    FastModel.from_pretrained(model_dir)  # a second model: idempotent, no stacked wrappers
    assert modeling.apply_rotary_pos_emb.__wrapped__ is original_rope
    assert fastft.unpatch() > 0
    assert modeling.apply_rotary_pos_emb is original_rope
    assert not [m for m in model.modules() if "forward" in vars(m)]
    assert fastft.unpatch() == 0


# llama untied; gemma2 tied and softcapped; then every newer row (fused projections, multipliers, q/k norms)
@pytest.mark.parametrize(
    "model_type",
    [
        "llama",
        "gemma2",
        "phi3",
        "gemma3_text",
        "olmo2",
        "olmo3",
        "granite",
        "smollm3",
        "glm4",
        "ministral",
        "ministral3",
        "qwen3_moe",
        "mixtral",
        "gpt_oss",
        "gemma4_text",
    ],
)
def test_merged_save_round_trip(model_dir, model_type, tmp_path):
    ids, labels = _batch(seed=3)
    model, tok = FastModel.from_pretrained(model_dir)
    model = FastModel.get_peft_model(model, r=4, lora_alpha=8, init_lora_weights=False)  # non-zero adapters
    model.eval()
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    out = model.save_pretrained_merged(str(tmp_path / "merged"), tok, save_method="merged_16bit", dtype=torch.float32)
    fastft.unpatch()
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        got = reloaded(input_ids=ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert not list((tmp_path / "merged").glob("*.bin")), "safetensors only"
    bf16_dir = model.save_pretrained_merged(str(tmp_path / "merged16"), tok)
    # MoE: torch's CPU grouped_mm (transformers' default experts path) refuses the fixtures' unaligned bf16 rows
    moe = {"experts_implementation": "eager"} if ARCHITECTURES[model_type].experts_class else {}
    reloaded16 = AutoModelForCausalLM.from_pretrained(bf16_dir, **moe).eval()
    assert reloaded16.dtype == torch.bfloat16
    with torch.no_grad():
        got16 = reloaded16(input_ids=ids).logits.float()
    torch.testing.assert_close(got16, expected, rtol=0.05, atol=0.15)
    lora_dir = model.save_pretrained_merged(str(tmp_path / "lora"), tok, save_method="lora")
    assert (tmp_path / "lora" / "adapter_model.safetensors").exists() and lora_dir


@pytest.mark.parametrize("model_type", ["llama"])
def test_qlora_nf4_trains_and_matches_unfused_peft(model_dir, model_type, bnb_default_cpu_kernels):
    # The baseline is PEFT + bitsandbytes with bitsandbytes' generic CPU dequantization (the fixture): its native
    # AVX-512 kernel is wrong for the tiny model's rows that do not hold whole 64-blocks.
    from transformers import BitsAndBytesConfig

    from tests.bnb_reference import routed_calls

    batches = [_batch(seed=s, seq=9) for s in range(2)]
    qconf = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32
    )
    torch.manual_seed(3407)
    ref = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=qconf, device_map="cpu", dtype=torch.float32)
    ref = peft.get_peft_model(
        ref,
        peft.LoraConfig(
            r=4,
            lora_alpha=8,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
            task_type="CAUSAL_LM",
        ),
    )
    routed_before = routed_calls["dequantize_4bit"]
    ref_losses = _train(ref, 6, batches)
    assert routed_calls["dequantize_4bit"] > routed_before  # the baseline really dequantized through the fixture

    model, _ = FastModel.from_pretrained(model_dir, load_in_4bit=True)
    model = FastModel.get_peft_model(model, r=4, lora_alpha=8, use_gradient_checkpointing=False)
    losses = _train(model, 6, batches)
    assert losses[-1] < losses[0]
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=1e-5, atol=0)


@pytest.mark.parametrize("model_type", ["llama"])
def test_qlora_inference_keeps_the_nf4_layout(model_dir, model_type):
    """Inference (eval, no grad) between training steps keeps the NF4 layout fastft reads: on an AVX512-BF16 CPU
    bitsandbytes would otherwise repack every 4-bit weight in place at the first such forward, and the fused path and
    the merged save would then read another format. (Without AVX512-BF16, bitsandbytes never repacks.) Dropout makes
    the layers take PEFT's path, where bitsandbytes' own forward runs."""
    model, _ = FastModel.from_pretrained(model_dir, load_in_4bit=True)
    model = FastModel.get_peft_model(model, r=4, lora_alpha=8, lora_dropout=0.1, use_gradient_checkpointing=False)
    ids, labels = _batch(seq=9)
    FastModel.for_inference(model)
    with torch.no_grad():
        model(input_ids=ids)
    states = [m.weight.quant_state for m in model.modules() if type(m).__name__ == "Linear4bit"]
    assert states and not any(getattr(qs, "packing_format_for_cpu", False) for qs in states)
    FastModel.for_training(model)
    assert _train(model, 1, [(ids, labels)])[0] > 0


def test_unsupported_architecture_warns_once_and_trains(tmp_path, capsys):
    from transformers import GPT2Config, GPT2LMHeadModel

    from fastft.offline import build_tokenizer

    d = str(tmp_path / "gpt2")
    GPT2LMHeadModel(GPT2Config(vocab_size=384, n_embd=32, n_layer=1, n_head=2, n_positions=64)).save_pretrained(d)
    build_tokenizer().save_pretrained(d)
    with pytest.warns(UserWarning, match="not in the architecture table") as warned:
        model, _ = FastModel.from_pretrained(d)
    assert sum("not in the architecture table" in str(w.message) for w in warned) == 1
    assert "not in the architecture table" not in capsys.readouterr().out  # said once, not printed again
    model = FastModel.get_peft_model(model, r=4, target_modules=["c_attn"], use_gradient_checkpointing=False)
    ids, labels = _batch(seq=8)
    losses = _train(model, 5, [(ids, labels)])
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("model_type", ["llama"])
def test_bad_input(model_dir, model_type, tmp_path, caplog):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        FastModel.from_pretrained(str(tmp_path / "nope"))
    with pytest.raises(OSError, match="could not load"):
        FastModel.from_pretrained("no-such-org/no-such-model-xyz")
    with pytest.raises(ValueError, match="mutually exclusive"):
        FastModel.from_pretrained(model_dir, load_in_4bit=True, load_in_8bit=True)
    with pytest.raises(ValueError, match="dtype"):
        FastModel.from_pretrained(model_dir, dtype=torch.int8)
    with pytest.raises(ValueError, match="dtype"):
        FastModel.from_pretrained(model_dir, dtype="float8")
    with pytest.warns(UserWarning, match="linear RoPE scaling x2"):
        model, _ = FastModel.from_pretrained(model_dir, max_seq_length=5000)  # the tiny model has 4096 positions
    assert model.config.rope_parameters["rope_type"] == "linear"
    model = FastModel.get_peft_model(model, r=4)
    with pytest.raises(ValueError, match="already has LoRA"):
        FastModel.get_peft_model(model)


@pytest.mark.parametrize("model_type", ["llama"])
def test_fused_lora_runs_under_trainer_style_autocast(model_dir, model_type, monkeypatch):
    """bf16=True in a Trainer wraps the forward in autocast; the fused LoRA MLP and projections must still run (not
    fall back to PEFT) and give PEFT's loss and adapter gradients under the same autocast."""
    from fastft.kernels import lora

    ids, labels = _batch(seq=11)
    lora_cfg = dict(
        r=8,
        lora_alpha=16,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        lora_dropout=0.0,
        task_type="CAUSAL_LM",
        init_lora_weights=False,
    )
    torch.manual_seed(3407)  # FastModel.get_peft_model's random_state: the same adapters
    ref = peft.get_peft_model(
        AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16), peft.LoraConfig(**lora_cfg)
    )
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref_loss, ref_grads = _loss_and_grads(ref, ids, labels)

    calls = []
    for name in ("LoRAMLP", "LoRAProjections"):
        fn = getattr(lora, name)
        monkeypatch.setattr(fn, "apply", (lambda f, n: lambda *a: calls.append(n) or f(*a))(fn.apply, name))
    model, _ = FastModel.from_pretrained(model_dir, dtype=torch.bfloat16)
    model = FastModel.get_peft_model(
        model, use_gradient_checkpointing=False, **{k: v for k, v in lora_cfg.items() if k not in ("task_type",)}
    )
    with force_path("torch"), torch.autocast("cpu", dtype=torch.bfloat16):
        loss, grads = _loss_and_grads(model, ids, labels)
    assert calls.count("LoRAMLP") == 2 and calls.count("LoRAProjections") >= 8, calls  # 2 layers, fused
    torch.testing.assert_close(loss, ref_loss, rtol=2e-2, atol=0)
    assert grads.keys() == ref_grads.keys()
    for name, g in grads.items():
        scale = ref_grads[name].float().abs().max().clamp_min(1e-3)
        err = ((g.float() - ref_grads[name].float()).abs().max() / scale).item()
        assert err < 5e-2, (name, err)  # bf16 end to end: a few ulps of the largest entry


@pytest.mark.parametrize("model_type", ["llama"])
def test_defaults_keep_the_users_model_and_config(model_dir, model_type, tmp_path):
    """With every default, FastModel changes nothing about the model: no RoPE scaling (the old default of 2,048
    tokens scaled a 1,024-position model x2), logits equal to plain transformers', and a merged save whose config
    equals the original's in every field that describes the model."""
    import json

    from fastft.offline import save_tiny_model

    short = save_tiny_model(str(tmp_path / "short"), "llama", max_position_embeddings=1024)
    ids, _ = _batch()
    with torch.no_grad():
        want = _plain(short).eval()(input_ids=ids).logits
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no RoPE warning either
        model, _ = FastModel.from_pretrained(short)
    assert model.max_seq_length == 1024
    assert model.config.rope_parameters == _plain(short).config.rope_parameters
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(input_ids=ids).logits, want, rtol=1e-4, atol=1e-4)
    model = FastModel.get_peft_model(model, r=4, use_gradient_checkpointing=False)
    model.save_pretrained_merged(str(tmp_path / "merged"))
    saved, original = (json.load(open(f"{d}/config.json")) for d in (tmp_path / "merged", short))
    for key in ("dtype", "torch_dtype", "transformers_version"):
        saved.pop(key, None), original.pop(key, None)
    assert saved == original


@pytest.mark.parametrize("model_type", ["llama"])
def test_bad_arguments_are_rejected_up_front(model_dir, model_type, tmp_path, monkeypatch):
    import time

    for bad in ("2048", 0, -5, 2.5, True):
        with pytest.raises(ValueError, match="max_seq_length must be a positive number of tokens"):
            FastModel.from_pretrained(model_dir, max_seq_length=bad)
    # a relative path next to an existing folder is a local path, not a hub id: no wait on the hub
    (tmp_path / "models").mkdir()
    save_tiny_model(str(tmp_path / "models" / "tiny-llama"), "llama")
    monkeypatch.chdir(tmp_path)
    start = time.perf_counter()
    with pytest.raises(FileNotFoundError, match=r"'models/nope' does not exist"):
        FastModel.from_pretrained("models/nope")
    with pytest.raises(FileNotFoundError, match=r"did you mean 'models/tiny-llama'\?"):
        FastModel.from_pretrained("models/tiny-lama")
    assert time.perf_counter() - start < 1.0
    model, _ = FastModel.from_pretrained("models/tiny-llama")
    with pytest.raises(ValueError, match=r"no linear layer named 'nonexistent' in this model") as info:
        FastModel.get_peft_model(model, r=4, target_modules=["q_proj", "nonexistent"])
    assert "q_proj" in str(info.value)  # the message lists what exists
    with pytest.raises(ValueError, match=r"'up_prj' \(did you mean 'up_proj'\?\)"):
        FastModel.get_peft_model(model, r=4, target_modules=["up_prj"])
    peft_model = FastModel.get_peft_model(
        model, r=4, target_modules=["model.layers.0.self_attn.q_proj", "v_proj"], use_gradient_checkpointing=False
    )  # PEFT's dotted-suffix names match
    assert len([n for n, _ in peft_model.named_modules() if n.endswith("q_proj.lora_A")]) == 1


@pytest.mark.parametrize("model_type", ["llama"])
def test_fused_lora_counts_mlps_and_attention_projections_apart(model_dir, model_type, caplog):
    import logging

    model, _ = FastModel.from_pretrained(model_dir)
    with caplog.at_level(logging.INFO, logger="fastft"):
        FastModel.get_peft_model(model, r=4, use_gradient_checkpointing=False)
    # the tiny model has 2 layers: 2 MLPs, and q/k/v/o in each attention block
    assert any("fused LoRA on 2 MLPs and 8 attention projections" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("model_type", ["phi3", "glm4"])
def test_default_lora_targets_cover_fused_projections(model_dir, model_type, recwarn):
    """Phi-3's qkv_proj and gate_up_proj (GLM-4's gate_up_proj) get adapters by default: none is silently missed."""
    model, _ = FastModel.from_pretrained(model_dir)
    model = FastModel.get_peft_model(model, r=4, use_gradient_checkpointing=False)
    lora_layers = [name for name, m in model.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)]
    adapted = {name.rsplit(".", 1)[-1] for name in lora_layers}
    linears = {
        name.rsplit(".", 1)[-1] for name, m in _plain(model_dir).named_modules() if isinstance(m, torch.nn.Linear)
    } - {"lm_head"}
    assert adapted == linears and "gate_up_proj" in adapted, adapted
    assert ("qkv_proj" in adapted) == (model_type == "phi3")
    assert not [w for w in recwarn if "without an adapter" in str(w.message)]
    # One training forward (no recompute): every LoRA layer, the gate_up MLP's two included, ran the fused LoRA
    # projection once -- except GLM-4's q/k/v, whose biases PEFT's path handles (said once) -- and the MLP's
    # activation kernel ran once per layer.
    with_bias = sum(model.get_submodule(name).base_layer.bias is not None for name in lora_layers)
    assert with_bias == (6 if model_type == "glm4" else 0)
    swiglu_calls = sum(path_counts.get(("swiglu", path), 0) for path in ("torch", "triton"))
    fused_calls, peft_calls = lora_path_counts[("linear", "fused")], lora_path_counts[("linear", "peft")]
    ids, labels = _batch()
    model.train()
    model(input_ids=ids, labels=labels).loss.backward()
    assert lora_path_counts[("linear", "fused")] - fused_calls == len(lora_layers) - with_bias
    assert lora_path_counts[("linear", "peft")] - peft_calls == with_bias
    layers = model.get_base_model().config.num_hidden_layers
    assert sum(path_counts.get(("swiglu", path), 0) for path in ("torch", "triton")) - swiglu_calls == layers


@pytest.mark.parametrize("model_type", ["llama"])
def test_default_lora_targets_say_which_linear_layers_they_leave_out(model_dir, model_type):
    from fastft._log import reset_once

    reset_once()
    model, _ = FastModel.from_pretrained(model_dir)
    model.model.layers[0].mlp.extra_proj = torch.nn.Linear(64, 64)  # a projection no default names
    with pytest.warns(UserWarning, match=r"without an adapter: \['extra_proj'\]"):
        FastModel.get_peft_model(model, r=4)


@pytest.mark.parametrize("model_type", ["qwen3_moe", "gpt_oss"])
def test_default_lora_targets_cover_the_experts(model_dir, model_type):
    """MoE: the stacked experts get adapters by default (PEFT target_parameters), at the rank asked for, and train
    through the grouped GEMM. On qwen3_moe the names PEFT would remap onto the experts (doubling rank and alpha) are
    left out of target_modules, with a warning naming them."""
    from fastft._log import reset_once

    reset_once()
    model, _ = FastModel.from_pretrained(model_dir)
    moe_layers = sum(type(m).__name__ == ARCHITECTURES[model_type].experts_class for m in model.modules())
    if model_type == "qwen3_moe":
        with pytest.warns(UserWarning, match=r"PEFT maps the target names \['down_proj', 'gate_proj', 'up_proj'\]"):
            model = FastModel.get_peft_model(model, r=4, use_gradient_checkpointing=False)
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("error", UserWarning)  # nothing left uncovered: no warning
            model = FastModel.get_peft_model(model, r=4, use_gradient_checkpointing=False)
    config = model.peft_config["default"]
    assert set(config.target_modules) == {"q_proj", "k_proj", "v_proj", "o_proj"} and not config.rank_pattern
    wrappers = [m for m in model.modules() if isinstance(m, peft.tuners.lora.layer.ParamWrapper)]
    assert sorted(m.parameter_name for m in wrappers) == sorted(["gate_up_proj", "down_proj"] * moe_layers)
    assert all(m.r["default"] == 4 for m in wrappers)
    expert_lora = {n: p for n, p in model.named_parameters() if ".experts." in n and "lora_" in n}
    assert len(expert_lora) == 4 * moe_layers and all(p.requires_grad for p in expert_lora.values())
    before = path_counts.get(("grouped_gemm_backward", "triton"), 0)
    ids, labels = _batch()
    model.train()
    model(input_ids=ids, labels=labels).loss.backward()
    assert path_counts.get(("grouped_gemm_backward", "triton"), 0) > before
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in expert_lora.items() if "lora_B" in n)
