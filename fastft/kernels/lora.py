"""Fused LoRA for PEFT ``LoraLayer``s: the MLP block (gate/up/down + SwiGLU/GeGLU), the q/k/v projections, and the
output projection, each one ``torch.autograd.Function`` with a hand-derived backward.

Why: in PEFT's eager path every projection is three autograd nodes (base linear, lora_A, lora_B) plus a scale and an
add, and the gated MLP keeps four [tokens, intermediate] activations alive for backward (gate, act(gate), up, and
the product h, which lora_A of down_proj saves). On a T4 those dominate QLoRA memory, and dequantizing the 4-bit base
weights dominates time.

Math, per projection p with frozen base W_p [out, in], adapter A_p [r, in], B_p [out, r], scaling s_p
(lora_alpha / r, or lora_alpha / sqrt(r) with rsLoRA):
    y_p = X W_p^T + s_p (X A_p^T) B_p^T
backward, with a_p = X A_p^T [T, r] saved from the forward and G = dL/dy_p:
    dB_p = s_p G^T a_p,   da_p = s_p G B_p,   dA_p = da_p^T X,   dX += G W_p + da_p A_p
The base weight never gets a gradient. Scaling is folded into the rank-r products (r << out) instead of scaling G.

Saved for backward (the memory trade)
    qkv / o:  X (the caller keeps it alive anyway: it is the normed hidden state / attention output) and the small
              a_p = X A_p^T, [T, r] each. PEFT saves the same plus its graph of five nodes per projection.
    mlp, recompute="activation" (default): X, gate and up pre-activations [T, I] each, and the rank-r products.
              h = act(gate) * up is recomputed in the backward by the activation op, a row chunk at a time (only
              dA_down needs it), and the activation backward writes dgate/dup over the saved gate/up
              (``inplace_backward``). PEFT saves gate, act(gate), up and h: four [T, I]. Cost: one extra
              elementwise pass. Half of PEFT's [T, I] activations (X, saved by both, on top).
    mlp, recompute="projections": X and the rank-r products only; gate and up are recomputed in the backward from X
              (two extra [T, d] x [d, I] matmuls, and two dequantizations for NF4): ~+22% MLP FLOPs for saving
              two more [T, I] per layer. Worth it when activations, not compute, limit the batch.
NF4 bases (bitsandbytes ``Linear4bit`` holding ``Params4bit``): the weight is dequantized with
:func:`fastft.kernels.nf4.dequantize_nf4` into a buffer reused across calls of the same shape, once in the forward
and again in the backward (it is never saved).

Numerics follow PEFT: the base matmul runs in X's dtype, the adapter path in the adapter's dtype (X is cast to it, as
PEFT does), and the adapter output is added to the base output in the promoted dtype then cast back (PEFT ``Linear``)
or first cast to the base output dtype (PEFT's bitsandbytes ``Linear4bit``). The forward uses the same ops in the
same order as PEFT; the backward differs by rounding only (scaling folded into rank-r products).

Under autocast (what the Trainer's bf16=True / fp16=True turns on), PEFT's adapter matmuls run on copies of the fp32
adapters cast to the autocast dtype; the fused functions make the same (differentiable) casts and run with autocast
off inside, provided the input is already in the autocast dtype (a bf16/fp16 model); otherwise they fall back.

Fusion is used only when it is exact (see :func:`can_fuse`); otherwise the ``fused_*`` entry points return None after
logging the reason once, and the caller runs PEFT's own forward.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections import Counter
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from fastft._log import info_once
from fastft.kernels._launch import autocast_enabled, needs_grad
from fastft.kernels.activation import Activation
from fastft.kernels.glu import glu_backward_op, glu_op
from fastft.kernels.nf4 import dequantize_nf4

# ----------------------------------------------------------------------------------------------------------------
# Base weights: dense, or NF4 dequantized on the fly into a reused buffer
# ----------------------------------------------------------------------------------------------------------------
_buffers: dict[tuple, torch.Tensor] = {}


def _is_fake_tensor(t: torch.Tensor) -> bool:
    from torch._subclasses.fake_tensor import FakeTensor

    return isinstance(t, FakeTensor)


def _dequant_buffer(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """One buffer per (device, dtype, numel), shared by every layer: each dequantized weight is consumed by the very
    next matmul, so q, k, v, gate, up of all layers reuse the same memory (stream order keeps GPU use safe)."""
    numel = 1
    for s in shape:
        numel *= s
    key = (device, dtype, numel)
    buf = _buffers.get(key)
    if buf is None:
        buf = _buffers[key] = torch.empty(numel, dtype=dtype, device=device)
    return buf.view(shape)


def clear_buffers() -> None:
    """Free the dequantization buffers (e.g. before saving memory for generation)."""
    _buffers.clear()


@dataclasses.dataclass(frozen=True)
class BaseWeight:
    """A frozen base weight [out, in]: a dense tensor, or NF4 ``packed`` bytes with their ``quant_state``."""

    weight: torch.Tensor
    quant_state: Any = None

    @property
    def is_nf4(self) -> bool:
        return self.quant_state is not None

    @property
    def out_features(self) -> int:
        return int(self.quant_state.shape[0]) if self.is_nf4 else self.weight.shape[0]

    def dense(self, dtype: torch.dtype) -> torch.Tensor:
        """The weight in ``dtype``, [out, in]. For NF4 a view of a shared buffer: valid until the next dequantize."""
        if not self.is_nf4:
            return self.weight if self.weight.dtype == dtype else self.weight.to(dtype)
        qs = self.quant_state
        shape = tuple(int(s) for s in qs.shape)
        if _is_fake_tensor(self.weight):  # a torch.compile trace: no buffer kept across traces
            w = dequantize_nf4(self.weight, qs)
        else:
            w = dequantize_nf4(self.weight, qs, out=_dequant_buffer(shape, qs.dtype, self.weight.device))
        return w if w.dtype == dtype else w.to(dtype)


def _base_of(layer: nn.Module) -> BaseWeight:
    """The frozen weight of ``layer``'s base (``layer`` a PEFT LoRA layer, or already its base layer)."""
    base = layer.get_base_layer() if hasattr(layer, "get_base_layer") else layer
    weight = base.weight
    qs = getattr(weight, "quant_state", None)
    return BaseWeight(weight.data if qs is not None else weight.detach(), qs)


