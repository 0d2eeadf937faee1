"""The real consumer: llama.cpp (through llama-cpp-python, the ``fastft[gguf]`` extra) loads the exported GGUF.

A benchmark (``-m benchmark``), not in the default suite: llama-cpp-python compiles llama.cpp when installed (build
time in docs/EXPORT.md). Checks, on tiny offline models:
- llama.cpp's logits for a prompt equal the merged model's within the quantization's bound (BOUNDS: llama.cpp's CPU
  matmuls also round the activations -- to f16 for f16 weights, to q8 blocks for quantized ones -- so its bounds are
  wider than transformers' reading of the same file);
- greedy generation of 20 tokens equals transformers' for f16; a split is accepted only at a near tie (top-2 logit
  gap of transformers under the f16 bound), which random tiny models can have;
- llama.cpp's tokenization of ASCII, multi-byte UTF-8, special tokens and chat-template text equals the HF
  tokenizer's, for the byte-level BPE and the SentencePiece-style fixture;
- k-quants (q4_k_m, q5_k_m, q6_k) made by llama.cpp's own quantizer load and stay within their bounds (a model with
  256-wide rows, so llama.cpp's 256-element super-blocks apply rather than its fallbacks).
"""

import os
import re

import numpy as np
import pytest
import torch

from fastft.export import save_gguf
from fastft.offline import build_tiny_model, build_tokenizer
from tests.export.gguf_reader import build_sentencepiece_tokenizer, build_split_tokenizer, relative_logit_error
from tests.export.test_gguf_roundtrip import (  # every row, same fixtures
    GEMMA4_VARIANTS,
    GPT_OSS_YARN,
    OVERRIDES,
    ROWS,
    build_fixture,
    fixture_overrides,
    gemma4_moe_fixture,
    phi3_longrope,
)

pytestmark = pytest.mark.benchmark
llama_cpp = None  # imported by the fixture below: a default run deselects these tests without a skip line


@pytest.fixture(autouse=True, scope="module")
def _require_llama_cpp():
    global llama_cpp
    pytest.importorskip("gguf")
    llama_cpp = pytest.importorskip("llama_cpp", reason="needs the fastft[gguf] extra (llama-cpp-python)")


#: max |logit difference| / max |logit| vs the merged fp32 model, llama.cpp CPU backend. Measured maxima over the
#: rows (docs/EXPORT.md): f32 0.072% (llama.cpp keeps the KV cache in f16), f16 0.16%, q8_0 3.1%; k-quants on the
#: 256-wide llama: q6_k 4.2%, q5_k_m 8.7%, q4_k_m 17.9% (tiny random models: small logits, so large relative figures).
BOUNDS = {"f32": 2e-3, "f16": 0.005, "q8_0": 0.06, "q6_k": 0.08, "q5_k_m": 0.15, "q4_k_m": 0.30}
PROMPT = "The quick brown fox: what is 12 plus 7? The answer is 19."


def _load(path: str):
    return llama_cpp.Llama(model_path=path, n_ctx=256, n_batch=256, logits_all=True, n_threads=2, verbose=False)


def _llama_cpp_logits(llm, ids: list[int]) -> torch.Tensor:
    llm.reset()
    llm.eval(ids)
    return torch.from_numpy(np.array(llm.scores[: len(ids)], dtype=np.float32))


def _detokenize(llm, ids: list[int]) -> str:
    """llama.cpp's own ``llama_detokenize`` (it drops SentencePiece's prefix space as HF's decoder does; the
    ``Llama.detokenize`` wrapper joins pieces itself and keeps it)."""
    import ctypes

    tokens = (llama_cpp.llama_token * len(ids))(*ids)
    buffer = ctypes.create_string_buffer(16 * len(ids) + 16)
    n = llama_cpp.llama_detokenize(llm._model.vocab, tokens, len(ids), buffer, len(buffer), False, True)
    assert n >= 0
    return buffer.raw[:n].decode("utf-8")


def _hf_logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


