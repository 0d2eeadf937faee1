"""RoPE settings of a GGUF export: the ``{arch}.rope.*`` keys and the frequency-factor tensors llama.cpp reads.

What llama.cpp does with them was read in the llama.cpp that llama-cpp-python 0.3.36 vendors: src/llama-model.cpp
(hparams: ``rope.scaling.attn_factor`` multiplies the attention factor of every arch, always; ``get_rope_factors``),
src/llama-context.cpp (YaRN attention factor, the 256-padding of ``n_ctx``), ggml's ``rope_yarn`` (divides each
frequency by its factor, multiplies cos/sin by the attention factor) and ``ggml_rope_yarn_corr_dims`` (rounds the YaRN
correction range). Each value written is computed here from the config, the way transformers' RoPE init functions
compute it (``transformers/modeling_rope_utils.py``), not taken from transformers, so the tests can compare the two.
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING, Any

import torch

from fastft.export.errors import ExportError

if TYPE_CHECKING:
    from fastft.export.architectures import ArchitectureRow

logger = logging.getLogger("fastft")


def rope_parameters(config: Any) -> tuple[dict[str, Any], float | None]:
    """(the full-attention layers' RoPE parameters with ``rope_type``/``rope_theta`` filled in, the sliding layers'
    own theta or None). transformers 5 nests them per layer type for Gemma 3; older configs use ``rope_scaling``."""
    params = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    local_theta = None
    if "full_attention" in params or "sliding_attention" in params:
        local_theta = (params.get("sliding_attention") or {}).get("rope_theta")
        params = dict(params.get("full_attention") or {})
    if "rope_theta" not in params and getattr(config, "rope_theta", None) is not None:
        params["rope_theta"] = config.rope_theta
    params.setdefault("rope_type", params.get("type", "default"))
    return params, local_theta


def head_dim_of(config: Any) -> int:
    return int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)


def rotary_dims(params: dict[str, Any], config: Any) -> int:
    """How many dims of each head are rotated (transformers: ``int(head_dim * partial_rotary_factor)``)."""
    partial = float(params.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", None) or 1.0))
    return int(head_dim_of(config) * partial)


def _original_context(params: dict[str, Any], config: Any) -> int | None:
    orig = params.get("original_max_position_embeddings") or getattr(config, "original_max_position_embeddings", None)
    return int(orig) if orig is not None else None


def llama3_rope_factors(params: dict[str, Any], head_dim: int) -> torch.Tensor:
    """Llama 3.1's per-frequency divisors (fp32, ``[head_dim // 2]``): llama.cpp divides each RoPE frequency by its
    factor (``rope_freqs.weight``), so ``inv_freq / factors`` must equal transformers' llama3 ``inv_freq``."""
    base = float(params.get("rope_theta", 10000.0))
    factor = float(params["factor"])
    low, high = float(params.get("low_freq_factor", 1.0)), float(params.get("high_freq_factor", 4.0))
    old_ctx = float(params.get("original_max_position_embeddings", 8192))
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    wavelen = 2 * math.pi / inv_freq
    smooth = ((old_ctx / wavelen - low) / (high - low)).clamp(0.0, 1.0)
    # Between the two wavelengths transformers interpolates inv_freq: (1 - s) * f / factor + s * f.
    factors = 1.0 / ((1.0 - smooth) / factor + smooth)
    factors = torch.where(wavelen < old_ctx / high, torch.ones_like(factors), factors)
    factors = torch.where(wavelen > old_ctx / low, torch.full_like(factors, factor), factors)
    return factors.float()