# ----------------------------------------------------------------------------------------------------------------
# Shared forward/backward pieces for one projection
# ----------------------------------------------------------------------------------------------------------------
def _proj_forward(
    x2: torch.Tensor, base: BaseWeight, A: torch.Tensor, B: torch.Tensor, s: float, add_in_base_dtype: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """y = X W^T + s (X A^T) B^T with PEFT's casting; returns (y in x2.dtype, a = X A^T in A.dtype)."""
    y = F.linear(x2, base.dense(x2.dtype))
    xa = F.linear(x2 if x2.dtype == A.dtype else x2.to(A.dtype), A)
    return _add_lora(y, xa, B, s, add_in_base_dtype), xa


def _add_lora(y: torch.Tensor, xa: torch.Tensor, B: torch.Tensor, s: float, add_in_base_dtype: bool) -> torch.Tensor:
    """y + (xa B^T) * s with PEFT's rounding. In place when dtypes agree: the same values as PEFT's out-of-place
    ``result + lora_B(lora_A(x)) * scaling``, one [T, out] temporary fewer at the forward's peak."""
    lora = F.linear(xa, B)
    if lora.dtype == y.dtype:
        return y.add_(lora.mul_(s))
    lora = lora * s
    if add_in_base_dtype:  # PEFT's bitsandbytes Linear4bit: adapter output cast to the base output dtype first
        return y + lora.to(y.dtype)
    return (y + lora).to(y.dtype)  # PEFT's Linear: add in the promoted dtype, cast back


def _proj_backward(
    dy: torch.Tensor,
    x2: torch.Tensor,
    xa: torch.Tensor,
    base: BaseWeight,
    A: torch.Tensor,
    B: torch.Tensor,
    s: float,
    dx: torch.Tensor | None,
    need_x: bool,
    need_a: bool,
    need_b: bool,
):
    """Grads of one projection; accumulates dX into ``dx`` (allocated when None). Returns (dx, dA, dB)."""
    dyl = dy if dy.dtype == B.dtype else dy.to(B.dtype)
    dB = (dyl.t() @ xa).mul_(s) if need_b else None
    dA = None
    if need_a or need_x:
        dxa = (dyl @ B).mul_(s)  # [T, r]
        if need_a:
            dA = dxa.t() @ (x2 if x2.dtype == A.dtype else x2.to(A.dtype))
        if need_x:
            w = base.dense(dy.dtype)
            if dx is None:
                dx = dy @ w
            else:
                dx.addmm_(dy, w)
            if A.dtype == dx.dtype:
                dx.addmm_(dxa, A)
            else:
                dx.add_((dxa @ A).to(dx.dtype))
    return dx, dA, dB


def _rows(x: torch.Tensor) -> torch.Tensor:
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.is_contiguous() else x2.contiguous()


# ----------------------------------------------------------------------------------------------------------------
# Autograd functions
# ----------------------------------------------------------------------------------------------------------------
def _projections_forward(
    x: torch.Tensor, bases: tuple, scalings: tuple, add_in_base_dtype: tuple, adapters: tuple
) -> tuple[tuple[torch.Tensor, ...], torch.Tensor, list[torch.Tensor]]:
    """LoRAProjections' forward math: (one [..., out_p] per projection, X as rows, each X A_p^T)."""
    x2 = _rows(x)
    outs, xas = [], []
    for i, base in enumerate(bases):
        A, B = adapters[2 * i], adapters[2 * i + 1]
        y, xa = _proj_forward(x2, base, A, B, scalings[i], add_in_base_dtype[i])
        outs.append(y.view(*x.shape[:-1], y.shape[-1]))
        xas.append(xa)
    return tuple(outs), x2, xas


def _mlp_forward(
    x: torch.Tensor, bases: tuple, scalings: tuple, add: tuple, activation: Activation, recompute: str, adapters: tuple
) -> tuple[torch.Tensor, tuple]:
    """LoRAMLP's forward math: (y [..., hidden], the tensors its backward saves)."""
    Ag, Bg, Au, Bu, Ad, Bd = adapters
    x2 = _rows(x)
    gate, xa_g = _proj_forward(x2, bases[0], Ag, Bg, scalings[0], add[0])
    up, xa_u = _proj_forward(x2, bases[1], Au, Bu, scalings[1], add[1])
    h = glu_op(gate, up, activation)
    if recompute == "projections":
        del gate, up  # freed before the down projection: the forward peak is gate + up + h, not more
    y, ha_d = _proj_forward(h, bases[2], Ad, Bd, scalings[2], add[2])
    del h  # recomputed in the backward
    saved = (x2, xa_g, xa_u, ha_d, *adapters) + ((gate, up) if recompute == "activation" else ())
    return y.view(*x.shape[:-1], y.shape[-1]), saved


class LoRAProjections(torch.autograd.Function):
    """Several LoRA projections of one input X (q/k/v: three; o: one), X read once. Saves X and each X A_p^T."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, bases: tuple, scalings: tuple, add_in_base_dtype: tuple, *adapters):
        outs, x2, xas = _projections_forward(x, bases, scalings, add_in_base_dtype, adapters)
        ctx.save_for_backward(x2, *adapters, *xas)
        ctx.bases, ctx.scalings, ctx.x_shape = bases, scalings, x.shape
        return tuple(outs)

    @staticmethod
    def backward(ctx, *dys):
        n = len(ctx.bases)
        saved = ctx.saved_tensors
        x2, adapters, xas = saved[0], saved[1 : 1 + 2 * n], saved[1 + 2 * n :]
        need_x = ctx.needs_input_grad[0]
        dx, grads = None, []
        for i, base in enumerate(ctx.bases):
            A, B = adapters[2 * i], adapters[2 * i + 1]
            need_a, need_b = ctx.needs_input_grad[4 + 2 * i], ctx.needs_input_grad[5 + 2 * i]
            dy = dys[i]
            if dy is None:  # output unused: contributes nothing
                grads += [None, None]
                continue
            dx, dA, dB = _proj_backward(_rows(dy), x2, xas[i], base, A, B, ctx.scalings[i], dx, need_x, need_a, need_b)
            grads += [dA, dB]
        if need_x:
            dx = dx.view(ctx.x_shape) if dx is not None else torch.zeros(ctx.x_shape, dtype=x2.dtype, device=x2.device)
        return (dx, None, None, None, *grads)


class LoRAMLP(torch.autograd.Function):
    """down(act(gate(X)) * up(X)) with LoRA on all three projections. See the module docstring for what is saved."""

    @staticmethod
    def forward(
        ctx,
        x: torch.Tensor,
        bases: tuple,
        scalings: tuple,
        add_in_base_dtype: tuple,
        activation: Activation,
        recompute: str,
        inplace_backward: bool,
        Ag,
        Bg,
        Au,
        Bu,
        Ad,
        Bd,
    ):
        y, saved = _mlp_forward(x, bases, scalings, add_in_base_dtype, activation, recompute, (Ag, Bg, Au, Bu, Ad, Bd))
        ctx.save_for_backward(*saved)
        del saved
        ctx.bases, ctx.scalings, ctx.add = bases, scalings, add_in_base_dtype
        ctx.activation, ctx.recompute, ctx.x_shape = activation, recompute, x.shape
        ctx.inplace_backward = inplace_backward
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        saved = ctx.saved_tensors
        x2, xa_g, xa_u, ha_d, Ag, Bg, Au, Bu, Ad, Bd = saved[:10]
        bases, scalings = ctx.bases, ctx.scalings
        need = ctx.needs_input_grad
        need_x = need[0]
        need_ag, need_bg, need_au, need_bu, need_ad, need_bd = need[7:13]
        dy2 = _rows(dy)
        if ctx.recompute == "activation":
            gate, up = saved[10], saved[11]
            # The saved gate/up are ours alone; overwriting them bumps their version counters, so a second backward
            # through a retained graph raises PyTorch's in-place error instead of reading garbage.
            inplace = ctx.inplace_backward
        else:
            # Recompute the pre-activations exactly as the forward did (same ops, same order: same bits).
            gate = _recompute_proj(x2, xa_g, bases[0], Bg, scalings[0], ctx.add[0])
            up = _recompute_proj(x2, xa_u, bases[1], Bu, scalings[1], ctx.add[1])
            inplace = True
        # down projection: dh = dY W_d + s_d (dY B_d) A_d, and dA_d needs h = act(gate) * up, recomputed.
        dyl = dy2 if dy2.dtype == Bd.dtype else dy2.to(Bd.dtype)
        dBd = (dyl.t() @ ha_d).mul_(scalings[2]) if need_bd else None
        dha = (dyl @ Bd).mul_(scalings[2])
        dAd = _grad_a_down(dha, gate, up, ctx.activation, Ad.dtype) if need_ad else None
        dh = dy2 @ bases[2].dense(dy2.dtype)
        if Ad.dtype == dh.dtype:
            dh.addmm_(dha, Ad)
        else:
            dh.add_((dha @ Ad).to(dh.dtype))
        dgate, dup = glu_backward_op(dh, gate, up, ctx.activation, inplace)
        del dh, gate, up
        dx, dAg, dBg = _proj_backward(dgate, x2, xa_g, bases[0], Ag, Bg, scalings[0], None, need_x, need_ag, need_bg)
        del dgate
        dx, dAu, dBu = _proj_backward(dup, x2, xa_u, bases[1], Au, Bu, scalings[1], dx, need_x, need_au, need_bu)
        if need_x:
            dx = dx.view(ctx.x_shape)
        return (dx, None, None, None, None, None, None, dAg, dBg, dAu, dBu, dAd, dBd)


def _recompute_proj(x2, xa, base: BaseWeight, B, s, add_in_base_dtype) -> torch.Tensor:
    return _add_lora(F.linear(x2, base.dense(x2.dtype)), xa, B, s, add_in_base_dtype)


#: Rows of the recomputed activation h materialized at once in the backward (dA_down = dha^T h needs h, nothing
#: else does), so the backward never holds a full [T, I] h next to gate, up and dh.
_H_CHUNK_ELEMENTS = 1 << 20


def _grad_a_down(
    dha: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, activation: Activation, a_dtype: torch.dtype
) -> torch.Tensor:
    n_rows, n_cols = gate.shape
    step = max(1, _H_CHUNK_ELEMENTS // max(n_cols, 1))
    dA = None
    for r in range(0, n_rows, step):
        h = glu_op(gate[r : r + step], up[r : r + step], activation)
        part = dha[r : r + step].t() @ (h if h.dtype == a_dtype else h.to(a_dtype))
        dA = part if dA is None else dA.add_(part)
    return dA


# ----------------------------------------------------------------------------------------------------------------
# PEFT glue: when fusion is exact, and reading the adapters off LoraLayers
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


def _state_key(layer: nn.Module) -> tuple | None:
    """What :func:`can_fuse`'s verdict on a PEFT layer depends on that can change after construction, read off
    instance dicts only (no ``nn.Module.__getattr__``): adapters disabled / merged / active, and the identity and
    ``requires_grad`` of the base and adapter weights (a replaced module or weight changes its id). None when the
    verdict must not be cached: not exactly one active adapter, or a weight that is not a plain Parameter (a DTensor
    shard or DeepSpeed parameter is gathered or not depending on when it is read)."""
    d = layer.__dict__
    active = d.get("_active_adapter", "default")
    if not isinstance(active, str):
        if len(active) != 1:
            return None
        active = active[0]
    mods = d["_modules"]
    base, lora_a, lora_b = mods.get("base_layer"), mods.get("lora_A"), mods.get("lora_B")
    if base is None or lora_a is None or lora_b is None or "base_layer" in base.__dict__["_modules"]:
        return None
    a, b = lora_a.__dict__["_modules"].get(active), lora_b.__dict__["_modules"].get(active)
    w = base.__dict__["_parameters"].get("weight")
    if a is None or b is None or type(w) is not nn.Parameter or hasattr(w, "ds_id"):
        return None
    wa, wb = a.__dict__["_parameters"].get("weight"), b.__dict__["_parameters"].get("weight")
    return (
        d.get("_disable_adapters", False),
        len(d.get("merged_adapters", ())),
        active,
        id(base),
        id(w),
        w.requires_grad,
        id(a),
        id(b),
        id(wa),
        id(wb),
        id(mods["lora_dropout"].__dict__["_modules"].get(active)),
    )


def _fusable(layer: nn.Module) -> tuple[bool, str, tuple | None]:
    """(:func:`can_fuse`'s verdict and reason, and when fusable (base layer, is it an NF4 ``Linear4bit``, active
    adapter name, lora_A weight, lora_B weight)), cached on the layer while :func:`_state_key` is unchanged: the full
    check costs ~20 us of attribute lookups per projection per call, more than a small model's decoding matmuls."""
    key = _state_key(layer)
    cached = layer.__dict__.get("_fastft_fusable")
    if key is not None and cached is not None and cached[0] == key:
        return cached[1]
    ok, reason = can_fuse(layer)
    parts = None
    if ok:
        base = layer.get_base_layer()
        name = layer.active_adapters[0]
        parts = (base, _is_bnb_4bit(base), name, layer.lora_A[name].weight, layer.lora_B[name].weight)
    info = (ok, reason, parts)
    if key is not None:
        layer.__dict__["_fastft_fusable"] = (key, info)  # a plain attribute: not a parameter, buffer or module
    return info


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
    # path makes the same casts (_autocast_input, and the base weight follows the input inside the fused function).
    allowed = (torch.float32, cast_to)
    if x.dtype not in allowed or weight not in allowed:
        return False, (
            f"autocast to {cast_to} with a {x.dtype} input and a {weight} base (fused only for inputs and "
            f"base weights in float32 or {cast_to})"
        )
    return True, ""