@pytest.mark.parametrize("quantization", ["f32", "f16", "q8_0"])
@pytest.mark.parametrize("model_type", ROWS)
def test_llama_cpp_logits_match(model_type, quantization, tmp_path):
    overrides = fixture_overrides(model_type, quantization)  # gpt-oss q8_0: every expert active (see there)
    tok, model = build_tokenizer(), build_fixture(model_type, overrides)
    llm = _load(save_gguf(model, str(tmp_path), tok, quantization))
    ids = tok(PROMPT)["input_ids"]
    err = relative_logit_error(_hf_logits(model, ids), _llama_cpp_logits(llm, ids))
    print(f"llama.cpp {model_type} {quantization}: relative logit error {err:.5f}")
    assert err <= BOUNDS[quantization], f"{model_type} {quantization}: {err:.5f}"


@pytest.mark.parametrize("model_type", ROWS)
def test_greedy_generation_equals_transformers_f16(model_type, tmp_path):
    tok, model = build_tokenizer(), build_fixture(model_type, OVERRIDES.get(model_type, {}))
    llm = _load(save_gguf(model, str(tmp_path), tok, "f16"))
    prompt = tok(PROMPT)["input_ids"]
    want: list[int] = []
    for _ in range(20):  # plain argmax decoding: no generation-config rules (EOS, min length) on either side
        want.append(int(_hf_logits(model, prompt + want)[-1].argmax()))
    llm.reset()
    got = []
    for token in llm.generate(prompt, temp=0.0, top_k=1, reset=True):
        got.append(int(token))
        if len(got) == 20:
            break
    if got != want:
        split = next(i for i, (a, b) in enumerate(zip(got, want)) if a != b)
        logits = _hf_logits(model, prompt + want[:split])[-1]
        top2 = logits.topk(2).values
        gap = ((top2[0] - top2[1]) / logits.abs().max()).item()
        print(f"{model_type}: split at token {split}, transformers' top-2 relative gap {gap:.5f}")
        assert gap <= BOUNDS["f16"], f"{model_type}: greedy outputs differ at {split} with a clear winner ({gap:.4f})"
    else:
        print(f"{model_type}: 20 greedy tokens equal")


def _tokenizer_of(kind: str):
    from fastft.export import tokenizer as t

    splits = {
        "llama-bpe": (t._LLAMA3_SPLIT, True),
        "dbrx": (t._LLAMA3_SPLIT, False),
        "gpt-4o": (t._GPT4O_SPLIT, False),
        "tekken": (t._TEKKEN_SPLIT, True),
    }
    if kind in splits:
        return build_split_tokenizer(*splits[kind])
    return build_tokenizer() if kind == "byte-level" else build_sentencepiece_tokenizer()


@pytest.mark.parametrize("kind", ["byte-level", "sentencepiece", "llama-bpe", "dbrx", "gpt-4o", "tekken"])
def test_llama_cpp_tokenization_equals_hf(kind, tmp_path):
    tok = _tokenizer_of(kind)
    llm = _load(save_gguf(build_tiny_model("llama"), str(tmp_path), tok, "f16"))
    chat = tok.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi, 12 plus 7?"}],
        tokenize=False,
        add_generation_prompt=True,
    )
    texts = [
        "plain ASCII text, 12 + 7 = 19.",
        "The quick brown fox jumps over the lazy dog.",
        "  two  spaces\n\nnl",
        "héllo wörld – ünïcode 日本語 🙂",
        "<|im_start|>user\nhi<|im_end|>",
        "ÉCOLE Straße HelloWorld don't I'LL we'Re 1234567 3.14159 a/b/c\n/x ŞİMDİ αβγ Ǆǅǆ",  # case classes, digits
        chat,
    ]
    for text in texts:
        want = tok(text)["input_ids"]
        got = llm.tokenize(text.encode("utf-8"), add_bos=True, special=True)
        if kind == "sentencepiece":
            # Known, and not representable in GGUF (logged at export): llama.cpp's SPM tokenizer prefixes a space to
            # every text fragment that starts the input or follows a special token, even one starting with a space;
            # HF's Metaspace(prepend_scheme="first") only to the first fragment, and not when it starts with one.
            # So llama.cpp's ids are HF's ids of the text with those spaces written out.
            spaced = re.sub(r"(<\|im_(?:start|end)\|>)(?=[^<])", r"\1 ", text)
            want = tok(" " + spaced if text.startswith(" ") else spaced)["input_ids"]
        assert got == want, (kind, text, got, want)
        assert _detokenize(llm, got) == tok.decode(want), (kind, text)


