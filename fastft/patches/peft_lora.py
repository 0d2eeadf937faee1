"""PEFT's LoRA layers meet fastft's fused LoRA math (``fastft.kernels.lora``): when a PEFT ``Linear`` / bitsandbytes
``Linear4bit`` LoRA layer can run fused with identical math (:func:`can_fuse`), reading its active adapter off it as
:class:`~fastft.kernels.lora.AdapterParts`, and the entry points.

The kernels know nothing of PEFT, bitsandbytes' layer classes or sharding; everything that inspects a PEFT layer lives
here, as PEFT itself keeps ``tuners/lora/layer.py`` apart from its bitsandbytes dispatch (``tuners/lora/bnb.py``).

Entry points
    :func:`fused_mlp_forward`, :func:`fused_linear_forward`: what model patching calls (``patches/architectures.py``:
        a gated MLP, and each attention or gate_up/down projection on its own). They return None, with the reason
        logged once, when a layer (or this input) cannot run fused exactly; the caller then runs PEFT's own forward.
    :func:`lora_mlp`, :func:`lora_qkv`, :func:`lora_o`: direct calls on a block whose projections are PEFT layers;
        they raise ValueError when a projection cannot be fused. ``lora_qkv`` reads X once for all three.
    ``lora_path_counts``: which path the patched forwards took, per call (the start-of-training summary reads it).
"""

from __future__ import annotations

from collections import Counter
from typing import NamedTuple

import torch
import torch.nn as nn

from fastft._log import info_once
from fastft.kernels import autocast_enabled
from fastft.kernels.activation import Activation
from fastft.kernels.lora import AdapterParts, BaseWeight, mlp_from_parts, projection_from_parts, projections_from_parts


# ----------------------------------------------------------------------------------------------------------------
# When fusion is exact
# ----------------------------------------------------------------------------------------------------------------
def _peft_lora_classes() -> tuple[type, ...]:
    from peft.tuners.lora.layer import Linear as LoraLinear

    classes: list[type] = [LoraLinear]
    try:
        from peft.tuners.lora.bnb import Linear4bit as LoraLinear4bit

        classes.append(LoraLinear4bit)
    except ImportError:  # bitsandbytes not installed
        pass
    return tuple(classes)


def _is_bnb_4bit(base: nn.Module) -> bool:
    try:
        import bitsandbytes as bnb
    except ImportError:
        return False
    return isinstance(base, bnb.nn.Linear4bit)


def can_fuse(layer: nn.Module) -> tuple[bool, str]:
    """Whether ``layer`` (a PEFT LoRA ``Linear`` or bitsandbytes ``Linear4bit``) can run fused with identical math.

    Requires: exactly one active adapter, adapters enabled, not merged, lora_dropout == 0 (nn.Identity), no bias
    (base nor lora_bias), no DoRA or other LoRA variant, fan_in_fan_out False, a frozen base weight, base an
    ``nn.Linear`` or an NF4 ``Linear4bit``. Returns (True, "") or (False, the reason).
    """
    if not isinstance(layer, _peft_lora_classes()):
        return False, f"{type(layer).__name__} is not a PEFT LoRA Linear/Linear4bit layer"
    if layer.disable_adapters:
        return False, "adapters are disabled"
    if layer.merged:
        return False, "adapter weights are merged into the base weight"
    active = list(layer.active_adapters)
    if len(active) != 1:
        return False, f"{len(active)} active adapters (fusion handles exactly one)"
    name = active[0]
    if name not in layer.lora_A:
        return False, f"active adapter {name!r} has no LoRA weights on this layer"
    if not isinstance(layer.lora_dropout[name], nn.Identity):
        return False, "lora_dropout > 0 (dropout makes the fused path inexact)"
    if layer.lora_bias.get(name, False):
        return False, "lora_bias is on"
    if name in getattr(layer, "lora_variant", {}) or layer.use_dora.get(name, False):
        return False, "DoRA or another LoRA variant is active"
    if getattr(layer, "fan_in_fan_out", False):
        return False, "fan_in_fan_out (Conv1D) weights"
    base = layer.get_base_layer()
    from fastft.distributed import sharded_reason  # FSDP2 DTensor shards / ZeRO-3 placeholders (outside forward)

    for what, weight in (
        ("base", base.weight),
        ("lora_A", layer.lora_A[name].weight),
        ("lora_B", layer.lora_B[name].weight),
    ):
        sharded = sharded_reason(weight)
        if sharded:
            return False, f"{what}: {sharded}"
    if getattr(base, "bias", None) is not None:
        return False, "the base layer has a bias"
    if base.weight.requires_grad:
        return False, "the base weight requires grad (fused LoRA never computes a base-weight gradient)"
    if not isinstance(layer.lora_A[name], nn.Linear) or not isinstance(layer.lora_B[name], nn.Linear):
        return False, "lora_A/lora_B are not nn.Linear"
    if _is_bnb_4bit(base):
        qs = getattr(base.weight, "quant_state", None)
        if qs is None or qs.quant_type != "nf4":
            return False, "4-bit base is not NF4 (fp4, or not yet quantized)"
        if getattr(qs, "packing_format_for_cpu", False):
            # bitsandbytes rewrote it into its CPU bf16 inference layout (an eval no-grad forward on an AVX512-BF16
            # CPU does that in place): no longer the NF4 format fastft's dequantization reads.
            return False, "bitsandbytes converted this 4-bit weight to its CPU inference layout"
    elif type(base) is not nn.Linear:
        return False, f"base layer {type(base).__name__} is neither nn.Linear nor an NF4 bitsandbytes Linear4bit"
    return True, ""


