"""GGUF export read back by an independent reader (transformers' GGUF loader, via the gguf package; see
``gguf_reader.py`` for the values it misses and how they are taken from the file): logits equal the merged model's
within the quantization's bound, the tokenizer round-trips, the Modelfile is written.

Bounds on max |logit difference| / max |logit| of the merged fp32 model (tiny random models, hidden 64, 13 tokens):
f32 1e-5 (names, permutations and norm offsets exactly right); f16 0.5% and bf16 2% (measured up to 0.10% / 0.92%,
gemma3 highest); q8_0 5% (measured 0.3% gemma .. 2.5% gemma3: 64-wide rows hold two 32-blocks, and the tiny models'
logits are small, so this relative figure is far above a real model's).
"""

import os

import pytest
import torch

pytest.importorskip("gguf")

from fastft.export import save_gguf
from fastft.offline import build_tiny_model, build_tokenizer
from tests.export.gguf_reader import file_fields, read_back, relative_logit_error

BOUNDS = {"f32": 1e-5, "f16": 0.005, "bf16": 0.02, "q8_0": 0.05}
PROMPT = "The quick brown fox: what is 12 plus 7? The answer is 19."
GPT_OSS_YARN = {
    "rope_type": "yarn",
    "rope_theta": 150000.0,
    "factor": 32.0,
    "beta_fast": 32.0,
    "beta_slow": 1.0,
    "original_max_position_embeddings": 4096,
    "truncate": True,
}
ROWS = ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3", "qwen3_moe"]
ROWS += ["mixtral", "ministral", "granite", "olmo2", "olmo3", "smollm3", "glm4", "gpt_oss", "ministral3"]
ROWS += ["gemma4_text"]
#: Fixture changes llama.cpp needs: qwen3moe makes every layer sparse (the fixture's layer 1 is dense); smollm3 skips
#: RoPE in every 4th layer (the fixture skips it in layer 1); llama.cpp runs ministral with full attention (a window
#: longer than the prompt; the GGUF's context_length is capped to it). Granite's attention multiplier is moved off
#: 1/sqrt(head_dim) (the fixture's 0.0625) and its weights drawn 10x wider, so attention is not near uniform and a
#: file without the multiplier shows (llama.cpp: 14% logit error without it, vs 0.0004% at the fixture's init).
OVERRIDES = {
    "granite": {"attention_multiplier": 0.1, "initializer_range": 0.2},
    "qwen3_moe": {"mlp_only_layers": []},
    "smollm3": {"num_hidden_layers": 4, "no_rope_layers": [1, 1, 1, 0]},
    "ministral": {"sliding_window": 64},
    # gpt-oss's own truncate=False YaRN is exported with a warning (llama.cpp rounds the correction range: tested in
    # test_gguf_errors.py / test_gguf_llama_cpp.py); the rounded variant is what llama.cpp computes
    "gpt_oss": {"rope_parameters": GPT_OSS_YARN},
    # Ministral 3's YaRN over an original context of 4 positions (stock: 16,384), so the prompt crosses Llama 4's
    # query temperature steps (1 + 0.1 log(1 + floor(pos / 4))); mscale_all_dim 2 so the YaRN attention factor is not
    # 1; init std 0.1 so attention is not near uniform (llama.cpp without the temperature key: 11% logit error,
    # without the log multiplier: 87%).
    "ministral3": {
        "rope_parameters": {
            "rope_type": "yarn",
            "rope_theta": 1e6,
            "factor": 16.0,
            "original_max_position_embeddings": 4,
            "beta_fast": 32.0,
            "beta_slow": 1.0,
            "mscale": 1.0,
            "mscale_all_dim": 2.0,
            "llama_4_scaling_beta": 0.1,
        },
        "max_position_embeddings": 64,
        "initializer_range": 0.1,
    },
}