def _autocast_input(x: torch.Tensor) -> torch.Tensor:
    """Under autocast, an fp32 input cast (differentiably) to the autocast dtype, as autocast casts F.linear's input;
    the base weight follows the input's dtype inside the fused function, as autocast casts the weight."""
    device = x.device.type
    if autocast_enabled(device) and x.dtype == torch.float32 and torch.get_autocast_dtype(device) != x.dtype:
        return x.to(torch.get_autocast_dtype(device))
    return x


def _autocast_adapters(x: torch.Tensor, adapters: list[torch.Tensor]) -> tuple[list[torch.Tensor], Any]:
    """Under autocast (the Trainer's bf16/fp16 mixed precision), PEFT's lora_A/lora_B F.linear calls run on copies
    of the fp32 adapters cast to the autocast dtype. Do the same casts here, differentiably (the fp32 masters get
    their gradients through them), and return a context that turns autocast off inside the fused function so
    nothing is cast twice. Without autocast: the adapters as they are, and a no-op context."""
    device = x.device.type
    if not autocast_enabled(device):
        return adapters, contextlib.nullcontext()
    dtype = torch.get_autocast_dtype(device)
    cast = [a if a.dtype == dtype else a.to(dtype) for a in adapters]
    return cast, torch.autocast(device, enabled=False)


