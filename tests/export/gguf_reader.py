"""Reading an exported GGUF back with an independent reader, for the export tests.

transformers' GGUF loader (``from_pretrained(dir, gguf_file=...)``, built on the ``gguf`` package) is the reader. It
does not read every key llama.cpp reads (transformers 5.24 + gguf 0.19), so the values it misses are taken from the
file itself and passed as config overrides -- each is what llama.cpp derives from the same file:
head_dim (``attention.key_length``; qwen3/gemma readers drop it), Gemma 2/3 ``query_pre_attn_scalar`` (not stored in
GGUF: llama.cpp scales queries by 1/sqrt(key_length)), softcapping and the per-layer sliding pattern (gemma3's reader
ignores them), qwen3moe's ``moe_intermediate_size`` (``expert_feed_forward_length``). Gemma (v1) has no transformers
GGUF loader at all: its tensors are read with ``gguf.GGUFReader``, dequantized by gguf, and mapped back with gguf's
own name table into a fresh model of the same config.
"""

from __future__ import annotations

import json
import os

import numpy as np
import torch


def file_fields(path: str) -> tuple[str, dict]:
    """(architecture, {key without the ``arch.`` prefix: value}) of a GGUF file."""
    import gguf

    reader = gguf.GGUFReader(path)
    arch = reader.fields["general.architecture"].contents()
    return arch, {k[len(arch) + 1 :]: f.contents() for k, f in reader.fields.items() if k.startswith(arch + ".")}


#: Rows transformers 5.24's GGUF loader cannot read (no loader for the arch, or -- mixtral -- a llama-arch file with
#: experts, which it reads as a dense Llama; gpt_oss, whose reader expects tensor names llama.cpp does not write): their
#: tensors are read by gguf's own name table instead.
READ_BY_NAMES = {"gemma", "mixtral", "granite", "olmo2", "olmo3", "smollm3", "glm4", "gpt_oss", "ministral3", "gemma4_text"}
#: llama.cpp archs whose RoPE rotates adjacent pairs (LLAMA_ROPE_TYPE_NORM) while transformers rotates halves, so
#: llama.cpp's converter permutes Q/K rows (glm4 is NORM too, but transformers' GLM-4 already rotates pairs).
_PAIRWISE_ROPE = {"llama", "granite", "smollm3", "mistral3"}


#: Gemma 4 parameters without a ``.weight`` suffix: GGUF name in the block (None: gguf's table names it)
_GEMMA4_UNSUFFIXED = {
    "layer_scalar": None,
    "gate_up_proj": None,  # experts fused gate-first, as transformers stores them
    "down_proj": None,
    "scale": "ffn_gate_inp.scale",
    "per_expert_scale": "ffn_down_exps.scale",
}


def read_back(model_type: str, path: str, overrides: dict | None = None) -> torch.nn.Module:
    """The GGUF at ``path`` as a transformers model (fp32, eval); ``overrides``: the fixture's config changes (rows
    read by names rebuild the model from the same fixture config)."""
    from transformers import AutoModelForCausalLM

    if model_type in READ_BY_NAMES:
        return _read_back_by_names(model_type, path, overrides or {})
    arch, fields = file_fields(path)
    extra = {}
    if arch in ("qwen3", "gemma2", "gemma3"):
        extra["head_dim"] = fields["attention.key_length"]
    if arch.startswith("gemma"):
        extra["query_pre_attn_scalar"] = fields["attention.key_length"]
    for key in ("final_logit_softcapping", "attn_logit_softcapping"):
        if key in fields:
            extra[key] = fields[key]
    if arch == "phi3" and "rope.scaling.attn_factor" in fields:  # LongRoPE: its reader drops the factor tensors
        extra.update(_longrope_of(path, fields))
    elif arch == "phi3" and fields["rope.dimension_count"] != fields["attention.key_length"]:  # its reader drops it
        rotary = fields["rope.dimension_count"] / fields["attention.key_length"]
        theta = fields["rope.freq_base"]
        extra["rope_parameters"] = {"rope_type": "default", "rope_theta": theta, "partial_rotary_factor": rotary}
    if "expert_feed_forward_length" in fields:  # qwen3moe's reader keeps the config default (768)
        extra["moe_intermediate_size"] = fields["expert_feed_forward_length"]
    if "attention.sliding_window_pattern" in fields:
        extra["layer_types"] = [
            "sliding_attention" if s else "full_attention" for s in fields["attention.sliding_window_pattern"]
        ]
    return AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32, **extra
    ).eval()