class _ActiveAdapter(NamedTuple):
    """A fusable PEFT layer's pieces, looked up once: its base layer, whether that is an NF4 ``Linear4bit``, the active
    adapter's name and its lora_A [r, in] / lora_B [out, r] weights."""

    base: nn.Module
    nf4: bool
    name: str
    lora_a: torch.Tensor
    lora_b: torch.Tensor


def _active_adapter(layer: nn.Module) -> _ActiveAdapter:
    base = layer.get_base_layer()
    name = layer.active_adapters[0]
    return _ActiveAdapter(base, _is_bnb_4bit(base), name, layer.lora_A[name].weight, layer.lora_B[name].weight)


class _Verdict:
    """:func:`can_fuse`'s verdict on one PEFT layer (``ok``, ``reason``, and when fusable its :class:`_ActiveAdapter`
    and, for a dense base, its :class:`AdapterParts` with the scaling object they were read from), with everything it
    depends on that can change after construction: the active adapter(s), the disable switch, whether anything is
    merged, and the objects base layer, base weight (and its ``requires_grad``), lora_A/lora_B modules and weights and
    dropout module. A replaced module or weight is a different object; a weight whose ``.data`` is replaced, or
    converted by ``model.to(...)``, is the same Parameter and the parts hold that Parameter, never a stale alias."""

    __slots__ = (
        "active_raw", "disabled", "unmerged", "name", "base", "weight", "weight_grad", "mod_a", "mod_b", "dropout",
        "wa", "wb", "ok", "reason", "active", "parts", "scaling_src",
    )  # fmt: skip


def _new_verdict(layer: nn.Module) -> tuple[_Verdict, bool]:
    """(a fresh verdict, whether it may be cached): not when the layer is not a PEFT LoRA layer, has not exactly one
    active adapter with LoRA weights here, a nested base, or a base weight that is not a plain Parameter (a DTensor
    shard or DeepSpeed parameter is gathered or not depending on when it is read)."""
    v = _Verdict()
    v.ok, v.reason = can_fuse(layer)
    v.active = _active_adapter(layer) if v.ok else None
    v.parts = v.scaling_src = None
    if not isinstance(layer, _peft_lora_classes()):
        return v, False
    d = layer.__dict__
    raw = layer._active_adapter
    active = raw if isinstance(raw, str) else (raw[0] if len(raw) == 1 else None)
    mods = d["_modules"]
    base, lora_a, lora_b, dropout = (mods.get(k) for k in ("base_layer", "lora_A", "lora_B", "lora_dropout"))
    if active is None or base is None or lora_a is None or lora_b is None or dropout is None:
        return v, False
    if "base_layer" in base.__dict__["_modules"]:
        return v, False
    a, b = lora_a.__dict__["_modules"].get(active), lora_b.__dict__["_modules"].get(active)
    w = base.__dict__["_parameters"].get("weight")
    if a is None or b is None or type(w) is not nn.Parameter or hasattr(w, "ds_id"):
        return v, False
    if "weight" not in a.__dict__["_parameters"] or "weight" not in b.__dict__["_parameters"]:
        return v, False
    v.active_raw = raw if isinstance(raw, str) else list(raw)  # a copy: compared by value, never mutated with it
    v.disabled, v.unmerged, v.name = layer._disable_adapters, not layer.merged_adapters, active
    v.base, v.weight, v.weight_grad, v.mod_a, v.mod_b = base, w, w.requires_grad, a, b
    v.wa, v.wb = a.__dict__["_parameters"]["weight"], b.__dict__["_parameters"]["weight"]
    v.dropout = dropout.__dict__["_modules"].get(active)
    return v, True


