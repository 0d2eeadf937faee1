"""The tokenizer as GGUF metadata (``tokenizer.ggml.*``), in one of llama.cpp's two BPE forms.

- byte-level BPE (GPT-2 / Llama 3 / Qwen style, ``model = "gpt2"``): vocabulary, merges, token types and a named
  pre-tokenizer (``pre``), which llama.cpp maps to its own split regex;
- SentencePiece-style BPE with byte fallback (Llama 2 / Mistral / Gemma, ``model = "llama"``): vocabulary, scores,
  token types (``<0xXX>`` byte tokens typed BYTE) and ``add_space_prefix``. llama.cpp's SPM tokenizer merges the
  adjacent pair whose joined text has the highest score, so each token's score is minus the rank of the first merge
  that makes it: the merge order of tokenizer.json, as scores.

Only what llama.cpp can run the same way is accepted: a split regex it names, the normalizers it applies itself
(SentencePiece's space replacement; NFC, which llama.cpp skips and which changes only text not already in NFC,
logged); anything else (WordPiece, Unigram, unknown regexes, other normalizers) is refused before writing.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from typing import Any

from fastft.export.errors import ExportError

logger = logging.getLogger("fastft")

_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# o200k (gpt-oss) and Mistral's tekken: the regexes as tokenizer.json writes them (llama.cpp quotes them in
# llama-vocab.cpp next to its own rewrites for the "gpt-4o" and "tekken" pre-tokenizers).
_LETTERS = (
    r"[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+",
    r"[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*",
)
_CONTRACTION = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
_GPT4O_SPLIT = (
    rf"[^\r\n\p{{L}}\p{{N}}]?{_LETTERS[0]}{_CONTRACTION}|[^\r\n\p{{L}}\p{{N}}]?{_LETTERS[1]}{_CONTRACTION}"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_TEKKEN_SPLIT = (
    rf"[^\r\n\p{{L}}\p{{N}}]?{_LETTERS[0]}|[^\r\n\p{{L}}\p{{N}}]?{_LETTERS[1]}"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
#: (split regex, the BPE model's ignore_merges) -> llama.cpp ``tokenizer.ggml.pre`` name. llama.cpp looks a whole
#: pre-token up in the vocabulary before merging (ignore_merges) for llama-bpe and tekken only; "dbrx" is its name
#: for the llama-3 (cl100k) regex without that lookup.
KNOWN_SPLITS = {
    (_LLAMA3_SPLIT, True): "llama-bpe",
    (_LLAMA3_SPLIT, False): "dbrx",
    (_QWEN2_SPLIT, False): "qwen2",
    (_GPT4O_SPLIT, False): "gpt-4o",
    (_TEKKEN_SPLIT, True): "tekken",
}

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
_SPACE = "\u2581"
_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")


@dataclass
class GGUFVocab:
    model: str  # "gpt2" (byte-level BPE) or "llama" (SentencePiece-style)
    pre: str | None  # llama.cpp pre-tokenizer name (byte-level only)
    tokens: list[str]
    token_types: list[int]
    merges: list[str]  # byte-level only: SentencePiece files carry scores instead
    scores: list[float] | None = None
    add_space_prefix: bool | None = None
    special_ids: dict[str, int] = field(default_factory=dict)  # bos/eos/unk/pad -> id
    add_bos: bool = False
    add_eos: bool = False
    chat_template: str | None = None


def _pre_tokenizer_name(pre: dict | None, ignore_merges: bool = False) -> str:
    if (
        pre
        and pre.get("type") == "ByteLevel"
        and pre.get("use_regex", True)
        and not pre.get("add_prefix_space")
        and not ignore_merges
    ):
        return "gpt-2"
    if pre and pre.get("type") == "Sequence":
        parts = pre.get("pretokenizers", [])
        if (
            len(parts) == 2
            and parts[0].get("type") == "Split"
            and parts[1].get("type") == "ByteLevel"
            and not parts[1].get("use_regex", True)
            and not parts[1].get("add_prefix_space")
        ):
            regex = parts[0].get("pattern", {}).get("Regex")
            if (regex, ignore_merges) in KNOWN_SPLITS:
                return KNOWN_SPLITS[(regex, ignore_merges)]
            if any(r == regex for r, _ in KNOWN_SPLITS):
                raise ExportError(
                    f"tokenizer split regex {regex!r} with ignore_merges={ignore_merges}: llama.cpp's pre-tokenizer "
                    f"for this regex {'does not look' if ignore_merges else 'always looks'} whole words up before merging"
                )
            known = ", ".join(KNOWN_SPLITS.values())
            raise ExportError(f"tokenizer split regex {regex!r} is not one llama.cpp names; known: {known}")
    raise ExportError(
        f"tokenizer pre-tokenizer {json.dumps(pre)[:200]} cannot be represented in GGUF; accepted: "
        "ByteLevel (GPT-2 regex, no prefix space), Split(llama-3/qwen2 regex) + ByteLevel(use_regex="
        "false), or SentencePiece's Metaspace"
    )


def _sentencepiece_prefix(spec: dict) -> bool:
    """``add_space_prefix`` for a SentencePiece-style tokenizer.json; :class:`ExportError` for any other shape."""
    pre, norm = spec.get("pre_tokenizer"), spec.get("normalizer")
    if pre and pre.get("type") == "Metaspace" and norm is None:
        if pre.get("split", False) or pre.get("replacement") != _SPACE:
            raise ExportError(f"Metaspace {pre} (split or another replacement) cannot be represented in GGUF")
        prefix = pre.get("prepend_scheme", "always") in ("always", "first")
        if prefix:
            logger.warning(
                "fastft: SentencePiece-style tokenizer with Metaspace(prepend_scheme=%r): llama.cpp adds the "
                "prefix space to every text fragment that starts the input or follows a special token, "
                "also when it starts with a space; HF %s. Text of those shapes tokenizes differently "
                "(as it does in llama.cpp's own converter's files)",
                pre.get("prepend_scheme"),
                "only to the first fragment" if pre.get("prepend_scheme") == "first" else "not when it starts with one",
            )
        return prefix
    steps = (norm or {}).get("normalizers", [norm]) if norm else []
    kinds = [(s.get("type"), s.get("prepend"), s.get("content")) for s in steps]
    if (
        pre is None
        and kinds
        and kinds[-1] == ("Replace", None, _SPACE)
        and all(k == ("Prepend", _SPACE, None) for k in kinds[:-1])
        and len(kinds) <= 2
    ):
        return len(kinds) == 2
    raise ExportError(
        f"SentencePiece-style tokenizer with pre-tokenizer {json.dumps(pre)[:120]} and normalizer "
        f"{json.dumps(norm)[:120]} cannot be represented in GGUF"
    )


def _check_normalizer(spec: dict) -> None:
    norm = spec.get("normalizer")
    if norm is None:
        return
    if norm.get("type") == "NFC":
        logger.info(
            "fastft: the tokenizer NFC-normalizes its input; llama.cpp does not (it tokenizes the same text "
            "the same way once it is in NFC, as nearly all text is)"
        )
        return
    raise ExportError(f"tokenizer normalizer {norm.get('type')!r} cannot be represented in GGUF")


def strip_generation_markers(template: str) -> str:
    """Drop transformers' ``{% generation %}`` markers (assistant-mask bookkeeping, no output): other Jinja
    engines, llama.cpp's among them, do not know the tag."""
    return re.sub(r"\{%-?\s*(end)?generation\s*-?%\}", "", template)


