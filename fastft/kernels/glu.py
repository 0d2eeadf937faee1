"""Gated MLP activations, fused: ``h = act(gate) * up`` for SwiGLU (act = silu) and GeGLU (act = gelu, exact or tanh).

One file holds both because the two ops are the same elementwise kernel that differs only in the activation and its
derivative: a constexpr ``ACTIVATION`` (the value of a :class:`fastft.kernels.activation.Activation`: 0 = silu,
1 = gelu/erf, 2 = gelu/tanh) picks them at compile time, so there is one forward and one backward kernel instead of two
near-identical copies. :func:`glu` takes an ``Activation``; :func:`swiglu` and :func:`geglu` are its per-family names.

Shapes and dtypes
    gate, up: the same shape [..., n] and the same dtype (fp32/bf16/fp16); rows may be strided (e.g. the two halves
    of a fused gate_up projection, row stride 2n), the last dimension must be contiguous or it is copied.
    Output h: [..., n] in gate.dtype, contiguous.

Numerics (matching eager torch ``F.silu(g) * u`` / ``F.gelu(g, approximate=...) * u``)
    The activation is computed in fp32 and rounded to the input dtype before the multiply, exactly where eager torch
    rounds it; the product of two bf16 (or two fp16) values is exact in fp32, so the single rounding of the product
    equals torch's half-precision multiply. erf is ``tl.math.erf`` (works in the interpreter, libdevice erff when
    compiled). tanh-gelu uses the identity 0.5 * (1 + tanh(z)) = sigmoid(2z), i.e. gelu_tanh(g) = g * sigmoid(2z)
    with z = sqrt(2/pi) * (g + 0.044715 g^3): no tanh (a libdevice stub in the interpreter) and no overflow for
    large |g| (exp(+inf) -> sigmoid 0, exp(-inf) -> sigmoid 1).

Saved for backward: gate and up only. The activation is recomputed from gate in the backward instead of being stored
(saves one [..., n] tensor per MLP layer). Backward, with a = act(g) rounded to the input dtype as in the forward:
    dup = dh * a,    dgate = dh * up * act'(g).

In-place backward (opt-in, ``inplace_backward=True``): dgate is written into gate's buffer and dup into up's, which
saves two [..., n] allocations per layer in the backward. It is safe exactly when gate and up are temporaries that
nothing reads after this op's backward: in the Hugging Face MLP ``down(act(gate_proj(x)) * up_proj(x))`` they are
read only by this op (the projections save their input x, not their output). The op bumps the version counters of
gate and up, so another autograd node that saved them, or a second backward through a retained graph, raises
PyTorch's "modified by an inplace operation" error instead of computing wrong gradients. What it cannot detect is a
plain Python reference to gate/up held outside autograd (a debug hook, say); hence opt-in. It falls back to the
out-of-place backward when gate or up is a leaf (user-owned) or when gate and up overlap in memory.

Memory, measured with fastft's LiveBytesTracker on meta tensors at Llama-3-8B MLP sizes (4096 tokens, 4096 -> 14336,
bf16, frozen weights; tests/kernels/test_swiglu.py::test_memory_no_saved_activation_and_inplace_backward): live
after the forward 368 MiB eager ``F.silu(g) * u`` -> 256 MiB fused; backward peak 736 -> 624 MiB, 400 MiB with the
in-place backward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastft.kernels._launch import TRITON_AVAILABLE, call_op, check_floating, launch, needs_grad, use_triton
from fastft.kernels.activation import Activation

if TRITON_AVAILABLE:
    import triton
    import triton.language as tl

    from fastft.kernels._tl_utils import cast_rne

    @triton.jit
    def _activation_and_grad(g, ACTIVATION: tl.constexpr):
        """act(g) and act'(g) in fp32 for one block of gate values (already fp32); ACTIVATION: an Activation's value."""
        if ACTIVATION == 0:  # silu(g) = g * sigmoid(g)
            s = 1.0 / (1.0 + tl.exp(-g))
            a = g * s
            da = s * (1.0 + g * (1.0 - s))
        elif ACTIVATION == 1:  # gelu(g) = 0.5 * g * (1 + erf(g / sqrt(2)))
            cdf = 0.5 * (1.0 + tl.math.erf(g * 0.7071067811865476))
            a = g * cdf
            da = cdf + g * tl.exp(-0.5 * g * g) * 0.3989422804014327  # + g * pdf(g)
        else:  # gelu_tanh(g) = g * sigmoid(2z), z = sqrt(2/pi) * (g + 0.044715 g^3)
            z = 0.7978845608028654 * (g + 0.044715 * g * g * g)
            s = 1.0 / (1.0 + tl.exp(-2.0 * z))
            a = g * s
            dz = 0.7978845608028654 * (1.0 + 0.134145 * g * g)
            da = s + 2.0 * g * s * (1.0 - s) * dz
        return a, da

    @triton.jit
    def _activation(g, ACTIVATION: tl.constexpr):
        """act(g) in fp32; written like eager torch (x / (1 + exp(-x)) for silu) to stay within an fp32 ulp of it."""
        if ACTIVATION == 0:
            a = g / (1.0 + tl.exp(-g))
        elif ACTIVATION == 1:
            a = g * 0.5 * (1.0 + tl.math.erf(g * 0.7071067811865476))
        else:
            z = 0.7978845608028654 * (g + 0.044715 * g * g * g)
            a = g / (1.0 + tl.exp(-2.0 * z))
        return a

    @triton.jit
    def _glu_forward_kernel(
        H,
        G,
        U,
        stride_h,
        stride_g,
        stride_u,
        n_cols,
        ACTIVATION: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        # Grid (rows, column blocks): rows carry their own stride, so halves of a fused gate_up output need no copy.
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < n_cols
        g_in = tl.load(G + row * stride_g + cols, mask=mask, other=0.0)
        u = tl.load(U + row * stride_u + cols, mask=mask, other=0.0).to(tl.float32)
        a = _activation(g_in.to(tl.float32), ACTIVATION)
        # Round the activation to the input dtype before the multiply, where eager torch rounds it.
        h = cast_rne(a, g_in.dtype).to(tl.float32) * u
        tl.store(H + row * stride_h + cols, cast_rne(h, H.dtype.element_ty), mask=mask)

    @triton.jit
    def _glu_backward_kernel(
        DG,
        DU,
        DH,
        G,
        U,
        stride_dg,
        stride_du,
        stride_dh,
        stride_g,
        stride_u,
        n_cols,
        ACTIVATION: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        # DG/DU may be the very buffers of G/U (in-place backward): each element is loaded before it is stored, by
        # the same program, so aliasing is safe.
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < n_cols
        g_in = tl.load(G + row * stride_g + cols, mask=mask, other=0.0)
        u = tl.load(U + row * stride_u + cols, mask=mask, other=0.0).to(tl.float32)
        dh = tl.load(DH + row * stride_dh + cols, mask=mask, other=0.0).to(tl.float32)
        a, da = _activation_and_grad(g_in.to(tl.float32), ACTIVATION)
        du = dh * cast_rne(a, g_in.dtype).to(tl.float32)
        dg = dh * u * da
        tl.store(DG + row * stride_dg + cols, cast_rne(dg, DG.dtype.element_ty), mask=mask)
        tl.store(DU + row * stride_du + cols, cast_rne(du, DU.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------------------------
# Reference: the plain math, differentiable by autograd. The test oracle.
# ----------------------------------------------------------------------------------------------------------------
def swiglu_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``F.silu(gate) * up``, as Hugging Face's LlamaMLP computes it."""
    return F.silu(gate) * up


