"""Bad input to GGUF export fails with a clear error before anything is written; a failed write leaves no file under
the final name (and an older file there intact); k-quants without llama-cpp-python name the extra to install."""

import os
import re
import sys

import pytest

pytest.importorskip("gguf")

from fastft.export import ExportError, save_gguf
from fastft.offline import build_tiny_model, build_tokenizer
from tests.export.test_gguf_roundtrip import GPT_OSS_YARN


def _assert_nothing_written(directory):
    assert not os.path.exists(directory) or os.listdir(directory) == []


def test_unknown_quantization_suggests_the_close_name(tmp_path):
    with pytest.raises(ExportError, match=r"unknown GGUF quantization 'q4km'\. Did you mean 'q4_k_m'"):
        save_gguf(build_tiny_model("llama"), str(tmp_path / "out"), build_tokenizer(), "q4km")
    with pytest.raises(ExportError, match="Did you mean 'q8_0'"):
        save_gguf(build_tiny_model("llama"), str(tmp_path / "out"), build_tokenizer(), "Q8-O")
    _assert_nothing_written(tmp_path / "out")


def test_architecture_llama_cpp_lacks_or_fastft_does_not_map(tmp_path):
    model = build_tiny_model("llama")
    model.config.model_type = "lama"  # a typo-like type nobody has
    with pytest.raises(ExportError, match=r"no row for model_type 'lama'.*Did you mean 'llama'"):
        save_gguf(model, str(tmp_path / "out"), build_tokenizer(), "f16")
    with pytest.raises(ExportError, match=r"qwen3_moe with dense layers \(mlp_only_layers=\[1\]"):
        save_gguf(build_tiny_model("qwen3_moe"), str(tmp_path / "out"), build_tokenizer(), "f16")
    _assert_nothing_written(tmp_path / "out")


