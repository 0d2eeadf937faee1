"""The step model: one real training step (forward, loss, backward, optimizer step) run on meta tensors, measured.

Nothing here is a formula for activation memory. We build the actual transformers model on the ``meta`` device, run
the actual training step, and let :class:`~fastft.memory.LiveBytesTracker` count every storage the dispatcher
allocates, with the few pieces a GPU run does differently swapped for stand-ins that allocate what the GPU allocates:

* attention: a registered ``AttentionInterface`` implementation, ``"fastft_meta_sdpa_free"`` (a name containing
  "flash" makes transformers look for a flash-attn kernel package), modelling FlashAttention-2:
  the forward allocates the output and a fp32 logsumexp only (O(T)), the backward dq/dk/dv only. It is an opaque custom
  op (namespace ``fastft_memmodel``, not ``fastft``), so the tracker charges its outputs and not the workspace of the
  reference math used when it runs on real CPU tensors. (SDPA on meta would take the math path and charge [T, T].)
* 4-bit base weights: :class:`Linear4bit` holds bitsandbytes' storage as buffers -- packed uint8 [numel/2, 1], absmax
  fp32 per 64 values, or with double quantization uint8 absmax + fp32 per 256 of those + a 256-entry code -- and its
  forward/backward dequantize a temporary [out, in] weight (counted, then freed), as ``bnb.matmul_4bit`` does.
* LoRA: :class:`LoraLinear` performs PEFT's sequence of ops (``result = base(x)``, the defensive ``clone()`` PEFT
  makes for 4-bit layers, ``lora_B(lora_A(x)) * scaling``, add) with fp32 adapter weights used in the compute dtype,
  as under the trainer's bf16 autocast (autocast itself does not run on meta, so the casts are explicit).
* gradient checkpointing: :class:`CheckpointedLayer` wraps each decoder layer (forward without a graph, input saved,
  layer recomputed in backward) -- our own recompute because some torch.utils.checkpoint paths call ``.item()``.
  With ``offload=True`` the saved input is copied to host memory: the copy is made with the tracker disabled and
  counted in :class:`HostLedger` instead, and copied back (a counted device allocation) for the recompute.
* fastft's variant: ``fastft.patches.architectures.patch_model`` (fused RMSNorm / RoPE / SwiGLU-GeGLU, optionally
  the tiled MLP) on the meta model -- their custom ops run their fake impls -- plus fastft's fused LoRA (the real
  ``LoRAMLP`` / ``LoRAProjections`` autograd functions of fastft.kernels.lora over the stand-in layers, NF4
  dequantized into its shared buffers, adapters cast to the compute dtype as under the Trainer's autocast), a
  chunked linear cross-entropy (:func:`chunked_linear_cross_entropy`) in place of full logits, and optionally the
  input embedding in host memory.
* optimizer: torch AdamW (foreach, as on CUDA) with states created before the measured step (steady state: states
  live through forward and backward; gradients are set to None after each step, as the Trainer does);
  ``adamw_8bit`` is bitsandbytes' layout (two uint8 states + fp32 absmax per 256 values for tensors of >= 4096
  elements, fp32 otherwise) with an in-place update, which is what its fused kernel does.

The same code runs on real CPU tensors (``device="cpu"``, tiny configs) and is validated against the tracker's
measured peak there (tests/memory/test_validation.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import _disable_current_modes

from fastft.memory.tracker import LiveBytesTracker

ATTENTION_NAME = "fastft_meta_sdpa_free"
QUANT_BLOCK = 64  # bitsandbytes' default 4-bit blocksize
NESTED_BLOCK = 256  # double quantization: one fp32 scale per 256 quantized absmax values
#: FastModel.get_peft_model's default targets (fastft.model.ALL_LINEAR_PROJECTIONS): Phi-3's fused ones included
LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj", "gate_proj", "up_proj", "gate_up_proj", "down_proj")
VARIANTS = ("fastft", "baseline", "unpatched")

# ---------------------------------------------------------------------------------------------------------------
# Opaque custom ops: the tracker charges their outputs only (they model single GPU kernels whose scratch lives in
# registers/SRAM). Real impls compute the right values so the same step runs on CPU for validation.
# ---------------------------------------------------------------------------------------------------------------


def _attention_reference(q, k, v, scale, softcap):
    """q [B, H, T, D], k/v [B, Hkv, T, D] -> (out [B, T, H, D] in q.dtype, lse [B, H, T] fp32); causal."""
    rep = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(rep, dim=1).float()
    v = v.repeat_interleave(rep, dim=1).float()
    scores = torch.matmul(q.float(), k.transpose(-1, -2)) * scale
    if softcap:
        scores = torch.tanh(scores / softcap) * softcap
    t = q.shape[2]
    causal = torch.ones(t, t, dtype=torch.bool, device=q.device).triu(1)
    scores = scores.masked_fill(causal, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    out = torch.matmul(torch.softmax(scores, dim=-1), v)
    return out.transpose(1, 2).contiguous().to(q.dtype), lse


@torch.library.custom_op("fastft_memmodel::flash_attention_forward", mutates_args=())
def flash_attention_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, softcap: float
) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        return _attention_reference(q, k, v, scale, softcap)


@flash_attention_forward.register_fake
def _(q, k, v, scale, softcap):
    b, h, t, d = q.shape
    return q.new_empty(b, t, h, v.shape[-1]), q.new_empty(b, h, t, dtype=torch.float32)


@torch.library.custom_op("fastft_memmodel::flash_attention_backward", mutates_args=())
def flash_attention_backward(
    dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, softcap: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # Explicit gradients (autograd is off below the custom-op boundary). dout [B, T, H, D]; GQA groups summed.
    b, h, t, d = q.shape
    rep = h // k.shape[1]
    kf = k.repeat_interleave(rep, dim=1).float()
    vf = v.repeat_interleave(rep, dim=1).float()
    qf, do = q.float(), dout.transpose(1, 2).float()
    raw = torch.matmul(qf, kf.transpose(-1, -2)) * scale
    capped = torch.tanh(raw / softcap) if softcap else None
    scores = capped * softcap if softcap else raw
    scores = scores.masked_fill(torch.ones(t, t, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    p = torch.softmax(scores, dim=-1)
    dv = torch.matmul(p.transpose(-1, -2), do)
    dp = torch.matmul(do, vf.transpose(-1, -2))
    ds = p * (dp - (dp * p).sum(-1, keepdim=True))
    if softcap:
        ds = ds * (1 - capped * capped)
    dq = torch.matmul(ds, kf) * scale
    dk = torch.matmul(ds.transpose(-1, -2), qf) * scale
    fold = lambda g: g.view(b, k.shape[1], rep, t, -1).sum(2)  # noqa: E731
    return dq.to(q.dtype), fold(dk).to(k.dtype), fold(dv).to(v.dtype)


@flash_attention_backward.register_fake
def _(dout, q, k, v, scale, softcap):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


class _FlashAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, scale, softcap):
        out, lse = flash_attention_forward(q, k, v, scale, softcap)
        ctx.save_for_backward(q, k, v, out, lse)  # what FlashAttention-2 keeps: inputs, output, logsumexp
        ctx.scale, ctx.softcap = scale, softcap
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, _out, _lse = ctx.saved_tensors
        dq, dk, dv = flash_attention_backward(dout.contiguous(), q, k, v, ctx.scale, ctx.softcap)
        return dq, dk, dv, None, None


def meta_flash_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, softcap=None,
                         **kwargs):
    """transformers AttentionInterface entry: causal attention with FlashAttention-2's memory (see module doc)."""
    if attention_mask is not None:
        raise ValueError("fastft_meta_sdpa_free models causal attention on full (padded) sequences; got a mask")
    scale = float(scaling) if scaling is not None else query.shape[-1] ** -0.5
    return _FlashAttention.apply(query, key, value, scale, float(softcap or 0.0)), None


