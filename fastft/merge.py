"""Merged weights: a PEFT/LoRA model as the plain transformers state dict it stands for (every active adapter merged
into its base weight in fp32, 4-bit NF4 / 8-bit bitsandbytes weights dequantized, host-offloaded embeddings read
back). ``FastModel``'s ``save_pretrained_merged`` and the GGUF export (``fastft.export``) both write it.

It sits below :mod:`fastft.model` and :mod:`fastft.export`, so both import it and neither imports the other for it.
"""

from __future__ import annotations

import torch
from torch import nn

from fastft.kernels import dequantize_nf4
from fastft.patches.embedding_offload import HostEmbedding
from fastft.patches.modes import base_model


def _dequantized_weight(layer: nn.Module) -> torch.Tensor:
    """``layer.weight`` as a plain tensor: NF4 (``Params4bit``) dequantized to the dtype it was quantized from, 8-bit
    (``Int8Params``) to fp32 with its row scales, anything else as stored."""
    weight = layer.weight
    cls = type(weight).__name__
    if cls == "Params4bit":
        if getattr(weight.quant_state, "packing_format_for_cpu", False):
            raise RuntimeError(
                "this 4-bit weight was rewritten by bitsandbytes into its CPU bf16 inference layout (an eval no-grad "
                "forward on an AVX512-BF16 CPU does that in place), which neither fastft nor bitsandbytes "
                "dequantizes back exactly; load with FastModel.from_pretrained, which keeps the NF4 layout"
            )
        return dequantize_nf4(weight.data, weight.quant_state)
    if cls == "Int8Params":
        scb = getattr(weight, "SCB", None) if getattr(weight, "SCB", None) is not None else layer.state.SCB
        return weight.data.float() * (scb.float()[:, None] / 127.0)
    return weight.data


def _merged_param_wrapper(module: nn.Module, dtype: torch.dtype) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """PEFT's ``ParamWrapper`` chain (LoRA on ``nn.Parameter``s: one wrapper per targeted parameter, nested) ->
    (the wrapped module, {parameter name: W + every active adapter's delta, merged in fp32, cast to ``dtype``})."""
    from peft.tuners.lora.layer import ParamWrapper

    deltas: dict[str, torch.Tensor] = {}
    inner = module
    while isinstance(inner, ParamWrapper):
        for adapter in inner.active_adapters:
            if adapter in inner.lora_A:
                delta = inner.get_delta_weight(adapter).float()
                deltas[inner.parameter_name] = deltas.get(inner.parameter_name, 0) + delta
        inner = inner.base_layer
    merged = {name: (getattr(inner, name).detach().float() + delta).to(dtype) for name, delta in deltas.items()}
    return inner, merged


def merged_state_dict(model: nn.Module, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The plain transformers state dict of ``model`` with every LoRA adapter merged and 4/8-bit weights dequantized."""
    from peft.tuners.lora import LoraLayer
    from peft.tuners.lora.layer import ParamWrapper
    from peft.utils import ModulesToSaveWrapper

    base = base_model(model)
    state: dict[str, torch.Tensor] = {}

    def visit(module: nn.Module, prefix: str) -> None:
        if isinstance(module, HostEmbedding):
            visit(module.inner, prefix)
            return
        if isinstance(module, ModulesToSaveWrapper):
            trained = module.modules_to_save[module.active_adapters[0]] if module.modules_to_save else module.original_module
            visit(trained, prefix)
            return
        merged: dict[str, torch.Tensor] = {}
        if isinstance(module, ParamWrapper):  # LoRA on stacked expert parameters: merge, then visit the experts
            module, merged = _merged_param_wrapper(module, dtype)
            state.update({prefix + name: tensor for name, tensor in merged.items()})
        if isinstance(module, LoraLayer):
            base_layer = module.get_base_layer()
            weight = _dequantized_weight(base_layer).float()
            for adapter in module.active_adapters:
                if adapter in module.lora_A:
                    weight = weight + module.get_delta_weight(adapter).float()
            state[prefix + "weight"] = weight.to(dtype)
            if getattr(base_layer, "bias", None) is not None:
                state[prefix + "bias"] = base_layer.bias.detach().to(dtype)
            return
        if type(module).__name__ in ("Linear4bit", "Linear8bitLt"):
            state[prefix + "weight"] = _dequantized_weight(module).to(dtype)
            if module.bias is not None:
                state[prefix + "bias"] = module.bias.detach().to(dtype)
            return
        for name, p in module.named_parameters(recurse=False):
            if name not in merged:
                state[prefix + name] = p.detach().to(dtype) if p.is_floating_point() else p.detach()
        for name, b in module.named_buffers(recurse=False):
            if name not in module._non_persistent_buffers_set:
                state[prefix + name] = b.detach()
        for name, child in module.named_children():
            visit(child, f"{prefix}{name}.")

    visit(base, "")
    if getattr(base.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    return {k: v.contiguous().cpu() for k, v in state.items()}


__all__ = ["merged_state_dict"]
