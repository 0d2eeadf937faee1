"""MoE rows of the architecture table (qwen3_moe, mixtral, gpt_oss): the expert stack and the router aux loss.

What is patched: the *experts* module instance (``Qwen3MoeExperts`` / ``MixtralExperts`` / ``GptOssExperts``) gets
:func:`fastft.kernels.moe.fused_experts` as its forward -- tokens sorted by expert, one grouped-GEMM launch per
projection, the gate activation fused (SwiGLU kernel for silu experts; gpt_oss's clamped gate is its own
``_apply_gate``), routing weights applied in the same pass. The experts take ``(hidden [T, H], top_k_index [T, k],
top_k_weights [T, k])`` in all three families, so the block around them -- the router, mixtral's jitter noise, top-k,
normalisation, gpt_oss's ``(out, router_scores)`` return -- stays transformers' code, and so do the router logits the
aux loss reads (they are recorded by the model's own output hooks on the router module).

LoRA on experts: PEFT's ``target_parameters`` wraps the experts module in ``ParamWrapper``s that parametrize
``gate_up_proj`` / ``down_proj`` as ``W + scale * B @ A`` for the duration of the call and then call the experts
module itself -- so the grouped GEMM runs on the adapted weight and autograd carries the gradient to A and B (the
adapter is *not* fused into the GEMM: PEFT materializes ``W + BA`` per expert stack per call, as it does without
fastft).

The fused loss head (``fastft.patches.causal_lm_loss``) adds the load-balancing loss exactly as the model's forward
does when ``output_router_logits`` is on: ``loss + router_aux_loss_coef * load_balancing_loss_func(router_logits,
num_experts, num_experts_per_tok, attention_mask)``, with the model's own function (:func:`router_aux_output`).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

#: Config fields the expert classes read their sizes from (the probe shrinks whichever the config has).
_INTERMEDIATE_FIELDS = ("moe_intermediate_size", "intermediate_size")
_NUM_EXPERT_FIELDS = ("num_experts", "num_local_experts")
#: Stacked expert parameters, the default ``target_parameters`` of FastModel.get_peft_model.
EXPERT_PARAMETERS = ("gate_up_proj", "down_proj")


def _experts_forward(
    self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    from fastft.kernels.moe import fused_experts

    return fused_experts(self, hidden_states, top_k_index, top_k_weights)


_experts_forward._fastft_experts = True


def experts_contract(experts_cls: type, config: Any) -> str | None:
    """A small CPU instance of the model's experts class (its own config; hidden 16, intermediate 12, 3 experts):
    its forward vs :func:`fused_experts` on an uneven routing in which one expert gets no token."""
    from fastft.kernels.moe import expert_layout, fused_experts
    from fastft.patches.patcher import _compare

    small = copy.deepcopy(config)
    small.hidden_size = 16
    for field in _INTERMEDIATE_FIELDS:
        if hasattr(small, field):
            setattr(small, field, 12)
    for field in _NUM_EXPERT_FIELDS:
        if hasattr(small, field):
            setattr(small, field, 3)
    try:
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            torch.manual_seed(0)
            probe = experts_cls(small).float()
            for param in probe.parameters():
                param.normal_(0.0, 0.3)
            expert_layout(probe)
            x = torch.randn(7, 16)
            # experts 0 and 1 only (2 gets zero tokens), in an order that is not sorted by expert
            index = torch.tensor([[1, 0], [0, 1], [1, 0], [1, 0], [0, 1], [1, 0], [0, 1]])
            weights = torch.softmax(torch.randn(7, 2), dim=-1)
            return _compare(
                experts_cls.__name__, fused_experts(probe, x, index, weights), experts_cls.forward(probe, x, index, weights)
            )
    except (TypeError, ValueError, AttributeError, RuntimeError) as exc:
        return f"{experts_cls.__name__}: {type(exc).__name__}: {exc}"


def patch_experts(model: nn.Module, row: Any, modeling: Any, report: Any) -> None:
    """Give every experts module of ``row.experts_class`` the grouped-GEMM forward (guarded by the probe)."""
    from fastft._log import warn_once
    from fastft.patches.base import all_guards
    from fastft.patches.patcher import _instance_patch

    cls = getattr(modeling, row.experts_class, None)
    found = [m for m in model.modules() if cls is not None and type(m) is cls]
    todo = [m for m in found if not getattr(getattr(vars(m).get("forward"), "__func__", None), "_fastft_experts", False)]
    problem = None if found else f"no {row.experts_class} modules found"
    if todo:
        problem = all_guards(lambda _: experts_contract(cls, model.config))(cls)
        if problem:
            warn_once(
                f"fastft: not applying '{row.model_type} experts' ({problem}); experts run as transformers wrote them",
                key=f"skip:{row.model_type} experts",
            )
        else:
            for module in todo:
                _instance_patch(f"{row.model_type} experts (grouped GEMM)", module, "forward", _experts_forward).apply()
    report.record("experts:grouped_gemm", not problem, problem, piece="experts")


def router_aux_contract(lm: nn.Module, modeling: Any) -> str | None:
    """What :func:`router_aux_output` reads: the model's loss function and the causal LM's three attributes."""
    if not callable(getattr(modeling, "load_balancing_loss_func", None)):
        return f"{modeling.__name__} has no load_balancing_loss_func"
    missing = [a for a in ("num_experts", "num_experts_per_tok", "router_aux_loss_coef") if not hasattr(lm, a)]
    return f"{type(lm).__name__} lacks {missing}" if missing else None


def router_aux_output(
    lm: nn.Module, modeling: Any, outputs: Any, loss: torch.Tensor, attention_mask: Any, wanted: bool
) -> Any:
    """The MoE causal-LM output of the fused head: ``loss`` plus the router aux loss as the model adds it (when
    ``wanted``: the resolved ``output_router_logits``), logits None, the backbone's other fields passed through."""
    from transformers.modeling_outputs import MoeCausalLMOutputWithPast

    aux = None
    if wanted:
        from fastft.patches.lm_head import router_aux_loss

        aux = router_aux_loss(lm, modeling, outputs.router_logits, attention_mask)
        loss = loss + lm.router_aux_loss_coef * aux.to(loss.device)
    fields = set(MoeCausalLMOutputWithPast.__dataclass_fields__) - {"loss", "logits", "aux_loss"}
    passed = {name: value for name, value in outputs.items() if name in fields}
    return MoeCausalLMOutputWithPast(loss=loss, aux_loss=aux, logits=None, **passed)


def expert_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every experts stack fastft's rows know (for LoRA targets and the planner)."""
    from fastft.kernels.moe import SUPPORTED_EXPERTS

    return [(name, m) for name, m in model.named_modules() if type(m).__name__ in SUPPORTED_EXPERTS]