def phi3_longrope(original: int, partial: float = 1.0, head_dim: int = 16) -> dict:
    """Config changes for a tiny Phi-3 with LongRoPE: distinct long and short factors (long up to 4.5, so the wrong
    set shows), max_position_embeddings 4x the original (transformers' attention factor sqrt(1 + ln 4 / ln orig))
    and init std 0.1 so attention is not near uniform."""
    pairs = int(head_dim * partial) // 2
    rope = {
        "rope_type": "longrope",
        "rope_theta": 10000.0,
        "long_factor": [1.0 + 0.5 * i for i in range(pairs)],
        "short_factor": [1.0 + 0.1 * i for i in range(pairs)],
        "original_max_position_embeddings": original,
        "partial_rotary_factor": partial,
    }
    return {
        "rope_parameters": rope,
        "max_position_embeddings": 4 * original,
        "original_max_position_embeddings": original,
        "initializer_range": 0.1,
    }


def build_fixture(model_type: str, overrides: dict) -> torch.nn.Module:
    """The tiny model of a row. Gemma 4 has no query scaling (attention scale 1; a trained checkpoint's q_norm weights
    carry the temperature): at the random init (q_norm = 1) attention logits have std ~sqrt(head_dim), attention is
    near argmax, and rounding the weights alone (in transformers, no GGUF) moves the output logits 12% at q8_0 and 3.5%
    at bf16. So its q_norm weights are set to head_dim ** -0.5 (the usual temperature: 3.2% / 0.8% then), and every
    other 1-D weight (norms, layer scalars, all 1 at init) is drawn at 1 +- 20%, so a swapped or shifted norm shows."""
    model = build_tiny_model(model_type, **overrides)
    if model_type == "gemma4_text":
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
                if tensor.dim() == 1 and name in model.state_dict():  # persistent only (not RoPE / embed scales)
                    tensor.mul_(1 + 0.2 * torch.randn(tensor.shape, generator=gen))
            for layer in model.model.layers:
                layer.self_attn.q_norm.weight.mul_(layer.self_attn.head_dim**-0.5)
    return model


def fixture_overrides(model_type: str, quantization: str) -> dict:
    """OVERRIDES, plus: gpt-oss at q8_0 with every expert active. Its rounded weights upstream of the router flip
    near-tied top-2 choices among the tiny model's 5 random experts at single positions (measured 25-29% logit error
    there, ~1% elsewhere, in transformers' reading and in llama.cpp); with all experts active no choice can flip.
    f32/f16/bf16 check the top-2 routing itself."""
    overrides = dict(OVERRIDES.get(model_type, {}))
    if model_type == "gpt_oss" and quantization == "q8_0":
        overrides["num_experts_per_tok"] = 5  # the fixture's num_local_experts
    return overrides


@pytest.mark.parametrize("quantization", list(BOUNDS))
@pytest.mark.parametrize("model_type", ROWS)
def test_logits_match_merged_model(model_type, quantization, tmp_path):
    tok = build_tokenizer()
    overrides = fixture_overrides(model_type, quantization)
    model = build_fixture(model_type, overrides)
    path = save_gguf(model, str(tmp_path), tok, quantization)
    assert os.path.basename(path) == f"model.{quantization.upper()}.gguf"
    loaded = read_back(model_type, path, overrides)
    ids = torch.tensor([tok(PROMPT)["input_ids"]])
    assert ids.shape[1] > 5  # longer than gemma3's sliding window: the per-layer pattern matters
    with torch.no_grad():
        err = relative_logit_error(model(ids).logits, loaded(ids).logits)
    assert err <= BOUNDS[quantization], f"{model_type} {quantization}: relative logit error {err:.5f}"
    if quantization != "f32":
        assert err > 0  # a real round trip through a lossy type, not the same tensors
    assert sorted(os.listdir(tmp_path)) == sorted([os.path.basename(path), "Modelfile"])  # no temporaries left


