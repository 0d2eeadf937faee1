"""FastModel: load a causal LM with fastft's kernels in place, add LoRA, switch between training and inference, save.

The user-facing surface mirrors what Unsloth users know::

    model, tokenizer = FastModel.from_pretrained("meta-llama/Llama-3.2-1B", max_seq_length=4096, load_in_4bit=True)
    model = FastModel.get_peft_model(model, r=16, lora_alpha=16)
    ...train with TRL...
    FastModel.for_inference(model); model.generate(...)
    model.save_pretrained_merged("out", tokenizer, save_method="merged_16bit")

Nothing is written anywhere but where the user asks; weights are read and written as safetensors.
"""

from __future__ import annotations

import copy
import math
import os
import types
from typing import Any

import torch
from torch import nn

from fastft._log import info_once, logger, mark, warn_once
from fastft.merge import merged_state_dict
from fastft.patches import modes
from fastft.patches.checkpointing import enable_checkpointing
from fastft.patches.embedding_offload import offload_input_embeddings
from fastft.patches.modes import base_model
from fastft.patches.patcher import enable_fused_lora, patch_model

#: FastModel.get_peft_model's default LoRA targets, those a model has: the split projections of the supported decoder
#: layers, and Phi-3 / GLM-4's fused qkv_proj and gate_up_proj.
ALL_LINEAR_PROJECTIONS = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "qkv_proj",
    "gate_proj",
    "up_proj",
    "gate_up_proj",
    "down_proj",
]

_FLOAT_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


def _resolve_dtype(dtype: Any, on_cuda: bool) -> torch.dtype:
    """None -> bf16 where the GPU supports it, fp16 on older GPUs (T4), fp32 on CPU."""
    if dtype is None or dtype == "auto":
        if not on_cuda:
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if isinstance(dtype, str):
        if dtype not in _FLOAT_DTYPES:
            raise ValueError(f"dtype {dtype!r} is not supported; use one of {sorted(_FLOAT_DTYPES)} or None")
        dtype = _FLOAT_DTYPES[dtype]
    if not isinstance(dtype, torch.dtype) or dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"dtype must be torch.float32, torch.float16 or torch.bfloat16 (or None for auto); got {dtype}")
    if dtype == torch.bfloat16 and on_cuda and not torch.cuda.is_bf16_supported():
        raise ValueError("this GPU does not support bfloat16 (e.g. a T4, sm_75); use dtype=torch.float16 or None")
    return dtype


def _check_model_source(model_name: str) -> bool:
    """True for a local directory; clear errors, before anything waits on the hub, for paths that do not exist.

    A name that cannot be a hub repo id (``fastft.sources.why_not_hub``: ``./x``, ``a/b/c``, ``models/nope``, or
    ``org/name`` where ``org/`` is a local folder) is a local path, and a missing one fails here at once."""
    from fastft.sources import closest_path, why_not_hub

    if not isinstance(model_name, (str, os.PathLike)):
        raise TypeError(f"fastft: model_name must be a local directory or a hub id (str), got {type(model_name).__name__}")
    model_name = os.fspath(model_name)
    if os.path.isdir(model_name):
        if not os.path.isfile(os.path.join(model_name, "config.json")):
            raise FileNotFoundError(f"fastft: {model_name!r} is a directory but has no config.json; is it a model?")
        return True
    reason = "it exists but is not a directory" if os.path.exists(model_name) else why_not_hub(model_name)
    if reason:
        close = closest_path(model_name)
        near = f"; did you mean {close!r}?" if close else ""
        raise FileNotFoundError(f"fastft: model path {model_name!r} does not exist{near} (read as a local path: {reason})")
    return False


def _context_length(config: Any) -> int | None:
    limit = getattr(config, "max_position_embeddings", None)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return limit or getattr(text, "max_position_embeddings", None)


def _check_max_seq_length(max_seq_length: Any) -> None:
    if max_seq_length is None:
        return
    if isinstance(max_seq_length, bool) or not isinstance(max_seq_length, int) or max_seq_length <= 0:
        raise ValueError(
            f"max_seq_length must be a positive number of tokens (an int), or None for the model's own "
            f"context length; got {max_seq_length!r} ({type(max_seq_length).__name__})"
        )