def geglu_reference(gate: torch.Tensor, up: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    """``F.gelu(gate, approximate=approximate) * up``, as Gemma's MLP computes it."""
    return F.gelu(gate, approximate=approximate) * up


# ----------------------------------------------------------------------------------------------------------------
# Torch path: the same algorithm in row chunks, so the fp32 temporaries stay bounded (~4 MiB per chunk)
# ----------------------------------------------------------------------------------------------------------------
_CHUNK_ELEMENTS = 1 << 20


def _torch_activation(g: torch.Tensor, activation: Activation) -> torch.Tensor:
    if activation is Activation.SILU:
        return F.silu(g)
    return F.gelu(g, approximate=activation.approximate)


def _activation_backward_(grad: torch.Tensor, g: torch.Tensor, activation: Activation) -> torch.Tensor:
    """grad *= act'(g) in one aten op (torch's own derivative formula), written over grad (fp32 here)."""
    if activation is Activation.SILU:
        return torch.ops.aten.silu_backward.grad_input(grad, g, grad_input=grad)
    return torch.ops.aten.gelu_backward.grad_input(grad, g, approximate=activation.approximate, grad_input=grad)


def _rounded_activation(g: torch.Tensor, activation: Activation) -> torch.Tensor:
    """act(g) computed in fp32 and rounded to g.dtype: the value the kernels multiply by. fp32 and bf16 take torch's
    own op in g's dtype (on CPU a bf16 activation is computed in fp32 and rounded once: the same bits, a third of the
    passes); fp16 is computed from an fp32 copy, because torch's fp16 erf-GELU on CPU rounds differently."""
    if g.dtype == torch.float16:
        return _torch_activation(g.float(), activation).to(g.dtype)
    return _torch_activation(g, activation)


def _row_chunks(n_rows: int, n_cols: int) -> range:
    return range(0, n_rows, max(1, _CHUNK_ELEMENTS // max(n_cols, 1)))


def _forward_torch(g2: torch.Tensor, u2: torch.Tensor, activation: Activation) -> torch.Tensor:
    # a * u in g's dtype rounds once, like the kernel's fp32 product: two bf16/fp16 values multiply exactly in fp32.
    n_rows, n_cols = g2.shape
    step = _row_chunks(n_rows, n_cols).step
    if step >= n_rows:  # one chunk (every decoding step): no staging buffer
        return _rounded_activation(g2, activation).mul_(u2)
    h = torch.empty((n_rows, n_cols), dtype=g2.dtype, device=g2.device)
    for r in range(0, n_rows, step):
        torch.mul(_rounded_activation(g2[r : r + step], activation), u2[r : r + step], out=h[r : r + step])
    return h


def _backward_torch(
    dh2: torch.Tensor, g2: torch.Tensor, u2: torch.Tensor, activation: Activation, dg2: torch.Tensor, du2: torch.Tensor
) -> None:
    """Writes into dg2/du2, which may be g2/u2 themselves: each chunk's u is read before du is written over it, and
    its g before dg is.

    dup = dh * a with a rounded as in the forward (one rounding, as the kernel); dgate = (dh * u) * act'(g) in fp32,
    rounded once (dh * u is exact in fp32 for bf16/fp16 inputs)."""
    n_rows, n_cols = g2.shape
    step = _row_chunks(n_rows, n_cols).step
    for r in range(0, n_rows, step):
        g, u, dh = g2[r : r + step], u2[r : r + step], dh2[r : r + step]
        # dh * u in fp32, read before du2 (maybe u's memory) is written
        dhu = dh * u if dh.dtype == u.dtype == torch.float32 else dh.to(torch.float32, copy=True).mul_(u)
        torch.mul(dh, _rounded_activation(g, activation), out=du2[r : r + step])
        dg2[r : r + step] = _activation_backward_(dhu, g.float(), activation)


# ----------------------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------------------
#: Columns per program: 8 elements per thread at 4 warps (one 16-byte vector load in bf16), and few enough programs
#: that the interpreter stays quick.
_BLOCK = 1024
_NUM_WARPS = 4


def _grid(n_rows: int, n_cols: int) -> tuple[int, int]:
    return (n_rows, triton.cdiv(n_cols, _BLOCK))


def _forward_triton(g2: torch.Tensor, u2: torch.Tensor, activation: Activation) -> torch.Tensor:
    n_rows, n_cols = g2.shape
    h = torch.empty((n_rows, n_cols), dtype=g2.dtype, device=g2.device)
    launch(
        _glu_forward_kernel,
        _grid(n_rows, n_cols),
        h,
        g2,
        u2,
        h.stride(0),
        g2.stride(0),
        u2.stride(0),
        n_cols,
        ACTIVATION=activation.value,
        BLOCK=_BLOCK,
        num_warps=_NUM_WARPS,
    )
    return h


def _backward_triton(
    dh2: torch.Tensor, g2: torch.Tensor, u2: torch.Tensor, activation: Activation, dg2: torch.Tensor, du2: torch.Tensor
) -> None:
    n_rows, n_cols = g2.shape
    launch(
        _glu_backward_kernel,
        _grid(n_rows, n_cols),
        dg2,
        du2,
        dh2,
        g2,
        u2,
        dg2.stride(0),
        du2.stride(0),
        dh2.stride(0),
        g2.stride(0),
        u2.stride(0),
        n_cols,
        ACTIVATION=activation.value,
        BLOCK=_BLOCK,
        num_warps=_NUM_WARPS,
    )


# ----------------------------------------------------------------------------------------------------------------
# Shared op bodies
# ----------------------------------------------------------------------------------------------------------------
def _as_rows(t: torch.Tensor) -> torch.Tensor:
    """[..., n] -> [rows, n] (a view when the strides allow it), last dimension contiguous."""
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 or t2.shape[-1] <= 1 else t2.contiguous()


def _check_pair(op: str, gate: torch.Tensor, up: torch.Tensor) -> None:
    check_floating("gate", gate)
    check_floating("up", up)
    if gate.shape != up.shape or gate.dim() == 0:
        raise ValueError(
            f"{op}: gate and up must have the same shape with at least one dimension; "
            f"got gate {tuple(gate.shape)}, up {tuple(up.shape)}"
        )
    if gate.dtype != up.dtype:
        raise TypeError(f"{op}: gate and up must have the same dtype, got {gate.dtype} and {up.dtype}")
    if gate.device != up.device:
        raise ValueError(f"{op}: gate on {gate.device} but up on {up.device}")


def _glu_forward(op: str, gate: torch.Tensor, up: torch.Tensor, activation: Activation) -> torch.Tensor:
    if gate.numel() == 0:
        return gate.new_empty(gate.shape)
    g2, u2 = _as_rows(gate), _as_rows(up)
    if use_triton(op, g2, u2):
        h = _forward_triton(g2, u2, activation)
    else:
        h = _forward_torch(g2, u2, activation)
    return h.view(gate.shape)


def _glu_backward(
    op: str, dh: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, activation: Activation
) -> tuple[torch.Tensor, torch.Tensor]:
    if gate.numel() == 0:
        return gate.new_empty(gate.shape), up.new_empty(up.shape)
    g2, u2 = _as_rows(gate), _as_rows(up)
    dh2 = _as_rows(dh)
    dg2 = torch.empty(g2.shape, dtype=gate.dtype, device=gate.device)
    du2 = torch.empty(u2.shape, dtype=up.dtype, device=up.device)
    if use_triton(op, g2, u2):
        _backward_triton(dh2, g2, u2, activation, dg2, du2)
    else:
        _backward_torch(dh2, g2, u2, activation, dg2, du2)
    return dg2.view(gate.shape), du2.view(up.shape)


# ----------------------------------------------------------------------------------------------------------------
# Custom ops (with fake impls, so torch.compile and the meta-tensor memory model can trace them)
# ----------------------------------------------------------------------------------------------------------------
@torch.library.custom_op("fastft::swiglu_forward", mutates_args=())
def swiglu_forward(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """h = silu(gate) * up: [..., n] in gate.dtype, contiguous."""
    _check_pair("swiglu", gate, up)
    return _glu_forward("swiglu", gate, up, Activation.SILU)


@swiglu_forward.register_fake
def _(gate, up):
    return gate.new_empty(gate.shape)


@torch.library.custom_op("fastft::swiglu_backward", mutates_args=())
def swiglu_backward(dh: torch.Tensor, gate: torch.Tensor, up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(dgate, dup), new contiguous tensors in gate's/up's dtype; gate and up are not modified."""
    _check_pair("swiglu", gate, up)
    return _glu_backward("swiglu_backward", dh, gate, up, Activation.SILU)


@swiglu_backward.register_fake
def _(dh, gate, up):
    return gate.new_empty(gate.shape), up.new_empty(up.shape)


@torch.library.custom_op("fastft::geglu_forward", mutates_args=())
def geglu_forward(gate: torch.Tensor, up: torch.Tensor, approximate: str) -> torch.Tensor:
    """h = gelu(gate, approximate) * up: [..., n] in gate.dtype, contiguous. ``approximate``: "none" | "tanh"."""
    _check_pair("geglu", gate, up)
    return _glu_forward("geglu", gate, up, Activation.from_approximate(approximate))


@geglu_forward.register_fake
def _(gate, up, approximate):
    Activation.from_approximate(approximate)
    return gate.new_empty(gate.shape)


@torch.library.custom_op("fastft::geglu_backward", mutates_args=())
def geglu_backward(
    dh: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, approximate: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """(dgate, dup), new contiguous tensors in gate's/up's dtype; gate and up are not modified."""
    _check_pair("geglu", gate, up)
    return _glu_backward("geglu_backward", dh, gate, up, Activation.from_approximate(approximate))


@geglu_backward.register_fake
def _(dh, gate, up, approximate):
    Activation.from_approximate(approximate)
    return gate.new_empty(gate.shape), up.new_empty(up.shape)


@torch.library.custom_op("fastft::glu_backward_inplace", mutates_args=("gate", "up"))
def glu_backward_inplace(dh: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, activation: str) -> None:
    """Overwrite gate with dgate and up with dup (``activation``: "silu" | "gelu" | "gelu_tanh").

    Only for gate/up that nothing reads afterwards (see the module docstring); the caller checks
    :func:`can_overwrite`. Strided gate/up are written through their strides (no copy) when they view as rows.
    """
    _check_pair("glu_backward_inplace", gate, up)
    code = Activation.from_op_name(activation)
    if gate.numel() == 0:
        return
    g2, u2 = _as_rows(gate), _as_rows(up)
    dh2 = _as_rows(dh)
    # The outputs must be the very memory of gate/up; _as_rows may have copied a non-viewable tensor, so write
    # into a staging view and copy back in that case.
    dg2 = g2 if _shares_memory(g2, gate) else torch.empty_like(g2)
    du2 = u2 if _shares_memory(u2, up) else torch.empty_like(u2)
    if use_triton("glu_backward_inplace", g2, u2):
        _backward_triton(dh2, g2, u2, code, dg2, du2)
    else:
        _backward_torch(dh2, g2, u2, code, dg2, du2)
    if dg2 is not g2:
        gate.copy_(dg2.view(gate.shape))
    if du2 is not u2:
        up.copy_(du2.view(up.shape))


@glu_backward_inplace.register_fake
def _(dh, gate, up, activation):
    return None


def _shares_memory(view: torch.Tensor, t: torch.Tensor) -> bool:
    return view.untyped_storage()._cdata == t.untyped_storage()._cdata and view.storage_offset() == t.storage_offset()


def _element_range(t: torch.Tensor) -> tuple[int, int]:
    """[first, last] element offsets of t inside its storage (works for meta tensors, which have no data_ptr)."""
    extent = sum((size - 1) * stride for size, stride in zip(t.shape, t.stride(), strict=True))
    return t.storage_offset(), t.storage_offset() + extent


def can_overwrite(gate: torch.Tensor, up: torch.Tensor) -> bool:
    """Whether the in-place backward may write into gate/up at all: both are non-leaf (not user-owned) tensors
    whose memory does not overlap (disjoint halves of one buffer are fine). Whether anything else still needs them
    is the caller's promise (see the module docstring). Meta tensors answer the same way, so the meta-tensor memory
    model follows the real algorithm."""
    if gate.is_leaf or up.is_leaf:
        return False
    if gate.untyped_storage()._cdata != up.untyped_storage()._cdata:
        return True
    if gate.element_size() != up.element_size():
        return False
    g0, g1 = _element_range(gate)
    u0, u1 = _element_range(up)
    return g1 < u0 or u1 < g0


# ----------------------------------------------------------------------------------------------------------------
# Autograd and the public functions
# ----------------------------------------------------------------------------------------------------------------
def glu_op(gate: torch.Tensor, up: torch.Tensor, activation: Activation) -> torch.Tensor:
    """The forward custom op for ``activation``, outside autograd: h = act(gate) * up, [..., n] in gate.dtype."""
    if activation is Activation.SILU:
        return call_op(swiglu_forward, gate, up)
    return call_op(geglu_forward, gate, up, activation.approximate)


def glu_backward_op(
    dh: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, activation: Activation, inplace: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """The backward custom op for ``activation``, outside autograd: (dgate, dup). ``inplace``: write them over gate
    and up (two [..., n] fewer) and return those, for gate/up the caller knows nothing reads afterwards."""
    if inplace:
        call_op(glu_backward_inplace, dh, gate, up, activation.op_name)
        return gate, up
    if activation is Activation.SILU:
        return call_op(swiglu_backward, dh, gate, up)
    return call_op(geglu_backward, dh, gate, up, activation.approximate)


class GLUFunction(torch.autograd.Function):
    """Saves gate and up (no activation); the backward recomputes act(gate), optionally into gate/up's buffers."""

    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor, activation: Activation, inplace_backward: bool) -> torch.Tensor:
        h = glu_op(gate, up, activation)
        ctx.save_for_backward(gate, up)
        ctx.activation = activation
        # Decided at forward time, when leaf-ness is known; the buffers are the saved tensors themselves.
        ctx.inplace = inplace_backward and can_overwrite(gate, up)
        return h

    @staticmethod
    def backward(ctx, dh: torch.Tensor):
        gate, up = ctx.saved_tensors
        dgate, dup = glu_backward_op(dh, gate, up, ctx.activation, ctx.inplace)
        return (dgate if ctx.needs_input_grad[0] else None), (dup if ctx.needs_input_grad[1] else None), None, None


def glu(
    gate: torch.Tensor, up: torch.Tensor, activation: Activation | str, *, inplace_backward: bool = False
) -> torch.Tensor:
    """Fused gated activation: ``act(gate) * up``, the activation named by an :class:`Activation`.

    Args:
        gate, up: [..., n], same shape and dtype (fp32/bf16/fp16); rows may be strided.
        activation: SILU (SwiGLU), GELU or GELU_TANH (GeGLU), or any name :meth:`Activation.parse` takes.
        inplace_backward: write dgate/dup into gate's/up's buffers in the backward. Only when gate and up are
            temporaries nothing else reads afterwards (see the module docstring); ignored for leaf tensors.
    Returns:
        [..., n] in gate.dtype. Saves gate and up for the backward (no activation).
    """
    activation = Activation.parse(activation)
    _check_pair(activation.kernel, gate, up)
    if gate.numel() == 0:
        return gate.new_empty(gate.shape)
    if not needs_grad(gate, up):  # no graph to record (generation, eval): the forward op alone, same bits
        return glu_op(gate, up, activation)
    return GLUFunction.apply(gate, up, activation, bool(inplace_backward))


def swiglu(gate: torch.Tensor, up: torch.Tensor, *, inplace_backward: bool = False) -> torch.Tensor:
    """Fused SwiGLU: ``silu(gate) * up``.

    Args:
        gate, up: [..., n], same shape and dtype (fp32/bf16/fp16); rows may be strided.
        inplace_backward: as in :func:`glu`.
    Returns:
        [..., n] in gate.dtype. Saves gate and up for the backward (no activation).
    """
    return glu(gate, up, Activation.SILU, inplace_backward=inplace_backward)


def geglu(
    gate: torch.Tensor, up: torch.Tensor, approximate: str = "none", *, inplace_backward: bool = False
) -> torch.Tensor:
    """Fused GeGLU: ``gelu(gate, approximate) * up``.

    Args:
        gate, up: [..., n], same shape and dtype (fp32/bf16/fp16); rows may be strided.
        approximate: "none" (erf gelu, ``nn.GELU()``) or "tanh" (``gelu_pytorch_tanh``, Gemma).
        inplace_backward: as in :func:`glu`.
    Returns:
        [..., n] in gate.dtype. Saves gate and up for the backward (no activation).
    """
    return glu(gate, up, Activation.from_approximate(approximate), inplace_backward=inplace_backward)


def compile_cases() -> None:
    """Every launch variant: 3 dtypes x 3 activations, forward and backward (the in-place backward is the same
    kernel with aliased pointers)."""
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        gate = torch.empty(5, 3000, dtype=dtype)
        up = torch.empty(5, 3000, dtype=dtype)
        h = swiglu_forward(gate, up)
        swiglu_backward(h, gate, up)
        for approximate in ("none", "tanh"):
            h = geglu_forward(gate, up, approximate)
            geglu_backward(h, gate, up, approximate)