#: Gemma 4 layouts beyond the fixture's (3 layers: sliding, full, full-shared; k == v; per-layer embeddings): an
#: E2B-like stack whose shared layers include a sliding one (llama.cpp reuses layer first_shared - 2 for it) without
#: k == v, and a 31B-like one without per-layer embeddings, KV sharing or the double-wide MLP.
GEMMA4_VARIANTS = {
    "shared_sliding": {
        "num_hidden_layers": 6,
        "layer_types": ["sliding_attention", "sliding_attention", "full_attention"] * 2,
        "num_kv_shared_layers": 3,
        "attention_k_eq_v": False,
    },
    "no_per_layer_inputs": {"hidden_size_per_layer_input": 0, "num_kv_shared_layers": 0, "use_double_wide_mlp": False},
}


@pytest.mark.parametrize("quantization", ["f32", "f16"])
@pytest.mark.parametrize("variant", list(GEMMA4_VARIANTS))
def test_gemma4_layouts_logits_match(variant, quantization, tmp_path):
    overrides = GEMMA4_VARIANTS[variant]
    model = build_fixture("gemma4_text", overrides)
    path = save_gguf(model, str(tmp_path), build_tokenizer(), quantization)
    ids = torch.tensor([build_tokenizer()(PROMPT)["input_ids"]])
    with torch.no_grad():
        err = relative_logit_error(model(ids).logits, read_back("gemma4_text", path, overrides)(ids).logits)
    assert err <= BOUNDS[quantization], f"gemma4_text {variant} {quantization}: {err:.5f}"


#: Gemma 4 with MoE blocks (the 26B-A4B layout: dense MLP plus routed experts in every layer), 4 experts, top-2
GEMMA4_MOE = {"enable_moe_block": True, "num_experts": 4, "top_k_experts": 2, "moe_intermediate_size": 32}


def gemma4_moe_fixture() -> tuple[torch.nn.Module, torch.nn.Module]:
    """(the MoE fixture with per-expert scales and router scales off 1, the same model with them at 1): a file that
    dropped or misplaced either would match the second, not the first."""
    models = []
    for scaled in (True, False):
        model = build_fixture("gemma4_text", GEMMA4_MOE)
        if scaled:
            with torch.no_grad():
                for layer in model.model.layers:
                    layer.router.per_expert_scale.copy_(torch.tensor([0.5, 1.5, 0.8, 1.2]))
                    layer.router.scale.mul_(3.0)
        models.append(model)
    return models[0], models[1]


@pytest.mark.parametrize("quantization", ["f32", "f16"])
def test_gemma4_moe_logits_match(quantization, tmp_path):
    model, unscaled = gemma4_moe_fixture()
    path = save_gguf(model, str(tmp_path), build_tokenizer(), quantization)
    ids = torch.tensor([build_tokenizer()(PROMPT)["input_ids"]])
    with torch.no_grad():
        want, got, control = model(ids).logits, read_back("gemma4_text", path, GEMMA4_MOE)(ids).logits, unscaled(ids).logits
    assert relative_logit_error(want, got) <= BOUNDS[quantization]
    assert relative_logit_error(want, control) > 0.05  # the router and expert scales matter at this size


def test_metadata_llama_cpp_reads(tmp_path):
    """Keys llama.cpp needs that transformers' reader ignores: checked in the file itself."""
    model = build_tiny_model("gemma2")
    _, fields = file_fields(save_gguf(model, str(tmp_path), build_tokenizer(), "f16"))
    config = model.config
    assert fields["attention.sliding_window"] == config.sliding_window
    assert fields["attention.sliding_window_pattern"] == [t == "sliding_attention" for t in config.layer_types]
    assert fields["attn_logit_softcapping"] == pytest.approx(config.attn_logit_softcapping)
    assert fields["final_logit_softcapping"] == pytest.approx(config.final_logit_softcapping)
    assert fields["attention.layer_norm_rms_epsilon"] == pytest.approx(config.rms_norm_eps)
    assert fields["attention.head_count_kv"] == config.num_key_value_heads
    _, g3 = file_fields(save_gguf(build_tiny_model("gemma3_text"), str(tmp_path / "g3"), build_tokenizer(), "f16"))
    assert g3["rope.freq_base"] == 1e6 and g3["rope.freq_base_swa"] == 1e4  # global vs sliding layers' theta