def _maybe_extend_rope(config: Any, max_seq_length: int) -> None:
    """RoPE is extended only when the user asks for more positions than the model was trained for; at or below its
    own context nothing about the model changes."""
    limit = getattr(config, "max_position_embeddings", None)
    if not limit or max_seq_length <= limit:
        return
    rope = dict(getattr(config, "rope_parameters", None) or {})
    rope_type = rope.get("rope_type", "default")
    if rope_type == "default" and "rope_theta" in rope:
        factor = math.ceil(max_seq_length / limit)
        config.rope_parameters = {**rope, "rope_type": "linear", "factor": float(factor)}
        config.max_position_embeddings = max_seq_length
        warn_once(
            f"fastft: max_seq_length {max_seq_length} exceeds the model's {limit} positions; applying linear "
            f"RoPE scaling x{factor} (quality beyond the trained length needs fine-tuning at that length)"
        )
    else:
        warn_once(
            f"fastft: max_seq_length {max_seq_length} exceeds the model's {limit} positions and its RoPE "
            f"({rope_type}) cannot be rescaled here; positions beyond {limit} are out of the trained range"
        )


class FastModel:
    """Namespace of static methods, like Unsloth's ``FastLanguageModel``."""

    @staticmethod
    def from_pretrained(
        model_name: str,
        max_seq_length: int | None = None,
        dtype: torch.dtype | str | None = None,
        load_in_4bit: bool = False,
        load_in_8bit: bool = False,
        full_finetuning: bool = False,
        device_map: Any = None,
        attn_implementation: str | None = None,
        trust_remote_code: bool = False,
        token: str | None = None,
        revision: str | None = None,
        tiled_mlp: bool | int = False,
        **kwargs: Any,
    ) -> tuple[nn.Module, Any]:
        """Load ``model_name`` (a local directory or a hub name) with fastft's kernels in place.

        Returns ``(model, tokenizer)``. ``max_seq_length``: None (default) is the model's own context
        (``max_position_embeddings``) and changes nothing; a longer one extends RoPE linearly (with a warning naming
        the factor), a shorter one only caps the training length. A length given here is handed to TRL by
        PatchFastRL when TRL's own ``max_length`` is left at its default; the None default hands nothing over.
        4-bit is NF4 with double quantization (bitsandbytes). ``tiled_mlp=True`` (or a token count) runs MLPs in
        sequence tiles. Extra kwargs go to ``AutoModelForCausalLM.from_pretrained``.
        """
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        if load_in_4bit and load_in_8bit:
            raise ValueError("load_in_4bit and load_in_8bit are mutually exclusive; choose one")
        if full_finetuning and (load_in_4bit or load_in_8bit):
            raise ValueError(
                "full_finetuning trains every weight and cannot train quantized weights; "
                "drop load_in_4bit/load_in_8bit or use LoRA"
            )
        _check_max_seq_length(max_seq_length)
        is_local = _check_model_source(model_name)
        on_cuda = torch.cuda.is_available() and device_map != "cpu"
        torch_dtype = _resolve_dtype(dtype, on_cuda)
        hub = dict(trust_remote_code=trust_remote_code, token=token, revision=revision)
        try:
            config = AutoConfig.from_pretrained(model_name, **hub)
        except OSError as exc:
            where = "the local directory" if is_local else "a local directory or the hub (offline or unknown name?)"
            raise OSError(f"fastft: could not load the config of {model_name!r} from {where}: {exc}") from exc
        asked_length = max_seq_length  # only a length the user chose is handed to TRL (fastft.patches.trl)
        if max_seq_length is None:
            max_seq_length = _context_length(config) or 2048
        else:
            _maybe_extend_rope(config, max_seq_length)

        load_kwargs: dict[str, Any] = dict(config=config, dtype=torch_dtype, **hub, **kwargs)
        if attn_implementation is not None:  # else transformers' default: sdpa where the architecture supports it
            load_kwargs["attn_implementation"] = attn_implementation
        if load_in_4bit or load_in_8bit:
            from transformers import BitsAndBytesConfig

            load_kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=load_in_4bit,
                load_in_8bit=load_in_8bit,
                bnb_4bit_quant_type="nf4",
                bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=torch_dtype,
            )
        if device_map is not None:
            load_kwargs["device_map"] = device_map
        elif on_cuda:
            load_kwargs["device_map"] = {"": torch.cuda.current_device()}
        elif load_in_4bit or load_in_8bit:
            load_kwargs["device_map"] = "cpu"
        notes_from = mark()  # the summary lists every fastft note from here on
        model = AutoModelForCausalLM.from_pretrained(model_name, **load_kwargs)
        tokenizer = AutoTokenizer.from_pretrained(model_name, **hub)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
            info_once("fastft: the tokenizer had no pad token; using its eos token for padding")

        if load_in_4bit:
            _keep_nf4_layout_on_cpu(model)
        report = patch_model(model, tiled_mlp=tiled_mlp)
        model._fastft_patch_report = report  # read by the start-of-training summary (fastft.patches.trl_summary)
        model._fastft_notes_from = notes_from
        model.max_seq_length = max_seq_length
        model._fastft_asked_max_seq_length = asked_length
        model._fastft_full_finetuning = full_finetuning
        if full_finetuning:
            for p in model.parameters():
                p.requires_grad_(True)
        _attach_methods(model)
        if report.supported:  # an unsupported model_type was already said, once, as a warning by patch_model
            print(report)
        return model, tokenizer

    @staticmethod
    def get_peft_model(
        model: nn.Module,
        r: int = 16,
        target_modules: list[str] | str | None = None,
        lora_alpha: int = 16,
        lora_dropout: float = 0.0,
        bias: str = "none",
        use_gradient_checkpointing: bool | str | None = None,
        random_state: int = 3407,
        use_rslora: bool = False,
        modules_to_save: list[str] | None = None,
        offload_embeddings: bool = False,
        **kwargs: Any,
    ) -> nn.Module:
        """Add PEFT LoRA adapters (all linear projections by default) plus fastft's fused LoRA paths where exact.

        ``use_gradient_checkpointing``: True (standard), "fastft" (layer inputs offloaded to pinned host memory on
        CUDA; standard checkpointing on CPU, logged) or False. None (default) follows the trainer: under
        PatchFastRL, TRL's ``gradient_checkpointing`` decides whether ("fastft" mode when it is True, off when it is
        False); without a trainer, "fastft". An explicit value here wins over the trainer's.
        ``offload_embeddings``: keep the frozen input embedding in host memory (1.05 GB of GPU memory saved on
        Llama-3.1-8B; see fastft/patches/embedding_offload.py). Refused, with a warning, when the embedding is
        trainable, tied to the LM head, sharded or partitioned.
        """
        import peft

        if isinstance(model, peft.PeftModel):
            raise ValueError("this model already has LoRA adapters; call get_peft_model once on the base model")
        if r <= 0:
            raise ValueError(f"r must be positive, got {r}")
        linear_names = [
            name
            for name, m in model.named_modules()
            if isinstance(m, nn.Linear) or type(m).__name__ in ("Linear4bit", "Linear8bitLt", "Conv1D")
        ]
        present = {name.rsplit(".", 1)[-1] for name in linear_names}
        if target_modules is None:
            remapped = _peft_moe_remapped_names(model)
            target_modules = [t for t in ALL_LINEAR_PROJECTIONS if t in present and t not in remapped]
            if remapped & present:
                warn_once(
                    f"fastft: PEFT maps the target names {sorted(remapped & present)} of a "
                    f"{model.config.model_type} model onto its stacked experts (its transformers v4 -> v5 "
                    "conversion, which also doubles rank and alpha), so fastft's defaults leave them out: the "
                    "experts get adapters through target_parameters, and a dense layer's MLP gets none"
                )
            if not target_modules:
                raise ValueError(
                    f"found none of the usual projections {ALL_LINEAR_PROJECTIONS}; pass target_modules explicitly"
                )
            # Never silently: a linear layer the defaults do not name gets no adapter, so say which.
            uncovered = sorted(present - set(target_modules) - {"lm_head"} - remapped)
            if uncovered:
                warn_once(
                    f"fastft: default LoRA targets {target_modules} leave these linear layers without an "
                    f"adapter: {uncovered}; pass target_modules to include them"
                )
            kwargs.setdefault("target_parameters", _default_expert_targets(model))
        elif not isinstance(target_modules, str):  # a str is PEFT's regex (or "all-linear"): PEFT checks it
            _check_target_modules(list(target_modules), present, linear_names)
        config = peft.LoraConfig(
            r=r,
            lora_alpha=lora_alpha,
            lora_dropout=lora_dropout,
            bias=bias,
            target_modules=target_modules,
            use_rslora=use_rslora,
            modules_to_save=modules_to_save,
            task_type="CAUSAL_LM",
            **kwargs,
        )
        torch.manual_seed(random_state)
        peft_model = peft.get_peft_model(model, config)
        fused = enable_fused_lora(peft_model)
        peft_model._fastft_fused_lora = fused
        if any(fused.values()):
            logger.info(
                "fastft: fused LoRA on %d MLPs and %d attention projections (each falls back to PEFT, logged, when inexact)",
                fused["mlp"],
                fused["attention"],
            )
        if offload_embeddings:
            offload_input_embeddings(peft_model)
        # None: "fastft" until a trainer says otherwise (fastft.patches.trl applies the trainer's choice at build time)
        peft_model._fastft_checkpointing_follows_trainer = use_gradient_checkpointing is None
        if use_gradient_checkpointing is None:
            use_gradient_checkpointing = "fastft"
        mode = enable_checkpointing(peft_model, use_gradient_checkpointing)
        peft_model._fastft_checkpointing = use_gradient_checkpointing
        logger.info("fastft: gradient checkpointing: %s", mode)
        _attach_methods(peft_model)
        return peft_model

    @staticmethod
    def for_inference(model: nn.Module) -> nn.Module:
        """Eval mode, KV cache on, checkpointing off (remembered for ``for_training``)."""
        return modes.for_inference(model)

    @staticmethod
    def for_training(model: nn.Module, use_gradient_checkpointing: bool | str | None = None) -> nn.Module:
        """Train mode (dropout back on), checkpointing restored as get_peft_model set it, KV cache off."""
        return modes.for_training(model, use_gradient_checkpointing)