@pytest.mark.parametrize("quantization", ["q4_k_m", "q5_k_m", "q6_k"])
def test_k_quants_by_llama_cpp(quantization, tmp_path):
    tok = build_tokenizer()
    model = build_tiny_model(
        "llama", hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2, head_dim=64
    )
    path = save_gguf(model, str(tmp_path), tok, quantization)
    assert os.path.basename(path) == f"model.{quantization.upper()}.gguf"
    assert sorted(os.listdir(tmp_path)) == ["Modelfile", os.path.basename(path)]  # the F16 staging file is gone
    import gguf

    types = {t.tensor_type.name for t in gguf.GGUFReader(path).tensors}
    assert types & {"Q4_K", "Q5_K", "Q6_K"}, types  # llama.cpp's k-quant recipe, not a fallback everywhere
    ids = tok(PROMPT)["input_ids"]
    err = relative_logit_error(_hf_logits(model, ids), _llama_cpp_logits(_load(path), ids))
    print(f"llama.cpp llama-256 {quantization}: relative logit error {err:.5f}, tensor types {sorted(types)}")
    assert err <= BOUNDS[quantization], f"{quantization}: {err:.5f}"


def test_phi3_partial_rotary_in_llama_cpp(tmp_path):
    tok = build_tokenizer()
    model = build_tiny_model("phi3", partial_rotary_factor=0.5, initializer_range=0.1)
    ids = tok(PROMPT)["input_ids"]
    llm = _load(save_gguf(model, str(tmp_path), tok, "f32"))
    err = relative_logit_error(_hf_logits(model, ids), _llama_cpp_logits(llm, ids))
    print(f"llama.cpp phi3 partial rotary 0.5 f32: relative logit error {err:.5f}")
    assert err <= BOUNDS["f32"]


def _load_ctx(path: str, n_ctx: int):
    return llama_cpp.Llama(model_path=path, n_ctx=n_ctx, n_batch=n_ctx, logits_all=True, n_threads=2, verbose=False)


def test_phi3_longrope_in_llama_cpp(tmp_path):
    """Phi-3 LongRoPE (original context 256, max 1024, f32 file). llama.cpp picks the factors from its context size
    (rounded up to a multiple of 256): n_ctx 256 -> short factors, equal to transformers for a 23-token prompt;
    n_ctx 512 -> long factors, equal to transformers for a 276-token sequence (> 256, its long factors). The one
    documented difference -- n_ctx 512 with the short prompt (llama.cpp long, transformers short) -- is measured and
    must exceed the bound, so the checks above do tell the two factor sets apart."""
    tok = build_tokenizer()
    model = build_tiny_model("phi3", **phi3_longrope(256))
    path = save_gguf(model, str(tmp_path), tok, "f32")
    short = tok(PROMPT)["input_ids"]
    long = short * 12
    assert len(short) <= 256 < len(long) <= 512
    errors = {}
    for n_ctx, ids in ((256, short), (512, long), (512, short)):
        err = relative_logit_error(_hf_logits(model, ids), _llama_cpp_logits(_load_ctx(path, n_ctx), ids))
        errors[(n_ctx, len(ids))] = err
        print(f"llama.cpp phi3 LongRoPE f32, n_ctx {n_ctx}, {len(ids)} tokens: relative logit error {err:.5f}")
    assert errors[(256, len(short))] <= BOUNDS["f32"]  # both short factors
    assert errors[(512, len(long))] <= BOUNDS["f32"]  # both long factors
    assert errors[(512, len(short))] > BOUNDS["f32"]  # llama.cpp long, transformers short: the documented difference