def test_llama3_rope_scaling_written_as_llama_cpp_frequency_factors(tmp_path):
    """Llama 3.1 RoPE scaling is a ``rope_freqs`` tensor of divisors: base frequencies / factors must equal the
    inverse frequencies transformers computes for the same config."""
    import gguf
    import numpy as np
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rope = {
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    }
    model = build_tiny_model("llama", rope_parameters=rope, max_position_embeddings=1024)
    path = save_gguf(model, str(tmp_path), build_tokenizer(), "f16")
    tensor = next(t for t in gguf.GGUFReader(path).tensors if t.name == "rope_freqs.weight")
    factors = torch.from_numpy(np.array(tensor.data, dtype=np.float32)).double()
    want, _ = ROPE_INIT_FUNCTIONS["llama3"](model.config, "cpu")
    base = 1.0 / (500000.0 ** (torch.arange(0, 16, 2, dtype=torch.float64) / 16))
    assert {1.0, 8.0} < set(factors.tolist())  # high, low and interpolated bands all present at these sizes
    torch.testing.assert_close(base / factors, want.double(), rtol=1e-6, atol=0)


def test_lora_adapters_are_merged_fastmodel_path(tmp_path):
    """FastModel + LoRA with non-zero adapters: the GGUF holds base + B A * scale, merged in fp32."""
    import fastft
    from fastft import FastModel
    from fastft.offline import save_tiny_model

    model_dir = save_tiny_model(str(tmp_path / "base"), "qwen2")
    model, tok = FastModel.from_pretrained(model_dir)
    model = FastModel.get_peft_model(model, r=4, lora_alpha=8, init_lora_weights=False)
    model.eval()
    ids = torch.tensor([tok(PROMPT)["input_ids"]])
    with torch.no_grad():
        want = model(input_ids=ids).logits
    path = model.save_pretrained_gguf(str(tmp_path / "gguf"), tok, quantization="f32")
    fastft.unpatch()
    plain = build_tiny_model("qwen2")  # the same base weights (seed 0) without the adapters
    with torch.no_grad():
        got, base = read_back("qwen2", path)(ids).logits, plain(ids).logits
    assert relative_logit_error(want, got) <= 1e-4  # fp32 merge: only summation order differs
    assert relative_logit_error(want, base) > 0.05  # the adapters changed the model


def test_qlora_nf4_base_is_dequantized_then_merged(tmp_path, bnb_default_cpu_kernels):
    """A 4-bit base: the export dequantizes it and merges the adapters in fp32; the GGUF model equals the NF4 LoRA
    model's own forward (f32 file, so only the merge's summation order differs)."""
    assert _fastmodel_lora_export_error(tmp_path, "llama", {}, load_in_4bit=True) <= 1e-3


def test_tokenizer_round_trip(tmp_path):
    from transformers import AutoTokenizer

    tok = build_tokenizer()
    path = save_gguf(build_tiny_model("qwen2"), str(tmp_path), tok, "q8_0")
    back = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=os.path.basename(path))
    chat = tok.apply_chat_template(
        [{"role": "user", "content": "hi, 12 plus 7?"}], tokenize=False, add_generation_prompt=True
    )
    for text in ["plain ASCII text, 12 + 7 = 19.", "héllo wörld – ünïcode 日本語 🙂", "<|im_start|>user<|im_end|>", chat]:
        assert back(text)["input_ids"] == tok(text)["input_ids"], text
        assert back.decode(tok(text)["input_ids"]) == tok.decode(tok(text)["input_ids"])
    assert back.eos_token == tok.eos_token and back.bos_token == tok.bos_token