def _keep_nf4_layout_on_cpu(model: nn.Module) -> None:
    """bitsandbytes rewrites a Linear4bit's weight in place into a CPU bf16 inference layout at its first eval no-grad
    forward on an AVX512-BF16 CPU; fastft's fused LoRA and merged saves read the NF4 format, so keep it."""
    count = 0
    for module in model.modules():
        if getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False
            count += 1
    if count:
        info_once(
            f"fastft: kept the NF4 layout on {count} 4-bit layers (bitsandbytes' CPU bf16 inference repacking "
            "is off: fastft reads NF4)"
        )


def _check_target_modules(target_modules: list[Any], present: set[str], linear_names: list[str]) -> None:
    """Every listed name must match a linear layer of this model the way PEFT matches it (the whole module name, or
    its dotted suffix): PEFT itself only objects when none matches, so a typo next to a valid name would silently
    train fewer adapters than asked for."""
    import difflib

    def matches(name: Any) -> bool:
        return isinstance(name, str) and any(full == name or full.endswith("." + name) for full in linear_names)

    missing = [name for name in target_modules if not matches(name)]
    if not missing:
        return
    hints = []
    for name in missing:
        close = difflib.get_close_matches(str(name), sorted(present), n=1)
        hints.append(f"{name!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    raise ValueError(
        f"target_modules: no linear layer named {', '.join(hints)} in this model; its linear layers are "
        f"{', '.join(sorted(present))}"
    )