def _cached_verdict(layer: nn.Module) -> _Verdict | None:
    """The verdict cached on ``layer`` when nothing it depends on changed, else None. Subscripts, attribute reads and
    ``is`` only: decoding calls this per projection per token, and the full :func:`can_fuse` costs ~20 us."""
    d = layer.__dict__
    try:
        v = d["_fastft_fusable"]
        mods = d["_modules"]
        name = v.name
        base, a, b = mods["base_layer"], mods["lora_A"]._modules[name], mods["lora_B"]._modules[name]
        w = base._parameters["weight"]
        same = (
            w is v.weight
            and w.requires_grad is v.weight_grad
            and base is v.base
            and a is v.mod_a
            and b is v.mod_b
            and mods["lora_dropout"]._modules[name] is v.dropout
            and a._parameters["weight"] is v.wa
            and b._parameters["weight"] is v.wb
            and layer._active_adapter == v.active_raw
            and layer._disable_adapters == v.disabled
            and (not layer.merged_adapters) is v.unmerged
            and "base_layer" not in base._modules
            and "ds_id" not in w.__dict__
        )
    except (KeyError, AttributeError):
        return None
    return v if same else None


def _verdict(layer: nn.Module) -> _Verdict:
    """The layer's :class:`_Verdict`: the cached one while valid (:func:`_cached_verdict`), else a fresh one, cached
    on the layer as a plain attribute (not a parameter, buffer or module) when it may be."""
    v = _cached_verdict(layer)
    if v is None:
        v, cacheable = _new_verdict(layer)
        if cacheable:
            layer.__dict__["_fastft_fusable"] = v
    return v


def _fusable(layer: nn.Module) -> tuple[bool, str, _ActiveAdapter | None]:
    """(:func:`can_fuse`'s verdict and reason, and when fusable the layer's :class:`_ActiveAdapter`), cached on the
    layer (:func:`_verdict`)."""
    v = _verdict(layer)
    return v.ok, v.reason, v.active


def _input_ok(layer: nn.Module, x: torch.Tensor, base: nn.Module | None = None, bnb: bool | None = None) -> tuple[bool, str]:
    base = layer.get_base_layer() if base is None else base
    device = x.device.type
    cast_to = torch.get_autocast_dtype(device) if autocast_enabled(device) else None
    if _is_bnb_4bit(base) if bnb is None else bnb:
        cdt = base.compute_dtype
        if cdt is not None and cdt != x.dtype:
            return False, f"Linear4bit compute_dtype {cdt} differs from the input dtype {x.dtype}"
        if cast_to is not None and cast_to != x.dtype:  # a 4-bit base is left to bitsandbytes' own autocast rules
            return False, (
                f"autocast to {cast_to} with a {x.dtype} input and a 4-bit base (fused only when the "
                "model already computes in the autocast dtype)"
            )
        return True, ""
    weight = base.weight.dtype
    if cast_to is None:
        if weight != x.dtype:
            return False, f"base weight dtype {weight} differs from the input dtype {x.dtype}"
        return True, ""
    # Under the Trainer's bf16/fp16 autocast, F.linear computes in the autocast dtype whichever of fp32 / that dtype
    # its input and weight are (an fp32 model's norm output is fp32, its attention output already bf16): the fused
    # path makes the same casts (kernels.lora._cast_for_autocast, and the base weight follows the input inside the fused
    # function).
    allowed = (torch.float32, cast_to)
    if x.dtype not in allowed or weight not in allowed:
        return False, (
            f"autocast to {cast_to} with a {x.dtype} input and a {weight} base (fused only for inputs and "
            f"base weights in float32 or {cast_to})"
        )
    return True, ""