def _adapter(layer: nn.Module, fusable: tuple | None = None) -> AdapterParts:
    """The layer's AdapterParts; ``fusable`` is :func:`_fusable`'s third item when the caller has it (the scaling is
    read live: PEFT's ``scale_layer`` changes it in place)."""
    if fusable is None:
        base = layer.get_base_layer()
        name = layer.active_adapters[0]
        fusable = (base, _is_bnb_4bit(base), name, layer.lora_A[name].weight, layer.lora_B[name].weight)
    base, bnb, name, a, b = fusable
    return (_base_of(base), a, b, float(layer.scaling[name]), bnb)


#: (kind: "mlp" | "qkv" | "o" | "linear", "fused" | "peft") -> calls of the patched LoRA forwards, by the path they
#: took; the start-of-training summary reports step 1's (a layer installed as fused can still fall back per call).
lora_path_counts: Counter[tuple[str, str]] = Counter()


def _check_layers(kind: str, layers: dict[str, nn.Module], x: torch.Tensor) -> list[AdapterParts] | None:
    """Each layer's adapter parts when all of them can run fused on ``x``, else None (reason logged once)."""
    parts = []
    for attr, layer in layers.items():
        ok, reason, fusable = _fusable(layer)
        if ok:
            ok, reason = _input_ok(layer, x, fusable[0], fusable[1])
        if not ok:
            info_once(
                f"fastft: fused LoRA {kind} not used for {attr}: {reason}; running PEFT's path",
                key=f"lora-{kind}-{attr}-{reason}",
            )
            lora_path_counts[(kind, "peft")] += 1
            return None
        parts.append(_adapter(layer, fusable))
    lora_path_counts[(kind, "fused")] += 1
    return parts