def _default_expert_targets(model: nn.Module) -> list[str] | None:
    """MoE models: the stacked expert parameters (``experts.gate_up_proj``, ``experts.down_proj``) as PEFT
    ``target_parameters``, so the default adapters cover the experts, not attention alone. None for dense models."""
    from fastft.patches.moe import EXPERT_PARAMETERS, expert_modules

    experts = expert_modules(model)
    if not experts:
        return None
    targets = [f"experts.{name}" for name in EXPERT_PARAMETERS if hasattr(experts[0][1], name)]
    logger.info(
        "fastft: LoRA on the %d expert stacks too (PEFT target_parameters %s; PEFT's parametrized path)",
        len(experts),
        targets,
    )
    return targets


def _peft_moe_remapped_names(model: nn.Module) -> set[str]:
    """Target-module names PEFT rewrites into expert ``target_parameters`` for this model type (PEFT >= 0.18's
    v4 -> v5 MoE conversion: for qwen3_moe, ``gate_proj``/``up_proj``/``down_proj``). Read from PEFT's own table;
    empty where PEFT has none (or moved it)."""
    try:
        from peft.utils import transformers_weight_conversion as conversion

        pattern = conversion._MODEL_TO_CONVERSION_PATTERN.get(getattr(model.config, "model_type", None))
        return set(conversion._MOE_TARGET_MODULE_MAPPING.get(pattern, {}))
    except (ImportError, AttributeError):
        return set()