def register_attention() -> str:
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION_NAME, meta_flash_attention)
    return ATTENTION_NAME


# NF4 codebook (bitsandbytes' 16 values), used only when the step runs on real tensors.
_NF4 = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
        -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
        0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0)


@torch.library.custom_op("fastft_memmodel::dequantize_4bit", mutates_args=())
def dequantize_4bit(packed: torch.Tensor, absmax: torch.Tensor, out_features: int, in_features: int,
                    dtype: torch.dtype) -> torch.Tensor:
    codes = torch.stack([packed.view(-1) >> 4, packed.view(-1) & 0xF], dim=1).view(-1)[: out_features * in_features]
    table = torch.tensor(_NF4, device=packed.device)
    scale = absmax.float().repeat_interleave(QUANT_BLOCK)[: codes.numel()]
    return (table[codes.long()] * scale).to(dtype).view(out_features, in_features)


@dequantize_4bit.register_fake
def _(packed, absmax, out_features, in_features, dtype):
    return packed.new_empty(out_features, in_features, dtype=dtype)


class _Matmul4bit(torch.autograd.Function):
    """y = x @ dequant(W).T; the dequantized weight is a temporary in forward and again in backward, never saved."""

    @staticmethod
    def forward(ctx, x, module, bias):
        ctx.module = module
        w = module.dequantize()
        return torch.nn.functional.linear(x, w, bias)

    @staticmethod
    def backward(ctx, grad):
        w = ctx.module.dequantize()
        return torch.matmul(grad, w), None, None


