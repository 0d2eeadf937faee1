"""The GGUF files of the rows transformers cannot read back, checked against llama.cpp's expectations without going
through fastft's own mapping: key names come from ``gguf.Keys``, tensor names from ``gguf.TENSOR_NAMES``, and the
per-layer tensor sets below are the ones llama.cpp's ``load_arch_tensors`` creates as required for each arch (the
llama.cpp vendored in llama-cpp-python 0.3.36: src/models/{llama,granite,olmo2,smollm3,glm4,openai-moe,mistral3}.cpp).
Values are computed here from the transformers config. The logits round trip by tensor names is in
test_gguf_roundtrip.py; the llama.cpp run itself in test_gguf_llama_cpp.py (benchmark).
"""

import re

import pytest
import torch

gguf = pytest.importorskip("gguf")

from fastft.export import save_gguf  # noqa: E402
from fastft.offline import build_tiny_model, build_tokenizer  # noqa: E402
from tests.export.gguf_reader import file_fields  # noqa: E402
from tests.export.test_gguf_roundtrip import OVERRIDES  # noqa: E402

T = gguf.MODEL_TENSOR
_ATTN = [T.ATTN_Q, T.ATTN_K, T.ATTN_V, T.ATTN_OUT]
_LLAMA_DENSE = [T.ATTN_NORM, *_ATTN, T.FFN_NORM, T.FFN_GATE, T.FFN_UP, T.FFN_DOWN]
#: (llama.cpp arch, tensors of every block) per row
LAYOUT = {
    "mixtral": ("llama", [T.ATTN_NORM, *_ATTN, T.FFN_NORM, T.FFN_GATE_INP, T.FFN_GATE_EXP, T.FFN_UP_EXP, T.FFN_DOWN_EXP]),
    "ministral": ("llama", _LLAMA_DENSE),
    "granite": ("granite", _LLAMA_DENSE),
    "smollm3": ("smollm3", _LLAMA_DENSE),
    "ministral3": ("mistral3", _LLAMA_DENSE),
    "olmo2": (
        "olmo2",
        [*_ATTN, T.ATTN_Q_NORM, T.ATTN_K_NORM, T.ATTN_POST_NORM, T.FFN_GATE, T.FFN_UP, T.FFN_DOWN, T.FFN_POST_NORM],
    ),
    "glm4": ("glm4", [T.ATTN_NORM, *_ATTN, T.ATTN_POST_NORM, T.FFN_NORM, T.FFN_UP, T.FFN_DOWN, T.FFN_POST_NORM]),
}
LAYOUT["olmo3"] = LAYOUT["olmo2"]
_EXPERTS = [T.FFN_GATE_INP, T.FFN_GATE_EXP, T.FFN_UP_EXP, T.FFN_DOWN_EXP]
LAYOUT["gpt_oss"] = ("gpt-oss", [T.ATTN_NORM, *_ATTN, T.ATTN_SINKS, T.ATTN_POST_NORM, *_EXPERTS])
#: bias tensors llama.cpp loads per block
BIASES = {
    "glm4": [T.ATTN_Q, T.ATTN_K, T.ATTN_V],
    "gpt_oss": [*_ATTN, *_EXPERTS],
}


def _key(template: str, arch: str) -> str:
    return template.format(arch=arch)[len(arch) + 1 :]