def _longrope_of(path: str, fields: dict) -> dict:
    """Phi-3 LongRoPE config values from the file as llama.cpp reads them: the long/short factor tensors, the
    attention factor (``rope.scaling.attn_factor``), the original context and the rotated dims."""
    import gguf

    tensors = {t.name: t for t in gguf.GGUFReader(path).tensors}
    factors = {k: np.array(tensors[f"rope_factors_{k}.weight"].data, dtype=np.float32).tolist() for k in ("long", "short")}
    orig = fields["rope.scaling.original_context_length"]
    rope = {
        "rope_type": "longrope",
        "rope_theta": fields["rope.freq_base"],
        "long_factor": factors["long"],
        "short_factor": factors["short"],
        "attention_factor": fields["rope.scaling.attn_factor"],
        "original_max_position_embeddings": orig,
        "partial_rotary_factor": fields["rope.dimension_count"] / fields["attention.key_length"],
    }
    # Phi-3's config lets a top-level original_max_position_embeddings override the rope dict's
    return {"rope_parameters": rope, "original_max_position_embeddings": orig}


def _unpermute_pairs(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's interleaved-pair Q/K row order back to transformers' rotate-half order (per head: rows 0, 2, 4, ...
    are the first half, 1, 3, 5, ... the second)."""
    rows = weight.shape[0]
    return weight.reshape(n_head, rows // n_head // 2, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _read_back_by_names(model_type: str, path: str, overrides: dict) -> torch.nn.Module:
    import gguf

    from fastft.offline import build_tiny_model

    reader = gguf.GGUFReader(path)
    model = build_tiny_model(model_type, seed=123, **overrides)  # same config, other weights: all overwritten below
    config = model.config
    arch_name = reader.fields["general.architecture"].contents()
    arch = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch_name)
    name_map = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    to_hf = {}
    for hf_name in model.state_dict():
        base, _, suffix = hf_name.rpartition(".")
        if arch_name == "gemma4" and suffix in _GEMMA4_UNSUFFIXED:  # parameters without .weight, fused experts
            gguf_name = _GEMMA4_UNSUFFIXED[suffix]
            layer = hf_name.split(".layers.")[1].split(".")[0]
            to_hf[f"blk.{layer}.{gguf_name}" if gguf_name else f"{name_map.get_name(hf_name)}.weight"] = (hf_name, None)
        elif base.endswith(".experts"):  # stacked experts (and gpt-oss's expert biases)
            kind = "bias" if suffix.endswith("_bias") else "weight"
            for part in ("gate_proj", "up_proj") if suffix.startswith("gate_up_proj") else ("down_proj",):
                to_hf[f"{name_map.get_name(f'{base}.{part}')}.{kind}"] = (hf_name, part)
        elif suffix == "sinks":  # gpt-oss: one sink logit per head, a parameter without .weight
            to_hf[f"{name_map.get_name(hf_name)}.weight"] = (hf_name, None)
        elif (g := name_map.get_name(base)) is not None:
            to_hf.setdefault(f"{g}.{suffix}", (hf_name, None))
    state, parts = {}, {}
    for t in reader.tensors:
        if t.name == "rope_freqs.weight" and arch_name == "gemma4":  # transformers computes it (checked elsewhere)
            continue
        data = gguf.dequantize(t.data, t.tensor_type).reshape([int(d) for d in reversed(t.shape)])
        data = torch.from_numpy(np.array(data, dtype=np.float32))
        hf_name, part = to_hf[t.name]
        if arch_name in _PAIRWISE_ROPE and t.name.endswith((".attn_q.weight", ".attn_k.weight")):
            n_kv = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
            data = _unpermute_pairs(data, config.num_attention_heads if ".attn_q." in t.name else n_kv)
        if arch_name in ("gemma", "gemma2", "gemma3") and t.name.endswith("norm.weight"):
            data = data - 1.0  # Gemma 1-3 norms scale by 1 + w; llama.cpp's by w (Gemma 4's by w too)
        if part is None:
            state[hf_name] = data
        else:
            parts.setdefault(hf_name, {})[part] = data
    for hf_name, got in parts.items():
        if arch_name != "gpt-oss":  # transformers' gate_up_proj [E, 2I, H] holds the gate rows first
            state[hf_name] = got["down_proj"] if "down_proj" in got else torch.cat([got["gate_proj"], got["up_proj"]], 1)
        elif "down_proj" in got:  # gpt-oss computes x @ W: weights [E, in, out]; biases as they are
            state[hf_name] = got["down_proj"] if hf_name.endswith("_bias") else got["down_proj"].transpose(-1, -2)
        else:  # gate and up interleaved along 2I: gate = [..., ::2], up = [..., 1::2]
            both = torch.stack([got["gate_proj"], got["up_proj"]], dim=2).flatten(1, 2)  # [E, 2I(, H)]
            state[hf_name] = both if hf_name.endswith("_bias") else both.transpose(-1, -2)
    missing = set(model.state_dict()) - set(state) - {"lm_head.weight"}
    assert not missing, missing
    model.load_state_dict(state, strict=False)
    model.tie_weights()
    return model.eval()


def relative_logit_error(want: torch.Tensor, got: torch.Tensor) -> float:
    """max |want - got| / max |want|: one number per comparison, scale-free across tiny random models."""
    return ((want - got).abs().max() / want.abs().max()).item()


def build_sentencepiece_tokenizer(vocab_size: int = 384):
    """A Llama-2-style tokenizer built offline: BPE with byte fallback over ``<0x00>``..``<0xFF>``, Metaspace with a
    prefix space, ``<unk>``/``<s>``/``</s>``, the same ChatML template as ``fastft.offline.build_tokenizer``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from fastft.offline import _CORPUS, CHAT_TEMPLATE

    specials = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
    byte_tokens = [f"<0x{i:02X}>" for i in range(256)]
    trainer_tok = Tokenizer(models.BPE(unk_token="<unk>"))
    trainer_tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first", split=True)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - len(byte_tokens), special_tokens=specials, show_progress=False)
    trainer_tok.train_from_iterator(_CORPUS * 20, trainer=trainer)
    trained = json.loads(trainer_tok.to_str())["model"]
    ordered = (
        specials + byte_tokens + [t for t, _ in sorted(trained["vocab"].items(), key=lambda kv: kv[1]) if t not in specials]
    )
    bpe = models.BPE(
        vocab={t: i for i, t in enumerate(ordered)},
        merges=[tuple(m) for m in trained["merges"]],
        unk_token="<unk>",
        byte_fallback=True,
        fuse_unk=True,
    )
    tok = Tokenizer(bpe)
    tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first", split=False)
    tok.decoder = decoders.Sequence(
        [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    wrapped.chat_template = CHAT_TEMPLATE
    return wrapped


def build_split_tokenizer(regex: str, ignore_merges: bool):
    """``fastft.offline.build_tokenizer``'s vocabulary and merges behind ``Split(regex) + ByteLevel(use_regex=False)``
    (the tokenizer.json shape of Llama 3, Qwen 2, gpt-oss, Mistral's tekken), with the BPE's ``ignore_merges``."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    from fastft.offline import build_tokenizer

    base = build_tokenizer()
    spec = json.loads(base.backend_tokenizer.to_str())
    spec["pre_tokenizer"] = {
        "type": "Sequence",
        "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
        ],
    }
    spec["model"]["ignore_merges"] = ignore_merges
    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(json.dumps(spec)),
        eos_token=base.eos_token,
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    tok.chat_template = base.chat_template
    return tok