def test_chat_template_stored_without_transformers_only_tags(tmp_path):
    import gguf

    path = save_gguf(build_tiny_model("llama"), str(tmp_path), build_tokenizer(), "f16", modelfile=False)
    field = gguf.GGUFReader(path).fields["tokenizer.chat_template"]
    template = field.contents()
    assert "<|im_start|>" in template and "{% generation %}" not in template and "endgeneration" not in template
    assert not (tmp_path / "Modelfile").exists()


def test_rope_scaling_and_mistral_window_keys(tmp_path):
    yarn = {
        "rope_type": "yarn",
        "rope_theta": 10000.0,
        "factor": 4.0,
        "original_max_position_embeddings": 1024,
        "beta_fast": 16.0,
    }
    _, fields = file_fields(
        save_gguf(build_tiny_model("qwen2", rope_parameters=yarn), str(tmp_path / "y"), build_tokenizer(), "f16")
    )
    assert (fields["rope.scaling.type"], fields["rope.scaling.factor"]) == ("yarn", 4.0)
    assert fields["rope.scaling.original_context_length"] == 1024 and fields["rope.scaling.yarn_beta_fast"] == 16.0
    assert "rope.scaling.yarn_beta_slow" not in fields  # not in the config: llama.cpp's default is transformers'
    linear = {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0}
    _, fields = file_fields(
        save_gguf(build_tiny_model("llama", rope_parameters=linear), str(tmp_path / "l"), build_tokenizer(), "f16")
    )
    assert (fields["rope.scaling.type"], fields["rope.scaling.factor"]) == ("linear", 2.0)
    _, fields = file_fields(
        save_gguf(build_tiny_model("mistral", sliding_window=64), str(tmp_path / "m"), build_tokenizer(), "f16")
    )
    assert fields["context_length"] == 64  # llama.cpp's llama arch attends fully: equal only up to the window


def test_phi3_partial_rotary(tmp_path):
    """Phi-3 with half its head rotated: llama.cpp's NEOX rope over the first rope.dimension_count dims is
    transformers' rotate-half of the rotary slice; the file states 8 of 16 dims, and read back the logits match (a
    full-rotary model of the same weights differs by ~86% here, so the slice matters)."""
    model = build_tiny_model("phi3", partial_rotary_factor=0.5, initializer_range=0.1)
    path = save_gguf(model, str(tmp_path), build_tokenizer(), "f32")
    _, fields = file_fields(path)
    assert (fields["rope.dimension_count"], fields["attention.key_length"]) == (8, 16)
    ids = torch.tensor([build_tokenizer()(PROMPT)["input_ids"]])
    with torch.no_grad():
        err = relative_logit_error(model(ids).logits, read_back("phi3", path)(ids).logits)
        full = relative_logit_error(model(ids).logits, build_tiny_model("phi3", initializer_range=0.1)(ids).logits)
    assert err <= BOUNDS["f32"] and full > 0.1, (err, full)


