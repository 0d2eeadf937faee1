"""Fused LoRA math: the MLP block (gate/up/down + SwiGLU/GeGLU) and one or more projections of one input (q/k/v, o),
each one ``torch.autograd.Function`` with a hand-derived backward, over :class:`AdapterParts` (base weight, A, B,
scaling). Reading those parts off PEFT ``LoraLayer``s, and deciding when that is exact, is
``fastft.patches.peft_lora``'s job: nothing here knows PEFT, bitsandbytes' layer classes or sharding.

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

Fusion is used only when it is exact (``fastft.patches.peft_lora.can_fuse``); otherwise its ``fused_*`` entry points
return None after logging the reason once, and the caller runs PEFT's own forward.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

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


def _scaled_(t: torch.Tensor, s: float) -> torch.Tensor:
    """t *= s in place, skipped when s is 1 (lora_alpha == r, FastModel's default): x * 1.0 is x exactly in IEEE
    arithmetic (signed zeros, infinities and NaNs included), so the bits are PEFT's, one pass fewer."""
    return t if s == 1.0 else t.mul_(s)


def _add_lora(y: torch.Tensor, xa: torch.Tensor, B: torch.Tensor, s: float, add_in_base_dtype: bool) -> torch.Tensor:
    """y + (xa B^T) * s with PEFT's rounding. In place when dtypes agree: the same values as PEFT's out-of-place
    ``result + lora_B(lora_A(x)) * scaling``, one [T, out] temporary fewer at the forward's peak."""
    lora = _scaled_(F.linear(xa, B), s)
    if lora.dtype == y.dtype:
        return y.add_(lora)
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
    dB = _scaled_(dyl.t() @ xa, s) if need_b else None
    dA = None
    if need_a or need_x:
        dxa = _scaled_(dyl @ B, s)  # [T, r]
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
        dBd = _scaled_(dyl.t() @ ha_d, scalings[2]) if need_bd else None
        dha = _scaled_(dyl @ Bd, scalings[2])
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
# Entry points over adapter parts (fastft.patches.peft_lora reads them off PEFT layers; the memory model's stand-ins
# build them too)
# ----------------------------------------------------------------------------------------------------------------
class AdapterParts(NamedTuple):
    """One projection's adapter as the fused functions take it."""

    base: BaseWeight  #: the frozen base weight [out, in]
    lora_a: torch.Tensor  #: A [r, in]
    lora_b: torch.Tensor  #: B [out, r]
    scaling: float  #: s: lora_alpha / r (or / sqrt(r) with rsLoRA)
    add_in_base_dtype: bool  #: cast the adapter output to the base output dtype before adding (PEFT's Linear4bit)


def _cast_for_autocast(x: torch.Tensor, parts: list[AdapterParts]) -> tuple[torch.Tensor, list[torch.Tensor], Any]:
    """(x, the adapters flat, a context) for the fused functions.

    Under autocast (the Trainer's bf16/fp16 mixed precision) F.linear casts an fp32 input to the autocast dtype, and
    PEFT's lora_A/lora_B calls run on copies of the fp32 adapters cast to it: the same casts are made here,
    differentiably (the fp32 masters get their gradients through them), and the context turns autocast off inside the
    fused function so nothing is cast twice; the base weight follows the input's dtype inside. Without autocast (fp32
    training, generation): x and the adapters as they are and a no-op context, after one autocast query (decoding
    calls this per projection per token)."""
    adapters = [t for p in parts for t in (p.lora_a, p.lora_b)]
    device = x.device.type
    if not autocast_enabled(device):
        return x, adapters, contextlib.nullcontext()
    dtype = torch.get_autocast_dtype(device)
    if x.dtype == torch.float32 and dtype != x.dtype:
        x = x.to(dtype)
    return x, [a if a.dtype == dtype else a.to(dtype) for a in adapters], torch.autocast(device, enabled=False)


def mlp_from_parts(
    x: torch.Tensor,
    parts: list[AdapterParts],
    activation: Activation | str,
    recompute: str = "activation",
    inplace_backward: bool = True,
) -> torch.Tensor:
    """``LoRAMLP`` over (gate, up, down) adapter parts; x [..., hidden] -> [..., hidden] in x.dtype.

    activation: an :class:`Activation` or any name :meth:`Activation.parse` takes ("silu"/"swiglu", "gelu"/"geglu"
    (erf), "gelu_tanh"/"gelu_pytorch_tanh", ...). recompute: "activation"
    (save gate and up, recompute h) or "projections" (save only X and rank-r products, recompute gate and up in the
    backward). inplace_backward: with recompute="activation", write dgate/dup over the saved gate/up (a second
    backward through a retained graph then raises PyTorch's in-place error).
    """
    if recompute not in ("activation", "projections"):
        raise ValueError(f"recompute must be 'activation' or 'projections', got {recompute!r}")
    if len(parts) != 3:
        raise ValueError(f"mlp_from_parts takes (gate, up, down) parts, got {len(parts)}")
    act = Activation.parse(activation)
    x, adapters, no_autocast = _cast_for_autocast(x, parts)
    bases = tuple(p.base for p in parts)
    scalings = tuple(p.scaling for p in parts)
    add = tuple(p.add_in_base_dtype for p in parts)
    with no_autocast:
        if not needs_grad(x, *adapters):  # no graph to record (generation, eval): the same math, no Function
            return _mlp_forward(x, bases, scalings, add, act, recompute, tuple(adapters))[0]
        return LoRAMLP.apply(x, bases, scalings, add, act, recompute, bool(inplace_backward), *adapters)


def projection_from_parts(x: torch.Tensor, p: AdapterParts) -> torch.Tensor:
    """``projections_from_parts(x, [p])[0]`` for a caller that found autocast off on x's device: one projection,
    x [..., in] -> [..., out] in x.dtype, the same math without the autocast query and per-call lists (decoding runs
    it per projection per token)."""
    A, B = p.lora_a, p.lora_b
    if torch.is_grad_enabled() and (x.requires_grad or A.requires_grad or B.requires_grad):
        return LoRAProjections.apply(x, (p.base,), (p.scaling,), (p.add_in_base_dtype,), A, B)[0]
    y, _ = _proj_forward(_rows(x), p.base, A, B, p.scaling, p.add_in_base_dtype)
    return y.view(*x.shape[:-1], y.shape[-1])


def projections_from_parts(x: torch.Tensor, parts: list[AdapterParts]) -> tuple[torch.Tensor, ...]:
    """``LoRAProjections`` over one adapter's parts per projection of x; one [..., out_p] per projection."""
    x, flat, no_autocast = _cast_for_autocast(x, parts)
    if len(parts) == 1 and not needs_grad(x, *flat):  # one projection, no graph (decoding): _projections_forward's
        p = parts[0]  # math for one projection, without its tuples and lists (called per projection per token)
        with no_autocast:
            y, _ = _proj_forward(_rows(x), p.base, flat[0], flat[1], p.scaling, p.add_in_base_dtype)
        return (y.view(*x.shape[:-1], y.shape[-1]),)
    bases = tuple(p.base for p in parts)
    scalings = tuple(p.scaling for p in parts)
    add = tuple(p.add_in_base_dtype for p in parts)
    with no_autocast:
        if not needs_grad(x, *flat):  # no graph to record (generation, eval): the same math, no Function
            return _projections_forward(x, bases, scalings, add, tuple(flat))[0]
        return LoRAProjections.apply(x, bases, scalings, add, *flat)