def _expected_keys(model_type: str, config) -> dict:
    """What llama.cpp reads for this row, from the transformers config."""
    L, A = gguf.Keys.LLM, gguf.Keys.Attention
    arch = LAYOUT[model_type][0]
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    want = {
        _key(L.EMBEDDING_LENGTH, arch): config.hidden_size,
        _key(L.BLOCK_COUNT, arch): config.num_hidden_layers,
        _key(L.FEED_FORWARD_LENGTH, arch): config.intermediate_size,
        _key(A.HEAD_COUNT, arch): config.num_attention_heads,
        _key(A.HEAD_COUNT_KV, arch): config.num_key_value_heads,
        _key(A.LAYERNORM_RMS_EPS, arch): pytest.approx(config.rms_norm_eps),
        _key(gguf.Keys.Rope.FREQ_BASE, arch): pytest.approx(config.rope_parameters.get("rope_theta", 10000.0))
        if "rope_theta" in config.rope_parameters
        else pytest.approx(config.rope_parameters["full_attention"]["rope_theta"]),
        _key(gguf.Keys.Rope.DIMENSION_COUNT, arch): head_dim,
    }
    if model_type in ("mixtral", "gpt_oss"):
        want[_key(L.EXPERT_COUNT, arch)] = config.num_local_experts
        want[_key(L.EXPERT_USED_COUNT, arch)] = config.num_experts_per_tok
    if model_type == "gpt_oss":  # llama.cpp: expert width, window, per-layer pattern, YaRN
        rope = config.rope_parameters
        want[_key(L.EXPERT_FEED_FORWARD_LENGTH, arch)] = config.intermediate_size
        want[_key(A.SLIDING_WINDOW, arch)] = config.sliding_window
        want[_key(A.SLIDING_WINDOW_PATTERN, arch)] = [t == "sliding_attention" for t in config.layer_types]
        want[_key(gguf.Keys.Rope.SCALING_TYPE, arch)] = "yarn"
        want[_key(gguf.Keys.Rope.SCALING_FACTOR, arch)] = rope["factor"]
        want[_key(gguf.Keys.Rope.SCALING_ORIG_CTX_LEN, arch)] = rope["original_max_position_embeddings"]
        want[_key(gguf.Keys.Rope.SCALING_YARN_BETA_FAST, arch)] = rope["beta_fast"]
        want[_key(gguf.Keys.Rope.SCALING_YARN_BETA_SLOW, arch)] = rope["beta_slow"]
    if model_type == "granite":  # the four multipliers, each one llama.cpp reads
        want[_key(L.EMBEDDING_SCALE, arch)] = pytest.approx(config.embedding_multiplier)
        want[_key(L.RESIDUAL_SCALE, arch)] = pytest.approx(config.residual_multiplier)
        want[_key(A.SCALE, arch)] = pytest.approx(config.attention_multiplier)
        want[_key(L.LOGIT_SCALE, arch)] = pytest.approx(config.logits_scaling)
    if model_type == "olmo3":
        want[_key(A.SLIDING_WINDOW, arch)] = config.sliding_window
        want[_key(A.SLIDING_WINDOW_PATTERN, arch)] = [t == "sliding_attention" for t in config.layer_types]
    if model_type == "ministral3":  # YaRN with mscale_all_dim as llama.cpp's log multiplier; Llama 4 temperature
        rope = config.rope_parameters
        want[_key(gguf.Keys.Rope.SCALING_TYPE, arch)] = "yarn"
        want[_key(gguf.Keys.Rope.SCALING_FACTOR, arch)] = rope["factor"]
        want[_key(gguf.Keys.Rope.SCALING_ORIG_CTX_LEN, arch)] = rope["original_max_position_embeddings"]
        want[_key(gguf.Keys.Rope.SCALING_YARN_LOG_MUL, arch)] = rope["mscale_all_dim"]
        want[_key(A.TEMPERATURE_SCALE, arch)] = pytest.approx(rope["llama_4_scaling_beta"])
    if model_type == "glm4":  # rotary over the first half of each head only
        want[_key(gguf.Keys.Rope.DIMENSION_COUNT, arch)] = int(head_dim * config.rope_parameters["partial_rotary_factor"])
    if model_type == "ministral":  # llama.cpp's llama arch attends fully: equal to transformers up to the window
        want[_key(L.CONTEXT_LENGTH, arch)] = config.sliding_window
    else:
        want[_key(L.CONTEXT_LENGTH, arch)] = config.max_position_embeddings
    return want


@pytest.mark.parametrize("model_type", sorted(LAYOUT))
def test_keys_and_tensors_are_llama_cpps(model_type, tmp_path):
    model = build_tiny_model(model_type, **OVERRIDES.get(model_type, {}))
    config = model.config
    path = save_gguf(model, str(tmp_path), build_tokenizer(), "f16")
    arch, fields = file_fields(path)
    want_arch, block = LAYOUT[model_type]
    assert arch == want_arch
    for key, value in _expected_keys(model_type, config).items():
        assert fields.get(key) == value, (key, fields.get(key), value)
    arch_enum = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)
    known = set(gguf.MODEL_TENSORS[arch_enum])
    assert set(block) <= known  # the layout above names only tensors gguf lists for this arch
    want_names = {gguf.TENSOR_NAMES[t] + ".weight" for t in (T.TOKEN_EMBD, T.OUTPUT_NORM, T.OUTPUT)}
    for i in range(config.num_hidden_layers):
        want_names |= {gguf.TENSOR_NAMES[t].format(bid=i) + ".weight" for t in block}
    for i in range(config.num_hidden_layers):
        want_names |= {gguf.TENSOR_NAMES[t].format(bid=i) + ".bias" for t in BIASES.get(model_type, [])}
    tensors = {t.name: t for t in gguf.GGUFReader(path).tensors}
    assert set(tensors) == want_names
    if model_type in ("mixtral", "gpt_oss"):  # llama.cpp: ffn_{gate,up}_exps {n_embd, n_ff, n_expert}, down {n_ff, ...}
        e, h, ff = config.num_local_experts, config.hidden_size, config.intermediate_size
        assert [int(d) for d in tensors["blk.0.ffn_gate_exps.weight"].shape] == [h, ff, e]
        assert [int(d) for d in tensors["blk.0.ffn_down_exps.weight"].shape] == [ff, h, e]
    if model_type == "glm4":  # llama.cpp: ffn_up {n_embd, n_ff * 2} (gate and up fused, gate first)
        assert [int(d) for d in tensors["blk.0.ffn_up.weight"].shape] == [config.hidden_size, 2 * config.intermediate_size]


