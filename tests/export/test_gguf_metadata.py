"""The GGUF files of the rows transformers cannot read back, checked against llama.cpp's expectations without going
through fastft's own mapping: key names come from ``gguf.Keys``, tensor names from ``gguf.TENSOR_NAMES``, and the
per-layer tensor sets below are the ones llama.cpp's ``load_arch_tensors`` creates as required for each arch (the
llama.cpp vendored in llama-cpp-python 0.3.36: src/models/{llama,granite,olmo2,smollm3,glm4,openai-moe,mistral3}.cpp).
Values are computed here from the transformers config. The logits round trip by tensor names is in
test_gguf_roundtrip.py; the llama.cpp run itself in test_gguf_llama_cpp.py (benchmark).
"""

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