# ----------------------------------------------------------------------------------------------------------------
# Public functions
# ----------------------------------------------------------------------------------------------------------------
def lora_mlp(
    mlp: nn.Module,
    x: torch.Tensor,
    activation: str = "silu",
    *,
    recompute: str = "activation",
    inplace_backward: bool = True,
) -> torch.Tensor:
    """Fused ``down_proj(act(gate_proj(x)) * up_proj(x))`` for an MLP whose three projections are PEFT LoRA layers.

    Args:
        mlp: module with ``gate_proj``, ``up_proj``, ``down_proj`` PEFT LoraLayers (each must pass :func:`can_fuse`).
        x: [..., hidden] in the base compute dtype (fp32/bf16/fp16).
        activation: "silu"/"swiglu", "gelu"/"geglu" (erf) or "gelu_tanh"/"gelu_pytorch_tanh".
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
    for attr, layer in layers.items():
        ok, reason = can_fuse(layer)
        if not ok:
            raise ValueError(f"lora_mlp: {attr} cannot be fused: {reason}")
    return _lora_mlp(layers, x, activation, recompute, inplace_backward)


#: One projection's adapter as the fused functions take it: (base weight, A [r, in], B [out, r], scaling,
#: add_in_base_dtype). ``_adapter`` reads it off a PEFT layer; the memory model builds it from its stand-ins.
AdapterParts = tuple[BaseWeight, torch.Tensor, torch.Tensor, float, bool]


def mlp_from_parts(
    x: torch.Tensor,
    parts: list[AdapterParts],
    activation: Activation | str,
    recompute: str = "activation",
    inplace_backward: bool = True,
) -> torch.Tensor:
    """``LoRAMLP`` over (gate, up, down) adapter parts; x [..., hidden] -> [..., hidden] (see :func:`lora_mlp`)."""
    if recompute not in ("activation", "projections"):
        raise ValueError(f"recompute must be 'activation' or 'projections', got {recompute!r}")
    act = Activation.parse(activation)
    g, u, d = parts
    x = _autocast_input(x)
    adapters, no_autocast = _autocast_adapters(x, [g[1], g[2], u[1], u[2], d[1], d[2]])
    with no_autocast:
        if not needs_grad(x, *adapters):  # no graph to record (generation, eval): the same math, no Function
            return _mlp_forward(
                x, (g[0], u[0], d[0]), (g[3], u[3], d[3]), (g[4], u[4], d[4]), act, recompute, tuple(adapters)
            )[0]
        return LoRAMLP.apply(
            x,
            (g[0], u[0], d[0]),
            (g[3], u[3], d[3]),
            (g[4], u[4], d[4]),
            act,
            recompute,
            bool(inplace_backward),
            *adapters,
        )


def projections_from_parts(x: torch.Tensor, parts: list[AdapterParts]) -> tuple[torch.Tensor, ...]:
    """``LoRAProjections`` over one adapter's parts per projection of x; one [..., out_p] per projection."""
    x = _autocast_input(x)
    flat, no_autocast = _autocast_adapters(x, [t for a in parts for t in (a[1], a[2])])
    with no_autocast:
        if not needs_grad(x, *flat):  # no graph to record (generation, eval): the same math, no Function
            return _projections_forward(
                x, tuple(a[0] for a in parts), tuple(a[3] for a in parts), tuple(a[4] for a in parts), tuple(flat)
            )[0]
        return LoRAProjections.apply(
            x, tuple(a[0] for a in parts), tuple(a[3] for a in parts), tuple(a[4] for a in parts), *flat
        )