def test_glm4_rotary_slice_is_not_permuted(tmp_path):
    """GLM-4 rotates interleaved pairs in transformers and in llama.cpp (NORM rope): Q rows are written unchanged,
    unlike llama-arch rows whose halves are interleaved for llama.cpp."""
    import numpy as np

    model = build_tiny_model("glm4")
    path = save_gguf(model, str(tmp_path), build_tokenizer(), "f32")
    q = next(t for t in gguf.GGUFReader(path).tensors if t.name == "blk.0.attn_q.weight")
    got = torch.from_numpy(np.array(q.data, dtype=np.float32)).reshape(model.model.layers[0].self_attn.q_proj.weight.shape)
    torch.testing.assert_close(got, model.model.layers[0].self_attn.q_proj.weight.detach(), rtol=0, atol=0)


def _gemma4_expected(config) -> tuple[dict, dict]:
    """(keys, {tensor name: llama.cpp shape (ggml order)}) llama.cpp's gemma4 loader reads / creates for this
    config (src/models/gemma4.cpp load_arch_hparams / load_arch_tensors), computed from the transformers config."""
    L, A, R = gguf.Keys.LLM, gguf.Keys.Attention, gguf.Keys.Rope
    n, h, p = config.num_hidden_layers, config.hidden_size, config.hidden_size_per_layer_input
    heads, types = config.num_attention_heads, config.layer_types
    layer = [config.per_layer_config[i] for i in range(n)]
    first_shared = n - config.num_kv_shared_layers
    ff = [config.intermediate_size * (2 if config.use_double_wide_mlp and i >= first_shared else 1) for i in range(n)]
    full = next(c for c, t in zip(layer, types) if t == "full_attention")
    swa = next(c for c, t in zip(layer, types) if t == "sliding_attention")
    keys = {
        L.CONTEXT_LENGTH: config.max_position_embeddings,
        L.EMBEDDING_LENGTH: h,
        L.BLOCK_COUNT: n,
        L.FEED_FORWARD_LENGTH: ff,
        A.HEAD_COUNT: heads,
        A.HEAD_COUNT_KV: [c.num_key_value_heads for c in layer],
        A.LAYERNORM_RMS_EPS: pytest.approx(config.rms_norm_eps),
        A.KEY_LENGTH: full.head_dim,
        A.VALUE_LENGTH: full.head_dim,
        A.KEY_LENGTH_SWA: swa.head_dim,
        A.VALUE_LENGTH_SWA: swa.head_dim,
        R.DIMENSION_COUNT: full.head_dim,
        R.DIMENSION_COUNT_SWA: swa.head_dim,
        R.FREQ_BASE: pytest.approx(config.rope_parameters["full_attention"]["rope_theta"]),
        R.FREQ_BASE_SWA: pytest.approx(config.rope_parameters["sliding_attention"]["rope_theta"]),
        A.SLIDING_WINDOW: config.sliding_window,
        A.SLIDING_WINDOW_PATTERN: [t == "sliding_attention" for t in types],
        A.SHARED_KV_LAYERS: config.num_kv_shared_layers,
        L.EMBD_LENGTH_PER_LAYER_INP: p,
        L.FINAL_LOGIT_SOFTCAPPING: pytest.approx(config.final_logit_softcapping),
    }
    if config.enable_moe_block:
        keys[L.EXPERT_COUNT] = config.num_experts
        keys[L.EXPERT_USED_COUNT] = config.top_k_experts
        keys[L.EXPERT_FEED_FORWARD_LENGTH] = config.moe_intermediate_size
    keys = {_key(k, "gemma4"): v for k, v in keys.items()}
    T_ = gguf.TENSOR_NAMES
    shapes = {
        T_[T.TOKEN_EMBD] + ".weight": [h, config.vocab_size],  # tied: no output.weight (llama.cpp duplicates this)
        T_[T.OUTPUT_NORM] + ".weight": [h],
        T_[T.ROPE_FREQS] + ".weight": [full.head_dim // 2],
        T_[T.PER_LAYER_TOKEN_EMBD] + ".weight": [p * n, config.vocab_size],
        T_[T.PER_LAYER_MODEL_PROJ] + ".weight": [h, p * n],
        T_[T.PER_LAYER_PROJ_NORM] + ".weight": [p],
    }
    for i, c in enumerate(layer):
        d, kv = c.head_dim, c.num_key_value_heads
        block = {
            T.ATTN_NORM: [h],
            T.ATTN_Q: [h, d * heads],
            T.ATTN_Q_NORM: [d],
            T.ATTN_OUT: [d * heads, h],
            T.ATTN_POST_NORM: [h],
            T.LAYER_OUT_SCALE: [1],
            T.FFN_NORM: [h],
            T.FFN_GATE: [h, ff[i]],
            T.FFN_UP: [h, ff[i]],
            T.FFN_DOWN: [ff[i], h],
            T.FFN_POST_NORM: [h],
            T.PER_LAYER_INP_GATE: [h, p],
            T.PER_LAYER_PROJ: [p, h],
            T.PER_LAYER_POST_NORM: [h],
        }
        if i < first_shared:  # KV layers; shared ones have no K/V (llama.cpp: not required there)
            block |= {T.ATTN_K: [h, d * kv], T.ATTN_K_NORM: [d]}
            if not (config.attention_k_eq_v and types[i] == "full_attention"):  # k == v: no attn_v, llama.cpp uses K
                block[T.ATTN_V] = [h, d * kv]
        if config.enable_moe_block:
            e, f = config.num_experts, config.moe_intermediate_size
            block |= {
                T.FFN_GATE_INP: [h, e],
                T.FFN_PRE_NORM_2: [h],
                T.FFN_POST_NORM_1: [h],
                T.FFN_POST_NORM_2: [h],
                T.FFN_GATE_UP_EXP: [h, 2 * f, e],
                T.FFN_DOWN_EXP: [f, h, e],
            }
            shapes[T_[T.FFN_GATE_INP].format(bid=i) + ".scale"] = [h]
            shapes[T_[T.FFN_DOWN_EXP].format(bid=i) + ".scale"] = [e]
        shapes |= {T_[t].format(bid=i) + ".weight": shape for t, shape in block.items()}
    known = {T_[t] for t in gguf.MODEL_TENSORS[gguf.MODEL_ARCH.GEMMA4]}
    assert {re.sub(r"^blk\.\d+\.", "blk.{bid}.", name.rsplit(".", 1)[0]) for name in shapes} <= known  # gguf's list
    return keys, shapes


#: proportional RoPE with a scaling factor: transformers divides inv_freq by it, the file's rope_freqs carry it
GEMMA4_ROPE_FACTOR = {
    "rope_parameters": {
        "sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
        "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.5, "rope_theta": 1e6, "factor": 4.0},
    }
}


@pytest.mark.parametrize("variant", ["fixture", "moe", "rope_factor"])
def test_gemma4_keys_and_tensors_are_llama_cpps(variant, tmp_path):
    """Gemma 4: every key llama.cpp's gemma4 loader reads, and exactly the tensors it creates, with its shapes --
    per-layer head sizes and KV heads, k == v (no attn_v on full layers), shared-KV layers without K, the double-wide
    MLP, per-layer input embeddings, layer scalars, the full layers' rope_freqs; MoE: router and expert scales."""
    import numpy as np

    from tests.export.test_gguf_roundtrip import GEMMA4_MOE

    model = build_tiny_model("gemma4_text", **{"fixture": {}, "moe": GEMMA4_MOE, "rope_factor": GEMMA4_ROPE_FACTOR}[variant])
    config = model.config
    path = save_gguf(model, str(tmp_path), build_tokenizer(), "f16")
    arch, fields = file_fields(path)
    assert arch == "gemma4"
    keys, shapes = _gemma4_expected(config)
    for key, value in keys.items():
        assert fields.get(key) == value, (key, fields.get(key), value)
    tensors = {t.name: t for t in gguf.GGUFReader(path).tensors}
    assert {name: [int(d) for d in t.shape] for name, t in tensors.items()} == shapes
    # proportional RoPE on full layers: frequency i divided by 1 where transformers rotates, by 1e30 (angle 0) past
    # partial_rotary_factor * head_dim / 2 -- transformers' inv_freq, zero there
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    factors = torch.from_numpy(np.array(tensors["rope_freqs.weight"].data, dtype=np.float32)).double()
    inv_freq, _ = ROPE_INIT_FUNCTIONS["proportional"](config, "cpu", layer_type="full_attention")
    head = keys["attention.key_length"]
    base = 1.0 / (config.rope_parameters["full_attention"]["rope_theta"] ** (torch.arange(0, head, 2).double() / head))
    torch.testing.assert_close(base / factors, inv_freq.double(), rtol=1e-6, atol=1e-30)
    partial = config.rope_parameters["full_attention"]["partial_rotary_factor"]
    assert (inv_freq == 0).sum() == head // 2 - int(partial * head // 2) > 0  # some dims unrotated at this config