@pytest.mark.parametrize(
    "change, message",
    [
        ({"rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}}, "RoPE scaling 'dynamic'"),
        ({"use_sliding_window": True, "sliding_window": 8, "max_window_layers": 0}, "use_sliding_window=True"),
        ({"hidden_act": "gelu"}, "activation 'gelu'"),
    ],
)
def test_config_llama_cpp_would_compute_differently(tmp_path, change, message):
    with pytest.raises(ExportError, match=message):
        save_gguf(build_tiny_model("qwen2", **change), str(tmp_path / "out"), build_tokenizer(), "f16")
    _assert_nothing_written(tmp_path / "out")


MINISTRAL3_YARN = {
    "rope_type": "yarn",
    "rope_theta": 1e6,
    "factor": 16.0,
    "original_max_position_embeddings": 16384,
    "mscale": 1.0,
    "mscale_all_dim": 1.0,
    "llama_4_scaling_beta": 0.1,
}

#: gpt-oss-20b's RoPE (its config.json): YaRN with the correction range's ends kept fractional
GPT_OSS_STOCK_YARN = {**GPT_OSS_YARN, "truncate": False}
LONGROPE = {
    "rope_type": "longrope",
    "rope_theta": 10000.0,
    "long_factor": [1.0 + 0.5 * i for i in range(8)],
    "short_factor": [1.0 + 0.1 * i for i in range(8)],
    "original_max_position_embeddings": 32,
}


@pytest.mark.parametrize(
    "model_type, change, message",
    [
        # the fixture's own pattern (layer 1 without RoPE): llama.cpp would rotate layer 1
        ("smollm3", {}, r"no_rope_layers=\[1, 0\]: llama.cpp's smollm3 arch always skips RoPE in every 4th"),
        ("smollm3", {"num_hidden_layers": 4, "no_rope_layers": [1] * 4, "use_sliding_window": True}, "use_sliding"),
        ("granite", {"head_dim": 32}, r"head_dim=32 with 4 heads != hidden_size 64"),
        ("olmo2", {"head_dim": 8}, r"llama.cpp's olmo2 arch derives the head size as hidden / heads"),
        ("glm4", {"partial_rotary_factor": 0.3125}, r"partial rotary over an odd number of dims \(5\)"),
        ("llama", {"partial_rotary_factor": 0.5}, "partial_rotary_factor=0.5 is not exported"),
        # YaRN with an unrounded correction range (ggml always rounds it): exported for gpt-oss only (warning below)
        ("qwen2", {"rope_parameters": {**GPT_OSS_STOCK_YARN}}, r"qwen2 YaRN with truncate=False: .* so 2 of .* 8 RoPE"),
        # LongRoPE: the factor tensors only on phi3 (verified there), one factor per rotated pair
        ("llama", {"rope_parameters": LONGROPE, "original_max_position_embeddings": 32}, "LongRoPE on llama: exported"),
        ("gpt_oss", {"rope_parameters": {"rope_type": "default", "rope_theta": 1e4}, "swiglu_limit": 5.0}, "clamps at 7"),
        # an attention factor from mscale != 1: llama.cpp's mistral3 takes mscale as 1
        ("ministral3", {"rope_parameters": {**MINISTRAL3_YARN, "mscale": 2.0}}, r"mscale=2.0, mscale_all_dim=1.0"),
        ("qwen2", {"rope_parameters": {**MINISTRAL3_YARN, "llama_4_scaling_beta": None}}, "qwen2 YaRN mscale=1.0"),
    ],
)
def test_family_config_llama_cpp_would_compute_differently(tmp_path, model_type, change, message):
    with pytest.raises(ExportError, match=message):
        save_gguf(build_tiny_model(model_type, **change), str(tmp_path / "out"), build_tokenizer(), "f16")
    _assert_nothing_written(tmp_path / "out")


GEMMA4_FULL_ROPE = {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1e6}


@pytest.mark.parametrize(
    "change, message",
    [
        ({"use_bidirectional_attention": "all"}, "use_bidirectional_attention='all'"),
        ({"attention_bias": True}, "attention_bias=True: llama.cpp's gemma4 loads no attention biases"),
        ({"vocab_size_per_layer_input": 512}, r"vocab_size_per_layer_input=512 != vocab_size=384"),
        ({"hidden_activation": "gelu"}, "activation 'gelu'"),
        (
            {
                "rope_parameters": {
                    "sliding_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4},
                    "full_attention": GEMMA4_FULL_ROPE,
                }
            },
            "sliding-layer RoPE 'linear'",
        ),
        (
            {
                "rope_parameters": {
                    "sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
                    "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6},
                }
            },
            "full-attention RoPE 'linear'",
        ),
        # layer 2 (full) reuses layer 0, the last full KV layer; llama.cpp would take layer 1 (sliding)
        (
            {"layer_types": ["full_attention", "sliding_attention", "full_attention"]},
            r"layer 2 \(full_attention\) reuses layer 0's keys and values; llama.cpp's gemma4 reuses layer 1",
        ),
    ],
)
def test_gemma4_config_llama_cpp_would_compute_differently(tmp_path, change, message):
    """Gemma 4 exports (test_gguf_roundtrip.py); these variants llama.cpp's gemma4 graph would compute otherwise."""
    with pytest.raises(ExportError, match=message):
        save_gguf(build_tiny_model("gemma4_text", **change), str(tmp_path / "out"), build_tokenizer(), "f16")
    _assert_nothing_written(tmp_path / "out")


def test_longrope_factor_count_checked(tmp_path):
    """One LongRoPE factor per rotated pair (transformers' Phi-3 config checks it at build; a config edited later is
    still caught before writing)."""
    model = build_tiny_model("phi3", rope_parameters=dict(LONGROPE), max_position_embeddings=128)
    model.config.rope_parameters["short_factor"] = [1.0] * 3
    with pytest.raises(ExportError, match=r"phi3 LongRoPE short_factor has 3 values; 8 \(rotary dims / 2\) needed"):
        save_gguf(model, str(tmp_path / "out"), build_tokenizer(), "f16")
    _assert_nothing_written(tmp_path / "out")


@pytest.mark.parametrize("head_dim", [16, 64])  # the fixture's, and gpt-oss-20b's (9 of 32 differ, by up to 76%)
def test_gpt_oss_stock_yarn_exported_with_the_difference_named(tmp_path, caplog, head_dim):
    """gpt-oss's stock truncate=False YaRN is written (as llama.cpp runs every gpt-oss GGUF) with one warning naming
    how many RoPE frequencies llama.cpp's rounded correction range changes and by how much; the expected figures come
    from transformers' own yarn init run with truncate False and True."""
    import copy
    import logging

    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    model = build_tiny_model("gpt_oss", head_dim=head_dim, rope_parameters=dict(GPT_OSS_STOCK_YARN))
    inv_freq = {}
    for truncate in (False, True):
        config = copy.deepcopy(model.config)
        config.rope_parameters = {**config.rope_parameters, "truncate": truncate}
        inv_freq[truncate] = ROPE_INIT_FUNCTIONS["yarn"](config, "cpu")[0].double()
    rel = (inv_freq[True] - inv_freq[False]).abs() / inv_freq[False]
    with caplog.at_level(logging.WARNING, logger="fastft"):
        path = save_gguf(model, str(tmp_path), build_tokenizer(), "f16")
    assert os.path.exists(path)
    warnings = [r.getMessage() for r in caplog.records if "truncate=False" in r.getMessage()]
    assert len(warnings) == 1, warnings
    pattern = r"so (\d+) of this model's (\d+) RoPE frequencies differ in llama.cpp, by up to ([\d.]+)%"
    found = re.search(pattern, warnings[0])
    assert found, warnings[0]
    assert (int(found[1]), int(found[2])) == (int((rel > 1e-6).sum()), head_dim // 2)
    assert float(found[3]) == pytest.approx(100 * rel.max().item(), abs=0.006)  # printed with 2 decimals
    assert int(found[1]) > 0


def test_untied_gemma_and_odd_query_scale_refused(tmp_path):
    with pytest.raises(ExportError, match="untied lm_head"):
        save_gguf(build_tiny_model("gemma", tie_word_embeddings=False), str(tmp_path / "out"), build_tokenizer(), "f16")
    with pytest.raises(ExportError, match="query_pre_attn_scalar=32"):
        save_gguf(build_tiny_model("gemma2", query_pre_attn_scalar=32), str(tmp_path / "out"), build_tokenizer(), "f16")
    _assert_nothing_written(tmp_path / "out")


def _tokenizer_with(tok, **backend_parts):
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer.from_str(tok.backend_tokenizer.to_str())
    for name, value in backend_parts.items():
        setattr(backend, name, value)
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=tok.eos_token)


def test_tokenizer_llama_cpp_cannot_represent(tmp_path):
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers

    tok = build_tokenizer()
    split = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(r"\d|\D+"), "isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    cases = [
        (_tokenizer_with(tok, pre_tokenizer=split), r"split regex '\\\\d\|\\\\D\+' is not one llama.cpp names"),
        (_tokenizer_with(tok, normalizer=normalizers.Lowercase()), "normalizer 'Lowercase' cannot be represented"),
        (_tokenizer_with(tok, pre_tokenizer=pre_tokenizers.Whitespace()), "pre-tokenizer .* cannot be represented"),
    ]
    wordpiece = Tokenizer(models.WordPiece({"[UNK]": 0, "a": 1}, unk_token="[UNK]"))
    from transformers import PreTrainedTokenizerFast

    cases.append((PreTrainedTokenizerFast(tokenizer_object=wordpiece), "tokenizer model 'WordPiece' is not supported"))
    for bad, message in cases:
        with pytest.raises(ExportError, match=message):
            save_gguf(build_tiny_model("llama"), str(tmp_path / "out"), bad, "f16")
    with pytest.raises(ExportError, match="needs the tokenizer"):
        save_gguf(build_tiny_model("llama"), str(tmp_path / "out"), None, "f16")
    with pytest.raises(ExportError, match="vocab_size is 100"):
        save_gguf(build_tiny_model("llama", vocab_size=100), str(tmp_path / "out"), tok, "f16")
    _assert_nothing_written(tmp_path / "out")


def test_failed_write_leaves_no_half_written_file(tmp_path, monkeypatch):
    import gguf

    tok, model = build_tokenizer(), build_tiny_model("llama")
    first = save_gguf(model, str(tmp_path), tok, "f16")  # an earlier export under the same name
    before = open(first, "rb").read()
    real = gguf.GGUFWriter.write_tensors_to_file
    written = []

    def fail_midway(self, *args, **kwargs):
        self.fout[0].write(b"\0" * 4096)  # some tensor bytes reach the disk, then the writer dies
        self.fout[0].flush()
        written.append(os.path.getsize(self.path))
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", fail_midway)
    with pytest.raises(OSError, match="simulated"):
        save_gguf(build_tiny_model("llama", seed=1), str(tmp_path), tok, "f16")
    assert written and written[0] > 4096  # the failure really happened mid-file
    assert open(first, "rb").read() == before  # the earlier file is untouched
    assert sorted(os.listdir(tmp_path)) == ["Modelfile", "model.F16.gguf"]  # no temporary left behind
    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", real)
    assert save_gguf(model, str(tmp_path), tok, "q8_0").endswith("model.Q8_0.gguf")


def test_k_quant_without_llama_cpp_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # as if fastft[gguf]'s llama-cpp-python were missing
    with pytest.raises(ExportError, match=r"pip install 'fastft\[gguf\]'"):
        save_gguf(build_tiny_model("llama"), str(tmp_path / "out"), build_tokenizer(), "q4_k_m")
    _assert_nothing_written(tmp_path / "out")


def test_modelfile_content(tmp_path):
    path = save_gguf(build_tiny_model("qwen2"), str(tmp_path), build_tokenizer(), "q8_0")
    text = (tmp_path / "Modelfile").read_text()
    lines = text.splitlines()
    assert lines[0] == f"FROM ./{os.path.basename(path)}"
    template = text.split('TEMPLATE """', 1)[1].split('"""', 1)[0]
    assert template == (
        "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n"
    )
    assert [line for line in lines if line.startswith("PARAMETER stop")] == ['PARAMETER stop "<|im_end|>"']
    assert "PARAMETER temperature" not in text  # greedy by default: no sampling defaults invented


def test_modelfile_sampling_defaults_and_unknown_template(tmp_path):
    from fastft.export.modelfile import modelfile_text

    model = build_tiny_model("llama")
    model.generation_config.do_sample, model.generation_config.temperature = True, 0.7
    tok = build_tokenizer()
    tok.chat_template = "{% for m in messages %}### {{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    save_gguf(model, str(tmp_path), tok, "f16")
    text = (tmp_path / "Modelfile").read_text()
    assert "TEMPLATE" not in text.replace("# no TEMPLATE", "") and "# no TEMPLATE" in text
    assert 'PARAMETER stop "<|im_end|>"' in text and "PARAMETER temperature 0.7" in text
    gemma = modelfile_text("m.gguf", "<start_of_turn>user ...", "<eos>")
    assert 'PARAMETER stop "<end_of_turn>"' in gemma and 'PARAMETER stop "<eos>"' in gemma
    assert "model{{ else }}user{{ end }}" in gemma  # no system role in Gemma's format


def test_sentencepiece_tokenizer_round_trip(tmp_path):
    """A Llama-2-style tokenizer (byte fallback, Metaspace) is written as llama.cpp's SPM vocabulary: scores from
    merge ranks and no merges, so transformers' reader rebuilds the merges from the scores alone."""
    from transformers import AutoTokenizer

    from tests.export.gguf_reader import build_sentencepiece_tokenizer, file_fields

    tok = build_sentencepiece_tokenizer()
    path = save_gguf(build_tiny_model("llama"), str(tmp_path), tok, "f16")
    import gguf

    fields = gguf.GGUFReader(path).fields
    assert fields["tokenizer.ggml.model"].contents() == "llama" and "tokenizer.ggml.merges" not in fields
    assert fields["tokenizer.ggml.add_space_prefix"].contents() is True
    types = fields["tokenizer.ggml.token_type"].contents()
    assert types[tok.convert_tokens_to_ids("<0x0A>")] == 6 and types[tok.unk_token_id] == 2
    back = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=os.path.basename(path))
    for text in [
        "The quick brown fox jumps over the lazy dog.",
        "plain ASCII, 12 + 7 = 19.",
        "  two  spaces",
        "héllo wörld – ünïcode 日本語 🙂",
        "<|im_start|>user\nhi<|im_end|>",
    ]:
        assert back(text)["input_ids"] == tok(text)["input_ids"], text
    assert file_fields(path)[0] == "llama"