# ----------------------------------------------------------------------------------------------------------------
# Reading the adapter off a PEFT layer
# ----------------------------------------------------------------------------------------------------------------
def _base_weight(base: nn.Module) -> BaseWeight:
    """The frozen weight of a PEFT layer's base: dense, or a bitsandbytes ``Params4bit``'s packed bytes + quant state."""
    weight = base.weight
    qs = getattr(weight, "quant_state", None)
    return BaseWeight(weight.data if qs is not None else weight.detach(), qs)


def _adapter(layer: nn.Module, active: _ActiveAdapter | None = None) -> AdapterParts:
    """The layer's AdapterParts; ``active`` is :func:`_fusable`'s third item when the caller has it (the scaling is
    read live: PEFT's ``scale_layer`` changes it in place)."""
    if active is None:
        active = _active_adapter(layer)
    return AdapterParts(
        _base_weight(active.base), active.lora_a, active.lora_b, float(layer.scaling[active.name]), active.nf4
    )


def _parts(layer: nn.Module, v: _Verdict) -> AdapterParts:
    """A fusable layer's AdapterParts. For a cached verdict with a dense base they are kept on it, holding the base
    Parameter itself, while ``layer.scaling[name]`` is the very float they were read from: PEFT's ``scale_layer`` /
    ``set_scale`` store a new float, so the scaling is still read live; any other scaling type is read every call."""
    s = layer.scaling[v.active.name]
    if s is v.scaling_src:
        return v.parts
    parts = _adapter(layer, v.active)
    if not v.active.nf4 and type(s) is float and layer.__dict__.get("_fastft_fusable") is v:
        v.parts, v.scaling_src = parts._replace(base=BaseWeight(v.weight)), s
        return v.parts
    return parts


#: (kind: "mlp" | "linear", "fused" | "peft") -> calls of the patched LoRA forwards, by the path they took; the
#: start-of-training summary reports step 1's (a layer installed as fused can still fall back per call).
lora_path_counts: Counter[tuple[str, str]] = Counter()


def _check_layers(kind: str, layers: dict[str, nn.Module], x: torch.Tensor) -> list[AdapterParts] | None:
    """Each layer's adapter parts when all of them can run fused on ``x``, else None (reason logged once)."""
    parts = []
    autocast_off = None
    for attr, layer in layers.items():
        v = _verdict(layer)
        ok, reason = v.ok, v.reason
        if ok:
            if autocast_off is None:  # one query for all the layers
                autocast_off = not autocast_enabled(x.device.type)
            # a cached dense verdict (scaling_src set) without autocast needs only the dtype match _input_ok checks
            if not (autocast_off and v.scaling_src is not None and v.weight.dtype == x.dtype):
                ok, reason = _input_ok(layer, x, v.active.base, v.active.nf4)
        if not ok:
            info_once(
                f"fastft: fused LoRA {kind} not used for {attr}: {reason}; running PEFT's path",
                key=f"lora-{kind}-{attr}-{reason}",
            )
            lora_path_counts[(kind, "peft")] += 1
            return None
        parts.append(_parts(layer, v))
    lora_path_counts[(kind, "fused")] += 1
    return parts


# ----------------------------------------------------------------------------------------------------------------
# Entry points for model patching: None (reason logged once) when not fusable
# ----------------------------------------------------------------------------------------------------------------
def fused_mlp_forward(
    mlp: nn.Module, x: torch.Tensor, activation: Activation | str, *, recompute: str = "activation"
) -> torch.Tensor | None:
    """The fused ``down_proj(act(gate_proj(x)) * up_proj(x))`` of ``mlp``, x [..., hidden] -> [..., hidden] in
    x.dtype, or None (reason logged once) when not fusable (see :func:`lora_mlp` for the arguments)."""
    mods = mlp._modules  # submodules without nn.Module.__getattr__ (called per layer per token)
    layers = {k: mods[k] if k in mods else getattr(mlp, k, None) for k in ("gate_proj", "up_proj", "down_proj")}
    if any(v is None for v in layers.values()):
        info_once(
            f"fastft: fused LoRA mlp not used: {type(mlp).__name__} lacks gate_proj/up_proj/down_proj",
            key=f"lora-mlp-attrs-{type(mlp).__name__}",
        )
        return None
    parts = _check_layers("mlp", layers, x)
    if parts is None:
        return None
    return mlp_from_parts(x, parts, activation, recompute)


