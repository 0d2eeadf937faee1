"""FastModel: patched vs unpatched for every supported architecture, LoRA training parity, QLoRA, save, unpatch."""


import warnings

import peft
import pytest
import torch
from transformers import AutoModelForCausalLM

import fastft
from fastft import FastModel
from fastft.kernels import force_path, path_counts
from fastft.offline import TINY_ARCHITECTURES, save_tiny_model
from fastft.patches.architectures import ARCHITECTURES


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


def test_patched_matches_unpatched(model_dir, model_type):
    ids, labels = _batch()
    ref = _plain(model_dir)
    with torch.no_grad():
        ref_logits = ref.eval()(input_ids=ids).logits
    ref_loss, ref_grads = _loss_and_grads(ref, ids, labels)

    model, _ = FastModel.from_pretrained(model_dir, full_finetuning=True)
    report = model._fastft_patch_report
    assert {"rope", "rms_norm", "fused_loss"} <= set(report.applied) and any(a.startswith("mlp:") for a in report.applied)
    before = dict(path_counts)
    with torch.no_grad():
        logits = model.eval()(input_ids=ids).logits
    torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-4)
    loss, grads = _loss_and_grads(model, ids, labels)
    for op in ("rms_norm", "rope", "swiglu" if model_type not in ("gemma", "gemma2") else "geglu", "cross_entropy"):
        assert path_counts.get((op, "triton"), 0) > before.get((op, "triton"), 0), f"{op} kernel did not run"
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-3, atol=1e-5, msg=name)


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


def _lora_run_matches(model_dir, steps, path):
    batches = [_batch(seed=s, seq=11) for s in range(4)]
    lora = dict(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                      "down_proj"], lora_dropout=0.0, task_type="CAUSAL_LM")
    torch.manual_seed(3407)
    ref = peft.get_peft_model(_plain(model_dir), peft.LoraConfig(**lora))
    ref.base_model.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ref_losses = _train(ref, steps, batches)

    model, _ = FastModel.from_pretrained(model_dir)
    model = FastModel.get_peft_model(model, r=8, lora_alpha=16, use_gradient_checkpointing="fastft")
    with force_path(path):
        losses = _train(model, steps, batches)
    assert losses[-1] < losses[0]
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=1e-4, atol=0)


def test_lora_training_run_matches_step_by_step(model_dir, model_type):
    """20 LoRA steps, fused paths (kernels' torch paths, fused loss, fused LoRA MLP/projections) vs plain PEFT.
    The kernels themselves run under the interpreter in the parity test above and in the short run below."""
    _lora_run_matches(model_dir, 20, "torch")


@pytest.mark.parametrize("model_type", ["llama", "gemma2"])
def test_lora_training_run_matches_under_the_interpreter(model_dir, model_type):
    _lora_run_matches(model_dir, 5, "triton")


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


@pytest.mark.parametrize("model_type", ["llama", "gemma2"])  # one untied; one tied and softcapped
def test_merged_save_round_trip(model_dir, model_type, tmp_path):
    ids, labels = _batch(seed=3)
    model, tok = FastModel.from_pretrained(model_dir)
    model = FastModel.get_peft_model(model, r=4, lora_alpha=8, init_lora_weights=False)  # non-zero adapters
    model.eval()
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    out = model.save_pretrained_merged(str(tmp_path / "merged"), tok, save_method="merged_16bit",
                                       dtype=torch.float32)
    fastft.unpatch()
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        got = reloaded(input_ids=ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert not list((tmp_path / "merged").glob("*.bin")), "safetensors only"
    bf16_dir = model.save_pretrained_merged(str(tmp_path / "merged16"), tok)
    reloaded16 = AutoModelForCausalLM.from_pretrained(bf16_dir).eval()
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
    qconf = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.float32)
    torch.manual_seed(3407)
    ref = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=qconf, device_map="cpu",
                                               dtype=torch.float32)
    ref = peft.get_peft_model(ref, peft.LoraConfig(r=4, lora_alpha=8, target_modules=[
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], task_type="CAUSAL_LM"))
    routed_before = routed_calls["dequantize_4bit"]
    ref_losses = _train(ref, 6, batches)
    assert routed_calls["dequantize_4bit"] > routed_before  # the baseline really dequantized through the fixture

    model, _ = FastModel.from_pretrained(model_dir, load_in_4bit=True)
    model = FastModel.get_peft_model(model, r=4, lora_alpha=8, use_gradient_checkpointing=False)
    losses = _train(model, 6, batches)
    assert losses[-1] < losses[0]
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=1e-4, atol=0)


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
    lora_cfg = dict(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                          "up_proj", "down_proj"], lora_dropout=0.0,
                    task_type="CAUSAL_LM", init_lora_weights=False)
    torch.manual_seed(3407)  # FastModel.get_peft_model's random_state: the same adapters
    ref = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16),
                              peft.LoraConfig(**lora_cfg))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref_loss, ref_grads = _loss_and_grads(ref, ids, labels)

    calls = []
    for name in ("LoRAMLP", "LoRAProjections"):
        fn = getattr(lora, name)
        monkeypatch.setattr(fn, "apply", (lambda f, n: lambda *a: calls.append(n) or f(*a))(fn.apply, name))
    model, _ = FastModel.from_pretrained(model_dir, dtype=torch.bfloat16)
    model = FastModel.get_peft_model(model, use_gradient_checkpointing=False, **{
        k: v for k, v in lora_cfg.items() if k not in ("task_type",)})
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
    peft_model = FastModel.get_peft_model(model, r=4, target_modules=["model.layers.0.self_attn.q_proj", "v_proj"],
                                          use_gradient_checkpointing=False)  # PEFT's dotted-suffix names match
    assert len([n for n, _ in peft_model.named_modules() if n.endswith("q_proj.lora_A")]) == 1


@pytest.mark.parametrize("model_type", ["llama"])
def test_fused_lora_counts_mlps_and_attention_projections_apart(model_dir, model_type, caplog):
    import logging

    model, _ = FastModel.from_pretrained(model_dir)
    with caplog.at_level(logging.INFO, logger="fastft"):
        FastModel.get_peft_model(model, r=4, use_gradient_checkpointing=False)
    # the tiny model has 2 layers: 2 MLPs, and q/k/v/o in each attention block
    assert any("fused LoRA on 2 MLPs and 8 attention projections" in r.getMessage() for r in caplog.records)