def _render_go(template: str, messages: list[dict]) -> str:
    """A renderer for the subset of Go templates the Modelfile uses (range .Messages, .Role, .Content,
    if eq .Role "x" / else / end, and "{{-" trimming): an oracle independent of fastft's code."""
    import re

    parts = re.split(r"(\{\{-?\s*.*?\s*\}\})", template)
    tokens = []
    for part in parts:
        if part.startswith("{{"):
            if part.startswith("{{-") and tokens and tokens[-1][0] == "text":
                tokens[-1] = ("text", tokens[-1][1].rstrip())
            tokens.append(("action", part.strip("{}- ").strip()))
        elif part:
            tokens.append(("text", part))

    def run(i: int, scope: dict | None, out: list[str], stop=("end",)) -> int:
        while i < len(tokens):
            kind, value = tokens[i]
            if kind == "text":
                out.append(value)
            elif value in stop or value == "else":
                return i
            elif value == "range .Messages":
                start = i + 1
                for message in messages:
                    i = run(start, message, out)
                if not messages:
                    i = run(start, None, [])
            elif value.startswith("if eq .Role"):
                want = value.split('"')[1]
                branch: list[str] = []
                other: list[str] = []
                i = run(i + 1, scope, branch)
                if tokens[i][1] == "else":
                    i = run(i + 1, scope, other)
                out.extend(branch if scope["role"] == want else other)
            elif value in (".Role", ".Content"):
                out.append(scope[value[1:].lower()])
            else:
                raise AssertionError(f"unsupported action {value!r}")
            i += 1
        return i

    out: list[str] = []
    run(0, None, out)
    return "".join(out)


