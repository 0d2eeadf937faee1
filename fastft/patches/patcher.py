"""The one generic patcher: :func:`patch_model` applies a model's row of
:data:`fastft.patches.architectures.ARCHITECTURES` with fastft's kernels, and :func:`enable_fused_lora` routes its LoRA
layers through the fused LoRA functions.

What gets patched, and at which scope:
- RMSNorm and MLP: per module *instance* of the loaded model (``forward`` set on the instance), so other models in
  the same process are untouched.
- RoPE: the modeling module's ``apply_rotary_pos_emb`` function (attention forwards look it up there), process-wide;
  the replacement computes exactly the same function and hands any call it does not cover (another ``unsqueeze_dim``,
  partial rotary) to the original.
- The loss: the causal-LM instance's forward (:mod:`fastft.patches.causal_lm_loss`).
Each replacement is checked at patch time against the original on tiny CPU tensors (the numerical probes below).
Every change is a :class:`fastft.patches.base.Patch`: guarded, logged, and reverted by ``fastft.unpatch()``.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib
import inspect
import types
from typing import Any

import torch
from torch import nn

from fastft._log import info_once, logger, warn_once
from fastft.kernels.activation import Activation
from fastft.patches.architectures import ARCHITECTURES, architecture_of
from fastft.patches.base import Patch, all_guards, parameters_guard
from fastft.patches.causal_lm_loss import causal_lm_contract, make_causal_lm_forward


# ----------------------------------------------------------------------------------------------------------------
# Replacement forwards (bound to each instance)
# ----------------------------------------------------------------------------------------------------------------
def _norm_eps(module: nn.Module) -> float:
    for name in ("variance_epsilon", "eps"):
        if hasattr(module, name):
            return float(getattr(module, name))
    raise AttributeError(f"{type(module).__name__} has no eps attribute")


def _make_norm_forward(gemma: bool):
    from fastft.kernels import rms_norm

    def forward(self: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
        return rms_norm(hidden_states, self.weight, self._fastft_eps, gemma=gemma)

    forward._fastft_norm = True
    return forward


def _make_mlp_forward(activation: Activation, style: str = "gated"):
    from fastft.kernels.glu import glu

    def forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
        tile = getattr(self, "_fastft_tile_tokens", None)
        if tile is not None and x.shape[:-1].numel() > tile:
            from fastft.patches.tiled_mlp import tiled_mlp

            return tiled_mlp(self._fastft_mlp_once, x, tile)
        return self._fastft_mlp_once(x)

    forward._fastft_mlp = True

    def mlp_once(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
        fused = _fused_lora_mlp(self, x, activation)
        if fused is not None:
            return fused
        return self.down_proj(glu(self.gate_proj(x), self.up_proj(x), activation))

    def gate_up_once(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
        # Phi-3 / GLM-4: one [.., 2 * I] projection whose halves are (gate, up), as the model's own chunk(2) splits
        # it. With LoRA on, each projection takes the fused LoRA projection (one x read for base + adapter).
        gate_up = _lora_projection(self, "gate_up_proj", x)
        gate, up = gate_up.chunk(2, dim=-1)  # strided halves: the GLU kernels read them in place, no copy
        return _lora_projection(self, "down_proj", glu(gate, up, activation))

    return forward, (gate_up_once if style == "gate_up" else mlp_once)


def _lora_projection(mlp: nn.Module, name: str, x: torch.Tensor) -> torch.Tensor:
    layer = mlp._modules.get(name)  # the submodule without nn.Module.__getattr__ (called per projection per token)
    if layer is None:
        layer = getattr(mlp, name)
    if getattr(mlp, "_fastft_fuse_lora", False):
        from fastft.patches.peft_lora import fused_linear_forward

        out = fused_linear_forward(layer, x)
        if out is not None:
            return out
    return layer(x)


def _fused_lora_mlp(mlp: nn.Module, x: torch.Tensor, activation: Activation) -> torch.Tensor | None:
    """The fused LoRA MLP when the projections are LoRA layers it can handle exactly, else None (reason logged)."""
    if not getattr(mlp, "_fastft_fuse_lora", False):
        return None
    from fastft.patches.peft_lora import fused_mlp_forward

    return fused_mlp_forward(mlp, x, activation)


def _make_rope(original):
    from fastft.kernels import apply_rope

    def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):
        # Cover the layout every listed architecture uses; hand anything else to the original, unchanged.
        if unsqueeze_dim != 1 or cos.dim() != 3 or cos.shape[-1] != q.shape[-1] or k.shape[-1] != q.shape[-1]:
            info_once(
                f"fastft: RoPE call outside the fused layout (unsqueeze_dim={unsqueeze_dim}, cos {tuple(cos.shape)}, "
                f"q {tuple(q.shape)}); using transformers' apply_rotary_pos_emb for it"
            )
            return original(q, k, cos, sin, unsqueeze_dim)
        return apply_rope(q, k, cos, sin)

    apply_rotary_pos_emb.__wrapped__ = original
    return apply_rotary_pos_emb


# ----------------------------------------------------------------------------------------------------------------
# Numerical probes: original vs replacement on tiny CPU tensors, at patch time
# ----------------------------------------------------------------------------------------------------------------
#: fp32 agreement a probe demands: the same function up to the order of float operations.
_PROBE_RTOL, _PROBE_ATOL = 1e-4, 1e-5


def _compare(what: str, got: Any, want: Any) -> str | None:
    got = got if isinstance(got, tuple) else (got,)
    want = want if isinstance(want, tuple) else (want,)
    if len(got) != len(want):
        return f"{what}: the replacement returns {len(got)} tensors, the original {len(want)}"
    for g, w in zip(got, want):
        if not isinstance(w, torch.Tensor) or g.shape != w.shape:
            return f"{what}: output shapes differ"
        if not torch.allclose(g.float(), w.float(), rtol=_PROBE_RTOL, atol=_PROBE_ATOL):
            return f"{what}: probe mismatch, max |diff| {(g.float() - w.float()).abs().max().item():.3g}"
    return None


def _rope_contract(original: Any) -> str | None:
    problem = parameters_guard("q", "k", "cos", "sin")(original)
    if problem:
        return problem
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        q, k = torch.randn(1, 4, 5, 8), torch.randn(1, 2, 5, 8)
        angles = torch.arange(5.0)[:, None] * torch.rand(4)[None, :]
        emb = torch.cat((angles, angles), dim=-1)[None]
        cos, sin = emb.cos(), emb.sin()
    with torch.no_grad():
        return _compare("RoPE", _make_rope(original)(q, k, cos, sin), original(q, k, cos, sin))


def _norm_contract(norm_cls: type, example: nn.Module, gemma: bool) -> str | None:
    """A fresh CPU instance of the model's norm class with random weights: its forward vs fastft's rms_norm."""
    from fastft.kernels import rms_norm

    hidden, eps = example.weight.shape[-1], _norm_eps(example)
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(0)
        probe = norm_cls(hidden, eps=eps).float()
        probe.weight.normal_(0.0, 0.5)
        x = torch.randn(3, hidden)
        return _compare(f"{norm_cls.__name__}", rms_norm(x, probe.weight, eps, gemma=gemma), norm_cls.forward(probe, x))


#: Constructor arguments an MLP class may need besides its config, and the value the probe passes: layer 0 exists in
#: every model (Gemma 4's MLP reads its width from the config by layer index).
_MLP_PROBE_ARGUMENTS = {"layer_idx": 0}


def _mlp_contract(mlp_cls: type, config: Any, forward: Any, mlp_once: Any) -> str | None:
    """A small CPU instance of the model's MLP class (its own config, hidden 16 / intermediate 24): its forward vs
    the patched forward -- the activation, and the gate/up/down wiring."""
    small = copy.deepcopy(config)
    small.hidden_size, small.intermediate_size = 16, 24
    parameters = list(inspect.signature(mlp_cls.__init__).parameters.values())[2:]  # after self, config
    required = [p.name for p in parameters if p.default is p.empty and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    unknown = [name for name in required if name not in _MLP_PROBE_ARGUMENTS]
    if unknown:
        return f"{mlp_cls.__name__}(config, ...) also needs {unknown}; the probe cannot build an instance"
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(0)
        probe = mlp_cls(small, **{name: _MLP_PROBE_ARGUMENTS[name] for name in required}).float()
        x = torch.randn(3, 16)
        want = mlp_cls.forward(probe, x)
        probe._fastft_mlp_once = types.MethodType(mlp_once, probe)
        return _compare(f"{mlp_cls.__name__}", forward(probe, x), want)


# ----------------------------------------------------------------------------------------------------------------
# The generic patcher
# ----------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class PatchReport:
    model_type: str | None
    supported: bool
    applied: list[str] = dataclasses.field(default_factory=list)
    skipped: list[str] = dataclasses.field(default_factory=list)
    #: piece -> why it was left unpatched
    reasons: dict[str, str] = dataclasses.field(default_factory=dict)

    def record(self, name: str, applied: bool, problem: str | None, piece: str | None = None) -> None:
        if applied:
            self.applied.append(name)
        else:
            self.skipped.append(piece or name)
            self.reasons[piece or name] = problem or "not applied"

    def __str__(self) -> str:
        if not self.supported:
            return f"fastft: model_type {self.model_type!r} is not in the architecture table; loaded unpatched"
        skipped = [f"{name} ({self.reasons[name]})" if name in self.reasons else name for name in self.skipped]
        return f"fastft: {self.model_type}: patched {', '.join(self.applied) or 'nothing'}" + (
            f"; left unpatched: {', '.join(skipped)}" if skipped else ""
        )


#: modeling module -> its RoPE Patch (module-level patches are shared by every model of that architecture)
_MODULE_PATCHES: dict[str, Patch] = {}


def module_patches() -> list[Patch]:
    """The process-wide patches made so far (one RoPE Patch per modeling module), applied or not: what a caller that
    must scope them (the memory model: on for fastft's variant, off for the baseline) applies and reverts."""
    return list(_MODULE_PATCHES.values())


def _instance_patch(name: str, module: nn.Module, attribute: str, function) -> Patch:
    return Patch(name, module, attribute, types.MethodType(function, module), tested=("transformers",))


def patch_model(model: nn.Module, *, tiled_mlp: bool | int = False) -> PatchReport:
    """Swap fastft kernels into ``model`` (a transformers causal LM, possibly PEFT-wrapped) according to its row.

    ``tiled_mlp``: True runs every MLP in sequence chunks of 4,096 tokens (an int sets the chunk / threshold), so its
    intermediate activations never exist for the whole sequence at once. Idempotent; ``fastft.unpatch()`` reverts.
    """
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    row = ARCHITECTURES.get(model_type)
    report = PatchReport(model_type, row is not None)
    if row is None:
        warn_once(str(report), key=f"unsupported-{model_type}")
        return report
    try:
        modeling = importlib.import_module(row.module)
    except ImportError as exc:
        warn_once(f"fastft: cannot import {row.module} ({exc}); {model_type} stays unpatched")
        report.skipped.append("everything")
        return report

    # RoPE: module function, process-wide, guarded on its contract (parameters + a numerical probe); one Patch per
    # module so loading a second model neither stacks wrappers nor loses the original.
    # A piece the row marks unfused is left as transformers wrote it, said once, and the rest is still patched.
    unfused = dict(row.unfused)
    for piece, why in unfused.items():
        info_once(f"fastft: {model_type}: {piece} left unpatched: {why}", key=f"unfused:{model_type}:{piece}")
    rope = _MODULE_PATCHES.get(row.module)
    if rope is None and "rope" not in unfused:
        rope = _MODULE_PATCHES[row.module] = Patch(
            f"{model_type} rotary embedding",
            modeling,
            row.rope_function,
            _make_rope,
            wrap=True,
            tested=("transformers",),
            guard=_rope_contract,
        )
    if "rope" in unfused:
        report.record("rope", False, unfused["rope"])
    else:
        report.record("rope", rope.apply(), rope.problem)

    # RMSNorm instances: the class's forward vs fastft's rms_norm on a fresh CPU instance, once per call.
    norm_cls = getattr(modeling, row.norm_class, None)
    norms = [m for m in model.modules() if norm_cls is not None and type(m) is norm_cls]
    todo = [m for m in norms if not getattr(vars(m).get("forward"), "_fastft_norm", False)]
    problem = unfused.get("rms_norm") or (None if norms else f"no {row.norm_class} modules found")
    if todo and not problem:
        problem = all_guards(lambda _: _norm_contract(norm_cls, todo[0], row.norm_style == "gemma"))(norm_cls)
        if problem:  # through Patch._skip, like RoPE's: warned once and listed among the skipped patches
            Patch(f"{model_type} RMSNorm", norm_cls, "forward", None, guard=lambda _: problem).apply()
        else:
            norm_forward = _make_norm_forward(row.norm_style == "gemma")
            for module in todo:
                module._fastft_eps = _norm_eps(module)
                _instance_patch(f"{model_type} RMSNorm", module, "forward", norm_forward).apply()
    report.record("rms_norm", bool(norms) and not problem, problem)

    # MLP instances: the class's forward vs the patched forward on a small CPU instance, once per call.
    act_name = getattr(config, row.activation_field, None)
    activation = Activation.from_config(act_name)
    mlp_cls = getattr(modeling, row.mlp_class, None) if row.mlp_class else None
    mlps = [m for m in model.modules() if mlp_cls is not None and type(m) is mlp_cls]
    if row.experts_class and not mlps:
        pass  # an MoE model without dense layers: its experts are the MLPs (below)
    elif activation is None:
        report.record("mlp", False, f"activation {act_name!r} has no fused kernel")
    elif not mlps:
        report.record("mlp", False, f"no {row.mlp_class} modules found")
    else:
        forward, mlp_once = _make_mlp_forward(activation, row.mlp_style)
        tile = None if tiled_mlp is False else (4096 if tiled_mlp is True else int(tiled_mlp))
        todo = [m for m in mlps if not getattr(vars(m).get("forward"), "_fastft_mlp", False)]  # not ours now
        problem = all_guards(lambda _: _mlp_contract(mlp_cls, config, forward, mlp_once))(mlp_cls) if todo else None
        if problem:  # through Patch._skip, like RoPE's: warned once and listed among the skipped patches
            Patch(f"{model_type} MLP", mlp_cls, "forward", None, guard=lambda _: problem).apply()
        else:
            for module in mlps:
                if tile is not None:
                    module._fastft_tile_tokens = tile
            for module in todo:
                module._fastft_mlp_once = types.MethodType(mlp_once, module)
                _instance_patch(f"{model_type} MLP ({activation.kernel})", module, "forward", forward).apply()
        report.record(f"mlp:{activation.kernel}" + (f" tiled({tile})" if tile else ""), not problem, problem, piece="mlp")
    if row.experts_class:
        from fastft.patches.moe import patch_experts

        patch_experts(model, row, modeling, report)

    # The loss head: on the causal-LM instance, guarded on its forward's contract.
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    if getattr(getattr(vars(lm).get("forward"), "__func__", None), "_fastft_loss", False):
        report.record("fused_loss", True, None)
    else:
        original = lm.forward
        problem = causal_lm_contract(lm, original)
        moe_modeling = modeling if row.experts_class else None
        if moe_modeling is not None and not problem:
            from fastft.patches.moe import router_aux_contract

            problem = router_aux_contract(lm, modeling)
        replacement = None if problem else types.MethodType(make_causal_lm_forward(original, moe_modeling), lm)
        loss_patch = Patch(
            f"{model_type} causal-LM loss", lm, "forward", replacement, tested=("transformers",), guard=lambda _: problem
        )
        report.record("fused_loss", loss_patch.apply(), loss_patch.problem)
    logger.info(str(report))
    model._fastft_patch_report = report
    return report


#: Attention projections that get the fused LoRA projection (each on its own: fusing q/k/v into one input read would
#: mean rewriting attention forwards, which this module never does).
ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj")


def _make_lora_projection_forward(original):
    from fastft.patches.peft_lora import fused_linear_forward

    def forward(self, x, *args, **kwargs):
        if not args and not kwargs:
            out = fused_linear_forward(self, x)
            if out is not None:
                return out
        return original(x, *args, **kwargs)

    return forward


def enable_fused_lora(model: nn.Module) -> int:
    """Route LoRA MLPs and attention projections of patched architectures through fastft's fused LoRA functions.

    Each call checks exactness (no dropout, bias, DoRA; one adapter; matching dtypes) and runs PEFT's own forward,
    with the reason logged once, when it cannot. Returns ``{"mlp": n, "attention": m}``: how many MLPs and attention
    projections were switched. ``fastft.unpatch()`` reverts the projection patches.
    """
    from peft.tuners.lora import LoraLayer

    row = architecture_of(model.get_base_model() if hasattr(model, "get_base_model") else model)
    counts = {"mlp": 0, "attention": 0}
    if row is None:
        return counts
    for name, module in model.named_modules():
        if hasattr(module, "_fastft_mlp_once"):
            module._fastft_fuse_lora = True
            counts["mlp"] += 1
        elif isinstance(module, LoraLayer) and name.rsplit(".", 1)[-1] in ATTENTION_PROJECTIONS:
            if "forward" not in vars(module):
                forward = _make_lora_projection_forward(module.forward)
                _instance_patch(f"{row.model_type} fused LoRA projection", module, "forward", forward).apply()
            counts["attention"] += 1
    return counts