def test_gpt_oss_stock_yarn_in_llama_cpp(tmp_path):
    """gpt-oss's stock truncate=False YaRN, exported with its warning: llama.cpp's logits equal the same weights with
    truncate=True (the rounded correction range ggml computes) within the f16 bound; the error against the stock model
    (what the warning names) is printed, and must exceed that bound: weights std 0.15 and a 46-token prompt, so the
    RoPE difference (2 of the tiny model's 8 frequencies, one by 100%) shows beyond f16's rounding (at the fixture's
    std 0.02 it is 0.01%, under f16's 0.06%)."""
    tok = build_tokenizer()
    stock = build_tiny_model("gpt_oss", initializer_range=0.15)
    rounded = build_tiny_model("gpt_oss", initializer_range=0.15, rope_parameters=GPT_OSS_YARN)
    assert stock.config.rope_parameters["truncate"] is False and rounded.config.rope_parameters["truncate"] is True
    for a, b in zip(stock.state_dict().values(), rounded.state_dict().values()):
        assert torch.equal(a, b)  # same seed: only the RoPE setting differs
    ids = tok(PROMPT)["input_ids"] * 2
    got = _llama_cpp_logits(_load(save_gguf(stock, str(tmp_path), tok, "f16")), ids)
    err_rounded = relative_logit_error(_hf_logits(rounded, ids), got)
    err_stock = relative_logit_error(_hf_logits(stock, ids), got)
    hf_gap = relative_logit_error(_hf_logits(stock, ids), _hf_logits(rounded, ids))
    print(
        f"llama.cpp gpt_oss stock YaRN (truncate=False) f16, {len(ids)} tokens: relative logit error vs truncate=True "
        f"{err_rounded:.5f}, vs the stock model {err_stock:.5f} (transformers stock vs truncate=True: {hf_gap:.5f})"
    )
    assert err_rounded <= BOUNDS["f16"] < err_stock


@pytest.mark.parametrize("quantization", ["f32", "f16"])
def test_gemma4_moe_in_llama_cpp(quantization, tmp_path):
    """Gemma 4's MoE blocks (router scale, per-expert scale, fused gate-up experts, three extra norms) in llama.cpp;
    the same model with both scales at 1 is the control a file without them would match."""
    model, unscaled = gemma4_moe_fixture()
    tok = build_tokenizer()
    ids = tok(PROMPT)["input_ids"]
    llm = _load(save_gguf(model, str(tmp_path), tok, quantization))
    err = relative_logit_error(_hf_logits(model, ids), _llama_cpp_logits(llm, ids))
    control = relative_logit_error(_hf_logits(unscaled, ids), _llama_cpp_logits(llm, ids))
    print(f"llama.cpp gemma4_text MoE {quantization}: relative logit error {err:.5f} (vs unscaled model {control:.5f})")
    assert err <= BOUNDS[quantization] and control > 0.05


@pytest.mark.parametrize("quantization", ["f32", "f16"])
@pytest.mark.parametrize("variant", list(GEMMA4_VARIANTS))
def test_gemma4_layouts_in_llama_cpp(variant, quantization, tmp_path):
    """A shared sliding layer (llama.cpp picks its KV source by position) and a stack without per-layer inputs."""
    tok, model = build_tokenizer(), build_fixture("gemma4_text", GEMMA4_VARIANTS[variant])
    ids = tok(PROMPT)["input_ids"]
    llm = _load(save_gguf(model, str(tmp_path), tok, quantization))
    err = relative_logit_error(_hf_logits(model, ids), _llama_cpp_logits(llm, ids))
    print(f"llama.cpp gemma4_text {variant} {quantization}: relative logit error {err:.5f}")
    assert err <= BOUNDS[quantization], f"gemma4_text {variant} {quantization}: {err:.5f}"