def longrope_factors(row: ArchitectureRow, params: dict[str, Any], rot: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(long, short) LongRoPE frequency divisors, fp32 ``[rot // 2]`` each: transformers' inverse frequency is
    ``1 / (factor_i * base ** (2i / rot))`` and ggml's is ``base ** (-2i / rot) / factor_i`` -- the same divisor."""
    tensors = []
    for key in ("long_factor", "short_factor"):
        values = params.get(key)
        if values is None or len(values) != rot // 2:
            raise ExportError(
                f"{row.model_type} LongRoPE {key} has {None if values is None else len(values)} values; "
                f"{rot // 2} (rotary dims / 2) needed"
            )
        tensors.append(torch.tensor([float(v) for v in values], dtype=torch.float32))
    return tensors[0], tensors[1]


def longrope_attention_factor(params: dict[str, Any], config: Any, orig: int) -> float:
    """transformers' LongRoPE cos/sin multiplier, used with the short and the long factors alike: the config's
    ``attention_factor``, else ``sqrt(1 + ln(s) / ln(original))`` with ``s`` = ``factor`` or, when the config has
    none (Phi-3), ``max_position_embeddings / original`` (1 when ``s <= 1``)."""
    if params.get("attention_factor") is not None:
        return float(params["attention_factor"])
    factor = params.get("factor")
    scale = float(factor) if factor is not None else config.max_position_embeddings / orig
    return math.sqrt(1 + math.log(scale) / math.log(orig)) if scale > 1.0 else 1.0


def yarn_inv_freq(params: dict[str, Any], dim: int, truncate: bool) -> torch.Tensor:
    """YaRN inverse frequencies (fp64, ``[dim // 2]``) as transformers' yarn init computes them, with the correction
    range's ends rounded (``truncate``: what ggml always does) or left fractional."""
    base, factor = float(params["rope_theta"]), float(params["factor"])
    orig = float(params["original_max_position_embeddings"])
    beta_fast, beta_slow = float(params.get("beta_fast") or 32), float(params.get("beta_slow") or 1)

    def corr_dim(rotations: float) -> float:  # the dim whose wavelength fits ``rotations`` times in ``orig``
        return dim * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = corr_dim(beta_fast), corr_dim(beta_slow)
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
    extrapolation = 1.0 / base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    return extrapolation / factor * ramp + extrapolation * (1 - ramp)


def yarn_rounding_difference(params: dict[str, Any], dim: int) -> tuple[int, float]:
    """(how many of the ``dim // 2`` frequencies differ, their largest relative difference) between the model's
    ``truncate=False`` YaRN and the rounded one ggml computes (relative to the model's own frequency)."""
    exact, rounded = yarn_inv_freq(params, dim, False), yarn_inv_freq(params, dim, True)
    rel = (rounded - exact).abs() / exact
    return int((rel > 1e-12).sum()), float(rel.max())


def extra_tensors(row: ArchitectureRow, config: Any) -> list[tuple[str, torch.Tensor]]:
    """Tensors llama.cpp needs beyond the state dict: ``rope_freqs.weight`` for Llama 3.1 RoPE scaling,
    ``rope_factors_long.weight`` / ``rope_factors_short.weight`` for LongRoPE (fp32, ``[rotary dims // 2]``)."""
    params, _ = rope_parameters(config)
    if params["rope_type"] == "llama3":
        return [("rope_freqs.weight", llama3_rope_factors(params, head_dim_of(config)))]
    if params["rope_type"] == "longrope":
        long, short = longrope_factors(row, params, rotary_dims(params, config))
        return [("rope_factors_long.weight", long), ("rope_factors_short.weight", short)]
    return []


def _longrope_keys(row: ArchitectureRow, params: dict[str, Any], config: Any) -> dict[str, Any]:
    if row.gguf_arch != "phi3":
        raise ExportError(
            f"LongRoPE on {row.model_type}: exported for phi3 only (llama.cpp's phi3 arch loads the long/short "
            f"factor tensors; fastft has not verified its {row.gguf_arch} arch with them)"
        )
    orig = _original_context(params, config)
    if orig is None:
        raise ExportError(f"{row.model_type} LongRoPE without original_max_position_embeddings cannot be written")
    longrope_factors(row, params, rotary_dims(params, config))  # lengths checked before anything is written
    logger.warning(
        "fastft: %s LongRoPE: llama.cpp picks the long or short factors once, from the context size it is given "
        "(n_ctx, rounded up to a multiple of 256 by llama.cpp: long iff > original_max_position_embeddings=%d); "
        "transformers picks them per forward from the current sequence length. Both compute the same while "
        "n_ctx <= %d (short factors) and, with n_ctx > %d, for sequences longer than %d",
        row.model_type,
        orig,
        orig,
        orig,
        orig,
    )
    # No rope.scaling.type: llama.cpp then applies no YaRN and no linear scale, only the factors and attn_factor
    # (which it multiplies into cos/sin for the long and short factors alike, as transformers does).
    return {
        "rope.scaling.attn_factor": longrope_attention_factor(params, config, orig),
        "rope.scaling.original_context_length": orig,
    }


def _yarn_keys(row: ArchitectureRow, params: dict[str, Any], config: Any) -> dict[str, Any]:
    orig = _original_context(params, config)
    if orig is None:
        raise ExportError("YaRN RoPE scaling without original_max_position_embeddings cannot be written")
    meta: dict[str, Any] = {
        "rope.scaling.type": "yarn",
        "rope.scaling.factor": float(params["factor"]),
        "rope.scaling.original_context_length": orig,
    }
    # Only the values the config states: llama.cpp's defaults are transformers' (beta 32/1, mscale 0.1 ln s + 1).
    for hf_key, gguf_key in (
        ("beta_fast", "yarn_beta_fast"),
        ("beta_slow", "yarn_beta_slow"),
        ("attention_factor", "yarn_attn_factor"),
        ("extrapolation_factor", "yarn_ext_factor"),
    ):
        if params.get(hf_key) is not None:
            meta[f"rope.scaling.{gguf_key}"] = float(params[hf_key])
    if params.get("truncate") is False:
        _yarn_unrounded(row, {**params, "original_max_position_embeddings": orig}, rotary_dims(params, config))
    mscale, mscale_all = params.get("mscale"), params.get("mscale_all_dim")
    if mscale and mscale_all and params.get("attention_factor") is None:
        # transformers: attention factor get_mscale(s, mscale) / get_mscale(s, mscale_all_dim). llama.cpp computes
        # that from rope.scaling.yarn_log_multiplier (= mscale_all_dim) with mscale taken as 1, in its mistral3
        # arch; the others ignore the key. (Only one of the two set: both use get_mscale(s); no key needed.)
        if row.gguf_arch != "mistral3" or float(mscale) != 1.0:
            raise ExportError(
                f"{row.model_type} YaRN mscale={mscale}, mscale_all_dim={mscale_all}: llama.cpp's "
                f"{row.gguf_arch} arch cannot represent this attention factor"
            )
        meta["rope.scaling.yarn_log_multiplier"] = float(mscale_all)
    return meta


def _yarn_unrounded(row: ArchitectureRow, params: dict[str, Any], dim: int) -> None:
    """``truncate: false`` (gpt-oss's stock config): transformers and OpenAI's reference keep the YaRN ramp's ends
    fractional; ggml always floors/ceils them (``ggml_rope_yarn_corr_dims``), and no arch passes a factor tensor
    that could correct it in gpt-oss's graph. gpt-oss is exported anyway -- that is how llama.cpp runs every gpt-oss
    GGUF, OpenAI's own conversion included -- with the difference named; other rows are refused."""
    count, worst = yarn_rounding_difference(params, dim)
    if count == 0:
        return  # the correction range's ends are whole numbers already: nothing differs
    what = (
        f"{row.model_type} YaRN with truncate=False: llama.cpp always rounds the YaRN correction range "
        f"(ggml_rope_yarn_corr_dims), so {count} of this model's {dim // 2} RoPE frequencies differ in llama.cpp, "
        f"by up to {worst:.2%} (relative)"
    )
    if row.model_type != "gpt_oss":
        raise ExportError(what)
    logger.warning("fastft: %s; exported as llama.cpp runs every gpt-oss GGUF", what)


def rope_keys(row: ArchitectureRow, config: Any) -> dict[str, Any]:
    """The ``rope.*`` keys (without the ``arch.`` prefix) for ``config``; refuses what llama.cpp would compute
    differently."""
    params, local_theta = rope_parameters(config)
    meta: dict[str, Any] = {"rope.freq_base": float(params.get("rope_theta", 10000.0))}
    if local_theta is not None:
        meta["rope.freq_base_swa"] = float(local_theta)
    rot = rotary_dims(params, config)
    if rot != head_dim_of(config):
        if not row.partial_rotary:
            partial = params.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", None))
            raise ExportError(f"{row.model_type}: partial_rotary_factor={partial} is not exported")
        if rot % 2:
            raise ExportError(f"{row.model_type}: partial rotary over an odd number of dims ({rot}) is not exported")
        meta["rope.dimension_count"] = rot
    kind = params["rope_type"]
    if kind == "linear":
        meta.update({"rope.scaling.type": "linear", "rope.scaling.factor": float(params["factor"])})
    elif kind == "yarn":
        meta.update(_yarn_keys(row, params, config))
    elif kind == "longrope":
        meta.update(_longrope_keys(row, params, config))
    elif kind == "llama3":
        if not row.llama3_rope:
            raise ExportError(
                f"llama3 RoPE scaling on {row.model_type}: llama.cpp's {row.gguf_arch} arch does not load rope_freqs"
            )
    elif kind != "default":  # dynamic NTK grows the base with the sequence at run time
        raise ExportError(
            f"RoPE scaling {kind!r} is not exported to GGUF; supported: default, linear, yarn, llama3, longrope (phi3)"
        )
    return meta