@pytest.mark.parametrize("partial", [1.0, 0.5])
def test_phi3_longrope_factor_tensors_keys_and_round_trip(tmp_path, caplog, partial):
    """Phi-3 LongRoPE: rope_factors_long/short ([rotary dims / 2], F32) with base frequencies / factors equal to
    transformers' long and short inverse frequencies, rope.scaling.attn_factor = transformers' attention factor, the
    original context, no scaling type (llama.cpp: no YaRN, no linear scale); one warning at export. Read back (the
    values taken from the file), the logits match at a sequence within the original context (short factors) and one
    beyond it (long factors), which differ from each other by far more than the bound."""
    import logging

    import gguf
    import numpy as np
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    model = build_tiny_model("phi3", **phi3_longrope(32, partial))
    rot = int(16 * partial)
    with caplog.at_level(logging.WARNING, logger="fastft"):
        path = save_gguf(model, str(tmp_path), build_tokenizer(), "f32")
    assert sum("LongRoPE" in r.getMessage() for r in caplog.records) == 1
    _, fields = file_fields(path)
    short_inv, attention = ROPE_INIT_FUNCTIONS["longrope"](model.config, "cpu")
    long_inv, _ = ROPE_INIT_FUNCTIONS["longrope"](model.config, "cpu", seq_len=33)
    assert attention > 1.0 and fields["rope.scaling.attn_factor"] == pytest.approx(attention, rel=1e-6)
    assert fields["rope.scaling.original_context_length"] == 32 and "rope.scaling.type" not in fields
    assert fields["rope.dimension_count"] == rot
    tensors = {t.name: t for t in gguf.GGUFReader(path).tensors}
    base = 1.0 / 10000.0 ** (torch.arange(0, rot, 2, dtype=torch.float64) / rot)
    for kind, want in ((gguf.MODEL_TENSOR.ROPE_FACTORS_LONG, long_inv), (gguf.MODEL_TENSOR.ROPE_FACTORS_SHORT, short_inv)):
        tensor = tensors[gguf.TENSOR_NAMES[kind] + ".weight"]
        assert [int(d) for d in tensor.shape] == [rot // 2] and tensor.tensor_type.name == "F32"
        factors = torch.from_numpy(np.array(tensor.data, dtype=np.float32)).double()
        torch.testing.assert_close(base / factors, want.double(), rtol=1e-6, atol=0)
    loaded = read_back("phi3", path)
    ids = build_tokenizer()(PROMPT)["input_ids"]
    short, long = torch.tensor([ids]), torch.tensor([ids + ids])  # 23 and 46 tokens: short and long factors
    assert short.shape[1] <= 32 < long.shape[1]
    with torch.no_grad():
        want_short, want_long = model(short).logits, model(long).logits
        assert relative_logit_error(want_short, loaded(short).logits) <= BOUNDS["f32"]
        assert relative_logit_error(want_long, loaded(long).logits) <= BOUNDS["f32"]
    assert relative_logit_error(want_short, want_long[:, : short.shape[1]]) > 0.01  # long != short factors here


@pytest.mark.parametrize("model_type", ["mixtral", "gpt_oss", "granite", "gemma4_text"])
def test_lora_merge_into_rows_with_experts_and_multipliers(model_type, tmp_path):
    """FastModel (patched) + non-zero LoRA adapters on rows whose export splits experts or writes multipliers (and
    Gemma 4's own tensor mapping): the f32 GGUF, read back, equals the LoRA model's own forward (only the merge's
    summation order differs)."""
    assert _fastmodel_lora_export_error(tmp_path, model_type, OVERRIDES.get(model_type, {})) <= 1e-4


def _fastmodel_lora_export_error(tmp_path, model_type: str, overrides: dict, **load) -> float:
    """Relative logit error between a FastModel LoRA model (non-zero adapters, ``load``: from_pretrained options) and
    its f32 GGUF export read back after unpatching."""
    import fastft
    from fastft import FastModel
    from fastft.offline import save_tiny_model

    model, tok = FastModel.from_pretrained(save_tiny_model(str(tmp_path / "base"), model_type, **overrides), **load)
    model = FastModel.get_peft_model(model, r=4, lora_alpha=8, init_lora_weights=False)
    model.eval()
    ids = torch.tensor([tok(PROMPT)["input_ids"]])
    with torch.no_grad():
        want = model(input_ids=ids).logits.float()
    path = model.save_pretrained_gguf(str(tmp_path / "gguf"), tok, quantization="f32")
    fastft.unpatch()
    with torch.no_grad():
        got = read_back(model_type, path, overrides)(ids).logits
    return relative_logit_error(want, got)