def test_modelfile_template_renders_like_the_chat_template(tmp_path):
    """The Modelfile's Go template, rendered for a conversation, is the text the HF chat template renders."""
    tok = build_tokenizer()
    save_gguf(build_tiny_model("llama"), str(tmp_path), tok, "f16")
    template = (tmp_path / "Modelfile").read_text().split('TEMPLATE """', 1)[1].split('"""', 1)[0]
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "12 plus 7?"},
        {"role": "assistant", "content": "19"},
        {"role": "user", "content": "and 8 more?"},
    ]
    want = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert _render_go(template, messages) == want


@pytest.mark.parametrize(
    "split, ignore_merges, pre",
    [
        ("llama3", True, "llama-bpe"),
        ("llama3", False, "dbrx"),
        ("qwen2", False, "qwen2"),
        ("gpt4o", False, "gpt-4o"),
        ("tekken", True, "tekken"),
        ("tekken", False, None),
        ("gpt4o", True, None),
        ("qwen2", True, None),
    ],
)
def test_split_regex_and_ignore_merges_pick_llama_cpps_pre_tokenizer(tmp_path, split, ignore_merges, pre):
    """Which llama.cpp pre-tokenizer a Split regex is written as depends on the BPE's ignore_merges too: llama.cpp
    looks whole words up before merging for llama-bpe and tekken only (llama-vocab.cpp)."""
    import gguf

    from fastft.export import tokenizer as t
    from tests.export.gguf_reader import build_split_tokenizer

    regex = {"llama3": t._LLAMA3_SPLIT, "qwen2": t._QWEN2_SPLIT, "gpt4o": t._GPT4O_SPLIT, "tekken": t._TEKKEN_SPLIT}
    tok = build_split_tokenizer(regex[split], ignore_merges)
    if pre is None:
        with pytest.raises(ExportError, match=f"ignore_merges={ignore_merges}: llama.cpp's pre-tokenizer"):
            save_gguf(build_tiny_model("llama"), str(tmp_path / "out"), tok, "f16")
        _assert_nothing_written(tmp_path / "out")
        return
    path = save_gguf(build_tiny_model("llama"), str(tmp_path / "out"), tok, "f16")
    assert gguf.GGUFReader(path).fields["tokenizer.ggml.pre"].contents() == pre