def _attach_methods(model: nn.Module) -> None:
    model.save_pretrained_merged = types.MethodType(save_pretrained_merged, model)
    model.save_pretrained_gguf = types.MethodType(save_pretrained_gguf, model)


# ----------------------------------------------------------------------------------------------------------------
# Saving
# ----------------------------------------------------------------------------------------------------------------
def save_pretrained_merged(
    self: nn.Module,
    save_directory: str,
    tokenizer: Any = None,
    save_method: str = "merged_16bit",
    dtype: torch.dtype | None = None,
    max_shard_size: str = "5GB",
) -> str:
    """Save for deployment: ``"merged_16bit"`` (adapters merged into a dequantized 16-bit base, a plain transformers
    checkpoint) or ``"lora"`` (the adapters only). Safetensors only. Returns the directory."""
    if save_method not in ("merged_16bit", "lora"):
        raise ValueError(f"save_method must be 'merged_16bit' or 'lora', got {save_method!r}")
    os.makedirs(save_directory, exist_ok=True)
    if save_method == "lora":
        if not hasattr(self, "peft_config"):
            raise ValueError("save_method='lora' needs a model with LoRA adapters (FastModel.get_peft_model)")
        self.save_pretrained(save_directory, safe_serialization=True)
    else:
        from huggingface_hub import save_torch_state_dict

        base = base_model(self)
        if dtype is None:
            compute = next((p.dtype for p in base.parameters() if p.is_floating_point()), torch.float32)
            dtype = compute if compute in (torch.float16, torch.bfloat16) else torch.bfloat16
        state = merged_state_dict(self, dtype)
        config = copy.deepcopy(base.config)
        for attr in ("quantization_config", "_pre_quantization_dtype"):
            if hasattr(config, attr):
                delattr(config, attr)
        config.dtype = dtype
        config.save_pretrained(save_directory)
        if getattr(base, "generation_config", None) is not None:
            base.generation_config.save_pretrained(save_directory)
        save_torch_state_dict(state, save_directory, max_shard_size=max_shard_size, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(save_directory)
    logger.info("fastft: saved %s to %s", save_method, save_directory)
    return save_directory


def save_pretrained_gguf(
    self: nn.Module, save_directory: str, tokenizer: Any = None, quantization: str = "q8_0", **kwargs: Any
) -> str:
    """Save as one GGUF file (adapters merged in fp32) plus an Ollama Modelfile; see ``fastft.export.save_gguf``."""
    from fastft.export import save_gguf

    return save_gguf(self, save_directory, tokenizer, quantization, **kwargs)