def _lora_mlp(layers, x, activation, recompute, inplace_backward=True):
    return mlp_from_parts(
        x, [_adapter(layers[k]) for k in ("gate_proj", "up_proj", "down_proj")], activation, recompute, inplace_backward
    )


def _lora_projections(layers: list[nn.Module], x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return projections_from_parts(x, [_adapter(layer) for layer in layers])


def lora_qkv(attn: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused q/k/v projections of ``attn`` (``q_proj``, ``k_proj``, ``v_proj`` PEFT LoRA layers), X read once.

    x: [..., hidden]. Returns (q, k, v): [..., out_q], [..., out_k], [..., out_v] in x.dtype.
    """
    layers = [attn.q_proj, attn.k_proj, attn.v_proj]
    for name, layer in zip(("q_proj", "k_proj", "v_proj"), layers, strict=True):
        ok, reason = can_fuse(layer)
        if not ok:
            raise ValueError(f"lora_qkv: {name} cannot be fused: {reason}")
    return _lora_projections(layers, x)


def lora_o(attn: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Fused output projection ``o_proj`` (a PEFT LoRA layer). x: [..., in]; returns [..., out] in x.dtype."""
    ok, reason = can_fuse(attn.o_proj)
    if not ok:
        raise ValueError(f"lora_o: o_proj cannot be fused: {reason}")
    return _lora_projections([attn.o_proj], x)[0]


def fused_mlp_forward(
    mlp: nn.Module, x: torch.Tensor, activation: str, *, recompute: str = "activation"
) -> torch.Tensor | None:
    """Entry point for model patching: the fused MLP output, or None (reason logged once) when not fusable."""
    layers = {k: getattr(mlp, k, None) for k in ("gate_proj", "up_proj", "down_proj")}
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


def fused_qkv(attn: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """Entry point for model patching: (q, k, v) from the fused projections, or None (reason logged once)."""
    layers = {k: getattr(attn, k, None) for k in ("q_proj", "k_proj", "v_proj")}
    if any(v is None for v in layers.values()):
        info_once(
            f"fastft: fused LoRA qkv not used: {type(attn).__name__} lacks q_proj/k_proj/v_proj",
            key=f"lora-qkv-attrs-{type(attn).__name__}",
        )
        return None
    parts = _check_layers("qkv", layers, x)
    return None if parts is None else projections_from_parts(x, parts)


def fused_o(attn: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    """Entry point for model patching: the fused o_proj output, or None (reason logged once)."""
    layer = getattr(attn, "o_proj", None)
    if layer is None:
        info_once(
            f"fastft: fused LoRA o not used: {type(attn).__name__} lacks o_proj", key=f"lora-o-attrs-{type(attn).__name__}"
        )
        return None
    parts = _check_layers("o", {"o_proj": layer}, x)
    return None if parts is None else projections_from_parts(x, parts)[0]


def fused_linear_forward(layer: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    """Entry point for patching one LoRA projection (q, k, v or o on its own): the fused output, or None (reason
    logged once) when the layer cannot run fused with identical math."""
    parts = _check_layers("linear", {"proj": layer}, x)
    return None if parts is None else projections_from_parts(x, parts)[0]