class Linear4bit(nn.Module):
    """A frozen base linear stored as bitsandbytes NF4 (buffers sized exactly as bnb stores them)."""

    def __init__(self, in_features: int, out_features: int, dtype: torch.dtype, device: torch.device | str,
                 double_quant: bool = True, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)
        self.in_features, self.out_features, self.compute_dtype = in_features, out_features, dtype
        numel = in_features * out_features
        blocks = math.ceil(numel / QUANT_BLOCK)
        self.register_buffer("packed", torch.zeros((numel + 1) // 2, 1, dtype=torch.uint8, device=device))
        if double_quant:
            self.register_buffer("absmax_q", torch.zeros(blocks, dtype=torch.uint8, device=device))
            self.register_buffer("absmax2", torch.ones(math.ceil(blocks / NESTED_BLOCK), device=device))
            self.register_buffer("code2", torch.zeros(256, device=device))
            self.register_buffer("offset", torch.zeros((), device=device))
        else:
            self.register_buffer("absmax", torch.ones(blocks, device=device))
        self.register_buffer("code", torch.zeros(16, device=device))
        self.double_quant = double_quant

    def dequantize(self) -> torch.Tensor:
        # The absmax de-nesting is a handful of KB; only the [out, in] weight matters, and that is what the op outputs.
        absmax = self.absmax2.repeat_interleave(NESTED_BLOCK)[: self.absmax_q.numel()] if self.double_quant \
            else self.absmax
        return dequantize_4bit(self.packed, absmax, self.out_features, self.in_features, self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _Matmul4bit.apply(x, self, self.bias)

    def base_weight(self) -> Any:
        """The weight as fastft's fused LoRA reads a bitsandbytes Params4bit: packed bytes + a quant state."""
        from fastft.kernels.lora import BaseWeight

        if self.double_quant:
            nested = _QuantState(self.absmax2, self.code2, NESTED_BLOCK, None, torch.float32)
            state = _QuantState(self.absmax_q, self.code, QUANT_BLOCK, "nf4", self.compute_dtype,
                                (self.out_features, self.in_features), self.offset, nested)
        else:
            state = _QuantState(self.absmax, self.code, QUANT_BLOCK, "nf4", self.compute_dtype,
                                (self.out_features, self.in_features))
        return BaseWeight(self.packed, state)


@dataclasses.dataclass
class _QuantState:
    """The fields of ``bitsandbytes.functional.QuantState`` that fastft.kernels.nf4 reads."""

    absmax: torch.Tensor
    code: torch.Tensor
    blocksize: int
    quant_type: str | None
    dtype: torch.dtype
    shape: tuple[int, int] | None = None
    offset: torch.Tensor | None = None
    state2: _QuantState | None = None

    @property
    def nested(self) -> bool:
        return self.state2 is not None


class LoraLinear(nn.Module):
    """PEFT LoRA's forward op for op: base(x) [+ clone for 4-bit] + lora_B(lora_A(x)) * scaling."""

    def __init__(self, base: nn.Module, in_features: int, out_features: int, r: int, alpha: float,
                 device: torch.device | str, clone_result: bool) -> None:
        super().__init__()
        self.base_layer = base
        self.lora_A = nn.Parameter(torch.zeros(r, in_features, device=device))  # fp32 master weights
        self.lora_B = nn.Parameter(torch.zeros(out_features, r, device=device))
        self.scaling = alpha / r
        self.clone_result = clone_result
        self.in_features, self.out_features = in_features, out_features
        self.fused = False  # fastft: run through fastft.kernels.lora's LoRAProjections, as FastModel does

    def fused_parts(self, dtype: torch.dtype) -> tuple[Any, torch.Tensor, torch.Tensor, float, bool]:
        """(base weight, A, B, scaling, add_in_base_dtype) as fastft.kernels.lora reads a PEFT layer, the fp32
        adapters cast to the compute dtype as autocast (and fastft's fused path under it) does."""
        from fastft.kernels.lora import BaseWeight

        base = self.base_layer
        weight = base.base_weight() if isinstance(base, Linear4bit) else BaseWeight(base.weight.detach())
        return weight, self.lora_A.to(dtype), self.lora_B.to(dtype), self.scaling, isinstance(base, Linear4bit)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused:
            from fastft.kernels.lora import projections_from_parts

            return projections_from_parts(x, [self.fused_parts(x.dtype)])[0]
        result = self.base_layer(x)
        if self.clone_result:
            result = result.clone()
        a = torch.nn.functional.linear(x, self.lora_A.to(x.dtype))
        b = torch.nn.functional.linear(a, self.lora_B.to(x.dtype))
        return result + b * self.scaling


class HostLedger:
    """Host (CPU RAM) bytes held by offloaded checkpoints; live and peak."""

    def __init__(self) -> None:
        self.live = 0
        self.peak = 0

    def add(self, nbytes: int) -> None:
        self.live += nbytes
        self.peak = max(self.peak, self.live)

    def remove(self, nbytes: int) -> None:
        self.live -= nbytes


@contextlib.contextmanager
def _phase(tracker: LiveBytesTracker | None, name: str) -> Iterator[None]:
    if tracker is None:
        yield
    else:
        with tracker.in_phase(name):
            yield


class _Checkpoint(torch.autograd.Function):
    @staticmethod
    def forward(ctx, run: Callable[[torch.Tensor], torch.Tensor], owner: CheckpointedLayer, x: torch.Tensor,
                *params: torch.Tensor):
        ctx.run, ctx.owner = run, owner
        tracker, memo = owner.tracker, owner.memo
        key = ("forward", owner.signature, tuple(x.shape), x.dtype)
        if memo is not None and key in memo:
            # An identical layer already ran on identical shapes: replay its transient high-water mark and output.
            extra, out_shape, out_dtype = memo[key]
            tracker.transient(extra)
            out = x.new_empty(out_shape, dtype=out_dtype)
        else:
            with torch.no_grad(), (tracker.local_peak() if memo is not None else contextlib.nullcontext([])) as peak:
                before = tracker.live_bytes if tracker is not None else 0
                out = run(x)
            if memo is not None:
                memo[key] = (peak[0] - before, tuple(out.shape), out.dtype)
        if owner.offload:
            with _disable_current_modes():  # the host copy is not device memory: keep it out of the tracker
                ctx.host = x.detach().clone()
            ctx.host_bytes = x.untyped_storage().nbytes()
            owner.ledger.add(ctx.host_bytes)
        else:
            ctx.save_for_backward(x)
        return out

    @staticmethod
    def backward(ctx, grad):
        owner = ctx.owner
        tracker, memo = owner.tracker, owner.memo
        key = ("backward", owner.signature, tuple(grad.shape), grad.dtype)
        if owner.offload:
            host = ctx.host
            del ctx.host
            owner.ledger.remove(ctx.host_bytes)
        if memo is not None and key in memo:
            with _phase(tracker, "recompute"):
                tracker.transient(memo[key])
            with _phase(tracker, "gradients"):
                for p in owner.trainable:  # what the layer's backward would have accumulated
                    if p.grad is None:
                        p.grad = torch.zeros_like(p)
            with _phase(tracker, "backward"):
                dx = grad.new_empty(grad.shape)
            return (None, None, dx) + (None,) * (len(ctx.needs_input_grad) - 3)
        with (tracker.local_peak() if memo is not None else contextlib.nullcontext([])) as peak:
            before = tracker.live_bytes if tracker is not None else 0
            with _phase(tracker, "recompute"):
                x = host.clone() if owner.offload else ctx.saved_tensors[0]  # copy-back: a counted allocation
                x = x.detach().requires_grad_(True)
                with torch.enable_grad():
                    out = ctx.run(x)
            with _phase(tracker, "backward"):
                torch.autograd.backward(out, grad)
            dx = x.grad
            del out, x
        if memo is not None:
            memo[key] = peak[0] - before
        return (None, None, dx) + (None,) * (len(ctx.needs_input_grad) - 3)


class CheckpointedLayer(nn.Module):
    """Checkpoint one decoder layer: no graph in forward, recompute in backward; optionally offload its input.

    ``memo`` (a dict shared by the layers of one model, meta runs only): identical layers on identical shapes
    allocate identically, so after the first layer has run for real, the others replay its measured transient
    high-water mark and its persistent allocations (output; in backward, parameter grads and dx). The replay is
    checked against full execution in tests/memory/test_step_model.py.
    """

    def __init__(self, layer: nn.Module, offload: bool, ledger: HostLedger) -> None:
        super().__init__()
        self.layer = layer
        self.offload = offload
        self.ledger = ledger
        self.tracker: LiveBytesTracker | None = None
        self.memo: dict | None = None
        self.attention_type = getattr(layer, "attention_type", None)

    @property
    def trainable(self) -> list[nn.Parameter]:
        return [p for p in self.layer.parameters() if p.requires_grad]

    @property
    def signature(self) -> tuple:
        sig = getattr(self, "_signature", None)
        if sig is None:
            sig = self._signature = (type(self.layer).__name__, self.attention_type, self.offload, tuple(
                (n, tuple(t.shape), t.dtype, t.requires_grad) for n, t in
                list(self.layer.named_parameters()) + list(self.layer.named_buffers())))
        return sig

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        def run(x: torch.Tensor) -> torch.Tensor:
            out = self.layer(x, *args, **kwargs)
            return out[0] if isinstance(out, tuple) else out

        if not torch.is_grad_enabled():
            return run(hidden_states)
        # Trainable params reached by the layer are passed so the node exists even if x did not require grad.
        return _Checkpoint.apply(run, self, hidden_states, *self.trainable)


# ---------------------------------------------------------------------------------------------------------------
# Loss: the baseline uses transformers' own (full logits, fp32 upcast); fastft a chunked linear cross-entropy.
# ---------------------------------------------------------------------------------------------------------------

def lce_chunk_rows(vocab: int, budget_elements: int = 1 << 26) -> int:
    """Rows per chunk so one chunk of fp32 logits is at most ``budget_elements`` (256 MB); a power of two."""
    return max(1, 1 << int(math.floor(math.log2(max(1, budget_elements // vocab)))))


class _ChunkedLinearCE(torch.autograd.Function):
    """Mean CE of (hidden @ W.T) vs targets, computed chunk by chunk; grad wrt hidden produced in the forward."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk, softcap):
        n = hidden.shape[0]
        grad_hidden = torch.empty_like(hidden)
        loss = hidden.new_zeros((), dtype=torch.float32)
        valid = (targets != -100).sum().clamp_min(1)
        for start in range(0, n, chunk):
            h = hidden[start:start + chunk]
            t = targets[start:start + chunk]
            logits = torch.nn.functional.linear(h, weight).float()
            if softcap:
                capped = torch.tanh(logits / softcap)
                logits = capped * softcap
            lse = torch.logsumexp(logits, dim=-1)
            keep = t != -100
            safe_t = t.clamp_min(0)
            picked = logits.gather(1, safe_t[:, None])[:, 0]
            loss = loss + ((lse - picked) * keep).sum()
            # d loss / d logits = softmax - onehot, in place over the chunk's fp32 logits
            probs = logits.sub_(lse[:, None]).exp_()
            probs.scatter_add_(1, safe_t[:, None], -torch.ones_like(picked)[:, None])
            probs.mul_(keep[:, None])
            if softcap:
                probs.mul_(1 - capped * capped)
            grad_hidden[start:start + chunk] = torch.matmul(probs.to(hidden.dtype), weight)
            del logits, probs
        ctx.save_for_backward(grad_hidden, valid)
        return loss / valid

    @staticmethod
    def backward(ctx, grad_loss):
        grad_hidden, valid = ctx.saved_tensors
        return grad_hidden * (grad_loss / valid).to(grad_hidden.dtype), None, None, None, None


def chunked_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                                 softcap: float | None = None) -> torch.Tensor:
    """hidden [N, H], weight [V, H] (frozen), targets [N] long (-100 ignored) -> mean loss; never [N, V] at once."""
    try:  # fastft's own rule (chunk logits ~ as large as hidden), so the modelled chunk is the one the kernel uses
        from fastft.kernels.linear_cross_entropy import choose_chunk_size

        chunk = choose_chunk_size(hidden.shape[0], hidden.shape[1], weight.shape[0], hidden.dtype, hidden.device)
        # On CUDA the kernel also caps the chunk at 1/8 of free memory, which meta cannot ask: cap at 256 MB fp32.
        chunk = min(chunk, lce_chunk_rows(weight.shape[0]))
    except ImportError:  # pragma: no cover
        chunk = lce_chunk_rows(weight.shape[0])
    return _ChunkedLinearCE.apply(hidden, weight, targets, chunk, softcap or 0.0)


# ---------------------------------------------------------------------------------------------------------------
# Optimizers
# ---------------------------------------------------------------------------------------------------------------

class Adam8bitModel:
    """bitsandbytes 8-bit AdamW's memory: uint8 m and v + fp32 absmax per 256 for tensors >= 4096 elements."""

    def __init__(self, params: list[nn.Parameter]) -> None:
        self.params = params
        self.state: dict[nn.Parameter, list[torch.Tensor]] = {}

    def init_state(self) -> None:
        for p in self.params:
            if p.numel() >= 4096:
                blocks = math.ceil(p.numel() / 256)
                self.state[p] = [torch.zeros_like(p, dtype=torch.uint8), torch.zeros_like(p, dtype=torch.uint8),
                                 p.new_zeros(blocks, dtype=torch.float32), p.new_zeros(blocks, dtype=torch.float32)]
            else:
                self.state[p] = [torch.zeros_like(p, dtype=torch.float32), torch.zeros_like(p, dtype=torch.float32)]

    def state_tensors(self) -> list[torch.Tensor]:
        return [t for ts in self.state.values() for t in ts]

    def step(self) -> None:
        with torch.no_grad():
            for p in self.params:
                if p.grad is not None:
                    p.add_(p.grad, alpha=-1e-4)  # bnb's fused kernel updates in place with no temporaries

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            p.grad = None


def make_optimizer(name: str, params: list[nn.Parameter]):
    if name in ("adamw", "adamw_torch"):
        opt = torch.optim.AdamW(params, lr=1e-4, foreach=True)
        for p in params:  # steady state: create the states now, outside the measured step
            p.grad = torch.zeros_like(p)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return opt, [t for s in opt.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
    if name in ("adamw_8bit", "adamw_bnb_8bit", "paged_adamw_8bit"):
        opt = Adam8bitModel(params)
        opt.init_state()
        return opt, opt.state_tensors()
    if name == "sgd":
        opt = torch.optim.SGD(params, lr=1e-4)
        return opt, []
    raise ValueError(f"unknown optimizer {name!r}; choose adamw, adamw_8bit or sgd")


# ---------------------------------------------------------------------------------------------------------------
# Building and stepping
# ---------------------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class StepSpec:
    """What to model. ``variant``: "fastft" (fused kernels, chunked LCE, offloaded checkpointing, tiled MLP),
    "baseline" (transformers + PEFT LoRA, standard checkpointing, full fp32 logits), or "unpatched" (FastModel on an
    architecture outside fastft's table: no kernel, fused LoRA or fused loss applies -- the model's own forward and
    full logits, PEFT LoRA -- but fastft's checkpointing, with its offload, and embedding offload still do)."""

    variant: str = "fastft"
    load_in_4bit: bool = True
    double_quant: bool = True
    lora_r: int = 16
    lora_alpha: float | None = None
    target_modules: tuple[str, ...] = LINEAR_NAMES
    optim: str = "adamw"
    gradient_checkpointing: bool = True
    offload: bool | None = None  # default: on for fastft, off for baseline
    fp32_embeddings: bool | None = None  # default: on for the 4-bit baseline (prepare_model_for_kbit_training)
    dtype: torch.dtype = torch.bfloat16
    fused_kernels: bool = True  # fastft variant: apply patch_model (fused norm / RoPE / GLU)
    #: fastft variant: patch_model's sequence-tiled MLP (True = 4,096-token tiles, an int = tile tokens), as
    #: FastModel.from_pretrained(tiled_mlp=...); off by default there, and so here.
    tiled_mlp: bool | int = False
    offload_embeddings: bool = False  # fastft variant: frozen input embedding kept in host memory (opt-in)

    @property
    def offload_enabled(self) -> bool:
        return (self.variant != "baseline") if self.offload is None else self.offload

    @property
    def fp32_embeddings_enabled(self) -> bool:
        if self.fp32_embeddings is None:
            return self.variant == "baseline" and self.load_in_4bit
        return self.fp32_embeddings


@dataclasses.dataclass
class StepResult:
    peak_bytes: int
    breakdown: dict[str, int]
    host_bytes: int
    peak_by_phase: dict[str, int]
    seconds: float
    notes: list[str]


class StepModel:
    """A model built once for a spec (meta by default) whose training step can be measured at any sequence length."""

    def __init__(self, config: Any, spec: StepSpec, device: str = "meta") -> None:
        from transformers import AutoModelForCausalLM

        if spec.variant not in VARIANTS:
            raise ValueError(f"variant must be one of {', '.join(map(repr, VARIANTS))}, got {spec.variant!r}")
        self.spec, self.device, self.notes = spec, device, []
        self.fused_loss = False  # set by patch_model: fastft's linear_cross_entropy inside the model forward
        config = _copy_config(config)
        config._attn_implementation = register_attention()
        config.use_cache = False
        with torch.device(device):
            try:
                model = AutoModelForCausalLM.from_config(config, dtype=spec.dtype, attn_implementation=ATTENTION_NAME)
            except ValueError:
                # Some architectures (Gemma-2: softcapping) refuse custom implementations at init; build eager and
                # switch the implementation the attention modules look up at call time.
                model = AutoModelForCausalLM.from_config(config, dtype=spec.dtype, attn_implementation="eager")
                model.config._attn_implementation_internal = ATTENTION_NAME
        model.train()
        for p in model.parameters():
            p.requires_grad_(False)
        self.ledger = HostLedger()
        self._replace_linears(model)
        from fastft.memory.moe_model import replace_experts  # MoE: the stacked experts (see moe_model's docstring)

        self.notes += replace_experts(model, spec.lora_r, spec.lora_alpha if spec.lora_alpha is not None else
                                      2 * spec.lora_r, spec.variant == "fastft" and spec.fused_kernels, device)
        if spec.fp32_embeddings_enabled:
            self._upcast_embeddings(model)
        if spec.variant == "fastft" and spec.fused_kernels:
            self._patch_fastft(model)
        self.host_static = 0  # host bytes held for the whole run (an offloaded embedding)
        if spec.variant != "baseline" and spec.offload_embeddings:
            self._offload_embeddings(model)
        self.layers = layers = decoder_layers(model)
        if spec.gradient_checkpointing:
            for i, layer in enumerate(layers):
                layers[i] = CheckpointedLayer(layer, spec.offload_enabled, self.ledger)
        self.model = model
        self.trainable = [p for p in model.parameters() if p.requires_grad]
        self.optimizer, self.state_tensors = make_optimizer(spec.optim, self.trainable)
        if spec.optim in ("adamw_8bit", "adamw_bnb_8bit", "paged_adamw_8bit"):
            self.notes.append("adamw_8bit: bitsandbytes' state layout; update modelled in place (fused kernel)")

    def _replace_linears(self, model: nn.Module) -> None:
        spec = self.spec
        alpha = spec.lora_alpha if spec.lora_alpha is not None else 2 * spec.lora_r
        for parent in list(model.modules()):
            for name, child in list(parent.named_children()):
                shape = _linear_shape(child)
                if name not in spec.target_modules or shape is None:
                    continue
                in_features, out_features = shape
                base: nn.Module = child
                if spec.load_in_4bit:
                    base = Linear4bit(in_features, out_features, spec.dtype, self.device, spec.double_quant,
                                      child.bias)
                if spec.lora_r > 0:
                    base = LoraLinear(base, in_features, out_features, spec.lora_r, alpha, self.device,
                                      clone_result=spec.load_in_4bit)
                setattr(parent, name, base)

    def _upcast_embeddings(self, model: nn.Module) -> None:
        """PEFT's ``prepare_model_for_kbit_training`` (the canonical QLoRA recipe) casts every non-quantized weight
        to fp32; we model it for embed_tokens and lm_head (the big ones) and the bf16 autocast around them: the
        embedding's fp32 output is cast to bf16, and lm_head multiplies with a bf16 copy of its weight (autocast's
        cast, saved by the matmul for backward). Norm weights stay bf16 (a few KB)."""
        embed, head = model.get_input_embeddings(), model.get_output_embeddings()
        with torch.no_grad():
            for module in {id(embed): embed, id(head): head}.values():
                module.weight.data = module.weight.data.float()
        dtype = self.spec.dtype
        embed_forward = embed.forward
        embed.forward = lambda ids: embed_forward(ids).to(dtype)
        head.forward = lambda x: torch.nn.functional.linear(x, head.weight.to(x.dtype))
        self.notes.append("baseline: embed_tokens/lm_head upcast to fp32 (prepare_model_for_kbit_training), "
                          "used through bf16 casts as under autocast")

    def _offload_embeddings(self, model: nn.Module) -> None:
        from fastft.patches.embedding_offload import offload_input_embeddings

        weight = model.get_input_embeddings().weight
        reason = offload_input_embeddings(model, host=self.device)  # meta stays meta: only the bookkeeping moves
        if reason is None:
            self.host_static = weight.numel() * weight.element_size()
            self.notes.append(f"input embedding in host memory ({self.host_static / 1e9:.2f} GB of host RAM)")
        else:
            self.notes.append(f"input embedding NOT offloaded: {reason}")

    def _patch_fastft(self, model: nn.Module) -> None:
        try:
            from fastft.patches.architectures import patch_model

            report = patch_model(model, tiled_mlp=self.spec.tiled_mlp)
        except Exception as exc:  # noqa: BLE001 - a half-written patch must not stop the plan; say what is missing
            self.notes.append(f"fastft patch_model failed ({type(exc).__name__}: {exc}); fused norm/RoPE/MLP NOT "
                              "modelled -- loss (chunked LCE) and offloaded checkpointing only")
            return
        self.notes.append(f"patch_model: applied {report.applied}, skipped {report.skipped}")
        if self.spec.lora_r > 0:
            self._fuse_lora(model)
        # The patched forward's linear_cross_entropy fake models only the op's outputs, not its [C, V] chunk
        # temporaries; so the loss is run through chunked_linear_cross_entropy below (same chunk size rule).

    def _fuse_lora(self, model: nn.Module) -> None:
        """What ``FastModel.get_peft_model`` does (``enable_fused_lora``): each LoRA MLP through fastft's
        ``LoRAMLP`` and each q/k/v/o projection through ``LoRAProjections`` -- the real autograd functions, so their
        saved tensors and temporaries (NF4 dequantized into shared buffers) are what is measured."""
        import types

        from fastft.kernels.lora import mlp_from_parts

        config = model.config
        activation = getattr(config, "hidden_activation", None) or config.hidden_act

        def mlp_once(mlp: nn.Module, x: torch.Tensor) -> torch.Tensor:
            parts = [getattr(mlp, k).fused_parts(x.dtype) for k in ("gate_proj", "up_proj", "down_proj")]
            return mlp_from_parts(x, parts, activation)  # FastModel's defaults: recompute="activation", in place

        mlps = projections = 0
        for name, module in model.named_modules():
            leaf = name.rsplit(".", 1)[-1]
            if hasattr(module, "_fastft_mlp_once") and all(
                    isinstance(getattr(module, k, None), LoraLinear) for k in ("gate_proj", "up_proj", "down_proj")):
                module._fastft_mlp_once = types.MethodType(mlp_once, module)
                mlps += 1
            elif hasattr(module, "_fastft_mlp_once") and all(
                    isinstance(getattr(module, k, None), LoraLinear) for k in ("gate_up_proj", "down_proj")):
                module.gate_up_proj.fused = module.down_proj.fused = True  # Phi-3 / GLM-4: each projection fused
                mlps += 1
            elif isinstance(module, LoraLinear) and leaf in ("q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj"):
                module.fused = True
                projections += 1
        self.notes.append(f"fused LoRA (fastft.kernels.lora): {mlps} MLPs, {projections} attention projections")

    def step(self, seq_len: int, batch_size: int = 1, replay_layers: bool | None = None,
             counter: Any = None) -> StepResult:
        """Measure one training step at [batch_size, seq_len] (all tokens real, labels = inputs).

        ``replay_layers`` (default: on for meta without a counter) replays identical checkpointed layers instead of
        re-running them. ``counter``: a TorchDispatchMode (fastft.memory.speed_model.OpCounter) entered inside the
        tracker, so it sees every op (fastft's custom ops as one op each); replayed layers dispatch nothing, so it
        needs every layer run.
        """
        if replay_layers is None:
            replay_layers = self.device == "meta" and counter is None
        if counter is not None and replay_layers:
            raise ValueError("a counter needs replay_layers=False: replayed layers dispatch no ops")
        memo: dict | None = {} if replay_layers else None
        t0 = time.perf_counter()
        model, spec = self.model, self.spec
        ids = torch.zeros(batch_size, seq_len, dtype=torch.long, device=self.device)
        if self.device != "meta":
            ids = torch.randint(0, model.config.vocab_size, (batch_size, seq_len), generator=torch.Generator()
                                .manual_seed(0)).to(self.device)
        labels = ids.clone()
        if spec.variant == "fastft":
            from fastft.kernels.lora import clear_buffers

            clear_buffers()  # fused LoRA's shared NF4 buffers: allocated (and counted) by this step, then kept
        tracker = LiveBytesTracker()
        for layer in self.layers:
            if isinstance(layer, CheckpointedLayer):
                layer.tracker, layer.memo = tracker, memo
        hooks = [p.register_post_accumulate_grad_hook(lambda p: tracker.recharge(p.grad, "gradients"))
                 for p in self.trainable]
        self.ledger.live = self.ledger.peak = 0
        try:
            if counter is not None:
                counter.phase_of = lambda: tracker.phase
            with _module_patches(spec.variant == "fastft" and spec.fused_kernels), tracker, \
                    (counter if counter is not None else contextlib.nullcontext()):
                tracker.add_existing(list(model.parameters()) + list(model.buffers()), "weights")
                tracker.add_existing(self.state_tensors, "optimizer_state")
                tracker.add_existing([ids, labels], "inputs")
                with tracker.in_phase("activations"):
                    loss = self._loss(ids, labels, tracker)
                with tracker.in_phase("loss"):
                    loss.backward()
                del loss
                with tracker.in_phase("optimizer_step"):
                    self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
        finally:
            for h in hooks:
                h.remove()
        return StepResult(tracker.peak_bytes, dict(tracker.peak_breakdown), self.ledger.peak + self.host_static,
                          dict(tracker.peak_by_phase), time.perf_counter() - t0, list(self.notes))

    def _loss(self, ids: torch.Tensor, labels: torch.Tensor, tracker: LiveBytesTracker) -> torch.Tensor:
        model = self.model
        softcap = getattr(model.config, "final_logit_softcapping", None)
        if self.spec.variant != "fastft" or self.fused_loss:
            # The model's own loss path. Baseline and unpatched: transformers' full logits, upcast to fp32 in
            # ForCausalLMLoss. fastft patched: fastft.kernels.linear_cross_entropy (its fake impl) from the forward.
            def enter_loss(module, args):
                tracker.phase = "loss"
                (hidden,) = args
                if hidden.requires_grad:
                    hidden.register_hook(lambda g: setattr(tracker, "phase", "backward"))

            handle = model.get_output_embeddings().register_forward_pre_hook(enter_loss)
            try:
                return model(input_ids=ids, labels=labels).loss
            finally:
                handle.remove()
        hidden = model.model(input_ids=ids).last_hidden_state
        tracker.phase = "loss"
        hidden.register_hook(lambda g: setattr(tracker, "phase", "backward"))
        # shift: position i predicts token i+1; the last position has no target (ignored), as in ForCausalLMLoss
        targets = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100)
        return chunked_linear_cross_entropy(hidden.reshape(-1, hidden.shape[-1]), model.lm_head.weight,
                                            targets.reshape(-1), softcap)


@contextlib.contextmanager
def _module_patches(active: bool) -> Iterator[None]:
    """fastft's process-wide patches (RoPE functions) on for the fastft variant, off for the baseline."""
    try:
        from fastft.patches.architectures import _MODULE_PATCHES
    except Exception:  # noqa: BLE001 - no patches module: nothing to scope
        yield
        return
    changed = []
    for patch in list(_MODULE_PATCHES.values()):
        if patch.applied != active:
            try:
                patch.apply() if active else patch.revert()
            except Exception:  # noqa: BLE001 - a patch that cannot apply stays off (noted at build time)
                continue
            if patch.applied == active:
                changed.append(patch)
    try:
        yield
    finally:
        for patch in changed:
            patch.revert() if active else patch.apply()


def _linear_shape(module: nn.Module) -> tuple[int, int] | None:
    """(in, out) features of a linear layer: ``nn.Linear``, or transformers' ``Conv1D`` (GPT-2 style, weight stored
    [in, out]), which PEFT adapts and bitsandbytes quantizes like a linear layer; None for anything else."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if type(module).__name__ == "Conv1D" and getattr(module, "weight", None) is not None and module.weight.dim() == 2:
        return module.weight.shape[0], module.weight.shape[1]
    return None


def linear_names(model: nn.Module) -> list[str]:
    """Names (last part) of the linear layers inside the decoder layers: what ``target_modules`` can choose from."""
    names = {name.rsplit(".", 1)[-1] for layer in decoder_layers(model) for name, m in layer.named_modules()
             if _linear_shape(m) is not None}
    return sorted(names)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The stack of decoder layers: ``model.model.layers`` for Llama-style models, ``transformer.h`` for GPT-2 and
    others -- found as the ModuleList with ``num_hidden_layers`` entries, so no per-architecture attribute is needed."""
    inner = getattr(getattr(model, "model", None), "layers", None)
    if isinstance(inner, nn.ModuleList):
        return inner
    count = getattr(model.config, "num_hidden_layers", None)
    found = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) == count]
    if len(found) != 1:
        raise ValueError(f"cannot find the decoder layers of {type(model).__name__}: {len(found)} module lists with "
                         f"num_hidden_layers={count} entries")
    return found[0]


def _copy_config(config: Any) -> Any:
    import copy

    return copy.deepcopy(config)