def fused_linear_forward(layer: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    """One LoRA projection (q, k, v, o, gate_up or down, each on its own) fused: x [..., in] -> [..., out] in x.dtype,
    or None (reason logged once) when the layer cannot run fused with identical math."""
    v = _cached_verdict(layer)
    if (
        v is not None and v.ok and not v.active.nf4 and v.weight.dtype == x.dtype and not autocast_enabled(x.device.type)
    ):  # what _check_layers would find (no autocast: a dense base fuses for an input in its dtype), minus its lookups
        lora_path_counts[("linear", "fused")] += 1
        return projection_from_parts(x, _parts(layer, v))
    parts = _check_layers("linear", {"proj": layer}, x)
    return None if parts is None else projections_from_parts(x, parts)[0]


# ----------------------------------------------------------------------------------------------------------------
# Direct calls: ValueError when a projection cannot be fused
# ----------------------------------------------------------------------------------------------------------------
def _require_fusable(caller: str, layers: dict[str, nn.Module]) -> list[AdapterParts]:
    for attr, layer in layers.items():
        ok, reason = can_fuse(layer)
        if not ok:
            raise ValueError(f"{caller}: {attr} cannot be fused: {reason}")
    return [_adapter(layer) for layer in layers.values()]


def lora_mlp(
    mlp: nn.Module,
    x: torch.Tensor,
    activation: Activation | str = Activation.SILU,
    *,
    recompute: str = "activation",
    inplace_backward: bool = True,
) -> torch.Tensor:
    """Fused ``down_proj(act(gate_proj(x)) * up_proj(x))`` for an MLP whose three projections are PEFT LoRA layers.

    Args:
        mlp: module with ``gate_proj``, ``up_proj``, ``down_proj`` PEFT LoraLayers (each must pass :func:`can_fuse`).
        x: [..., hidden] in the base compute dtype (fp32/bf16/fp16).
        activation: an :class:`Activation` or a name :meth:`Activation.parse` takes ("silu"/"swiglu", "gelu"/"geglu"
            (erf), "gelu_tanh"/"gelu_pytorch_tanh", ...).
        recompute: "activation" (save gate and up, recompute h) or "projections" (save only X and rank-r products,
            recompute gate and up in the backward).
        inplace_backward: with recompute="activation", write dgate/dup over the saved gate/up (two [T, I] fewer
            at the backward's peak). A second backward through a retained graph then raises PyTorch's in-place
            error; pass False to keep the saved tensors intact.
    Returns:
        [..., hidden] in x.dtype.
    Raises:
        ValueError if a projection cannot be fused (use :func:`fused_mlp_forward` for a fall-back-able call).
    """
    layers = {"gate_proj": mlp.gate_proj, "up_proj": mlp.up_proj, "down_proj": mlp.down_proj}
    return mlp_from_parts(x, _require_fusable("lora_mlp", layers), activation, recompute, inplace_backward)


def lora_qkv(attn: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused q/k/v projections of ``attn`` (``q_proj``, ``k_proj``, ``v_proj`` PEFT LoRA layers), X read once.

    x: [..., hidden]. Returns (q, k, v): [..., out_q], [..., out_k], [..., out_v] in x.dtype.
    """
    layers = {"q_proj": attn.q_proj, "k_proj": attn.k_proj, "v_proj": attn.v_proj}
    return projections_from_parts(x, _require_fusable("lora_qkv", layers))


def lora_o(attn: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Fused output projection ``o_proj`` (a PEFT LoRA layer). x: [..., in]; returns [..., out] in x.dtype."""
    return projections_from_parts(x, _require_fusable("lora_o", {"o_proj": attn.o_proj}))[0]