def _merge_scores(merges: list[str], tokens: list[str]) -> list[float]:
    """Minus the rank of the first merge making each token; tokens no merge makes (characters, bytes, specials)
    score below every merge, so llama.cpp never prefers them over a real merge."""
    rank: dict[str, int] = {}
    for i, merge in enumerate(merges):
        left, _, right = merge.partition(" ")
        rank.setdefault(left + right, i)
    floor = -float(len(merges) + 1)
    return [-float(rank[t]) if t in rank else floor for t in tokens]


def gguf_vocab(tokenizer: Any, vocab_size: int) -> GGUFVocab:
    """Read ``tokenizer`` (a transformers fast tokenizer) into GGUF vocabulary fields, padded to the model's
    ``vocab_size`` with unused tokens; :class:`ExportError` for a tokenizer llama.cpp cannot represent."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ExportError(f"GGUF export needs a fast (tokenizers-backed) tokenizer; got {type(tokenizer).__name__}")
    spec = json.loads(backend.to_str())
    model = spec.get("model", {})
    if model.get("type") != "BPE":
        raise ExportError(
            f"tokenizer model {model.get('type')!r} is not supported for GGUF export; accepted: BPE "
            "(byte-level, or SentencePiece-style with byte fallback)"
        )
    sentencepiece = bool(model.get("byte_fallback"))
    if sentencepiece:
        add_space_prefix, pre = _sentencepiece_prefix(spec), None
    else:
        _check_normalizer(spec)
        add_space_prefix, pre = None, _pre_tokenizer_name(spec.get("pre_tokenizer"), bool(model.get("ignore_merges")))
    vocab = tokenizer.get_vocab()
    if max(vocab.values()) >= vocab_size:
        raise ExportError(f"tokenizer has ids up to {max(vocab.values())} but the model's vocab_size is {vocab_size}")
    by_id = {i: t for t, i in vocab.items()}
    added = {a["id"]: a for a in spec.get("added_tokens", [])}
    unk = model.get("unk_token")
    tokens, types = [], []
    for i in range(vocab_size):
        text = by_id.get(i)
        if text is None:
            tokens.append(f"[PAD{i}]")
            types.append(UNUSED)
        else:
            tokens.append(text)
            if sentencepiece and text == unk:  # SentencePiece's own <unk> type, also when listed as added
                types.append(UNKNOWN)
            elif i in added:
                types.append(CONTROL if added[i].get("special") else USER_DEFINED)
            else:
                types.append(BYTE if sentencepiece and _BYTE_TOKEN.fullmatch(text) else NORMAL)
    if sentencepiece and BYTE not in types:
        raise ExportError("byte-fallback tokenizer without <0x00>..<0xFF> byte tokens cannot be represented in GGUF")
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    if any(" " in m.partition(" ")[2] for m in merges):
        raise ExportError("tokenizer merges contain tokens with spaces; GGUF stores merges space-separated")
    special = {}
    for name in ("bos", "eos", "unk", "pad"):
        tid = getattr(tokenizer, f"{name}_token_id", None)
        if tid is not None:
            special[name] = int(tid)
    probe = tokenizer("a", add_special_tokens=True)["input_ids"]
    bare = tokenizer("a", add_special_tokens=False)["input_ids"]
    add_bos = "bos" in special and probe[:1] == [special["bos"]] and bare[:1] != [special["bos"]]
    add_eos = "eos" in special and probe[-1:] == [special["eos"]] and bare[-1:] != [special["eos"]]
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        template = template.get("default")
    return GGUFVocab(
        "llama" if sentencepiece else "gpt2",
        pre,
        tokens,
        types,
        [] if sentencepiece else merges,
        _merge_scores(merges, tokens) if sentencepiece else None,
        add_space_prefix,
        special,
        add_bos,
        add_eos,
        strip_generation_markers(template) if template else None,
    )


def write_vocab(writer: Any, vocab: GGUFVocab) -> None:
    writer.add_tokenizer_model(vocab.model)
    if vocab.pre is not None:
        writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.token_types)
    if vocab.scores is not None:
        writer.add_token_scores(vocab.scores)
    if vocab.merges:
        writer.add_token_merges(vocab.merges)
    if vocab.add_space_prefix is not None:
        writer.add_add_space_prefix(vocab.add_space_prefix)
    adders = {
        "bos": writer.add_bos_token_id,
        "eos": writer.add_eos_token_id,
        "unk": writer.add_unk_token_id,
        "pad": writer.add_pad_token_id,
    }
    for name, tid in vocab.special_ids.items():
        adders[name](tid)
    writer.add_add_bos_token(vocab.add_bos)
    writer.add_add_eos_token(vocab.add_eos)
    if vocab.chat_template:
        writer.add_chat_template(vocab.chat_template)
