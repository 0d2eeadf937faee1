"""GaLore: gradient low-rank projection optimizers (AdamW, 8-bit AdamW, Adafactor), written for fastft.

GaLore (Zhao et al. 2024, arXiv:2403.03507) keeps the optimizer state of a 2-D weight ``W`` (m x n) in a rank-r
subspace of its gradient: every ``update_proj_gap`` steps an orthonormal basis of the gradient's top-r singular
subspace is computed, the gradient is projected (``R = P^T G`` or ``R = G Q``), the base optimizer runs on ``R``, and
the step is projected back (``scale * P @ step(R)``). State per weight drops from ``2mn`` (Adam) to ``2rn + mr``
(moments on ``R`` plus the projector), which is what makes full fine-tuning of 7B models fit.

Written from the paper and our own contract, not from the reference code. Differences from the reference, on purpose:

* the projector and step counter live in ``optimizer.state[p]`` as plain tensors, so ``state_dict()`` /
  ``load_state_dict()`` (what the HF Trainer checkpoints) save and restore them and a resumed run continues exactly;
  ``load_state_dict`` keeps each state tensor's saved dtype (torch would cast fp32 moments to a bf16 param's dtype);
* the SVD runs in fp32; ``svd="auto"`` (default) uses a seeded randomized range finder (two power iterations,
  oversampling 8) when the rank is small next to the matrix -- the exact SVD of a 4096 x 11008 gradient costs far
  more than the step it serves -- and ``torch.linalg.svd`` otherwise; ``"exact"`` / ``"randomized"`` force one.
  The randomized path draws from its own generator seeded by the step, so it never disturbs the global RNG (dropout,
  data order) and is reproducible across a resume;
* an SVD that fails to converge (or returns non-finite values) keeps the previous projector and warns once, instead
  of turning the loss into NaN; a first-ever failure falls back to the randomized basis, then to a coordinate basis;
* a rank larger than the matrix allows is clamped to ``min(m, n)`` with a warning;
* layer-wise mode (``layerwise=True``) steps each parameter from a ``register_post_accumulate_grad_hook`` during the
  backward pass and frees its gradient there, so full gradients of different layers never coexist. The optimizer
  object stays a real optimizer (its ``step()`` is then a no-op): its param groups carry the learning rate, so the
  Trainer's ordinary LR scheduler drives it and ordinary checkpointing saves it -- unlike transformers' dummy
  optimizer, whose per-parameter schedulers and states are not checkpointed.

Parameters in groups without ``rank`` (norms, biases, embeddings, non-target weights) get the plain base optimizer
(AdamW / 8-bit AdamW / Adafactor) inside the same object.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch

from fastft._log import info_once, warn_once

PROJ_TYPES = ("std", "reverse_std", "left", "right", "full")
SVD_METHODS = ("auto", "exact", "randomized")
#: GaLore's hyperparameters and their defaults, the one place they are declared: transformers' for its galore_*
#: optims (rank 128, refresh every 200 steps, scale 0.25, "std" projection), plus fastft's SVD choice. The factory
#: reads them for ``optim_args``; a param group without ``rank`` (or rank None) is a plain, unprojected group.
GALORE_DEFAULTS: dict[str, Any] = {"rank": 128, "update_proj_gap": 200, "scale": 0.25, "proj_type": "std", "svd": "auto"}
_OVERSAMPLE = 8
_POWER_ITERS = 2


# ----------------------------------------------------------------------------------------------------------------------
# Orthonormal bases
# ----------------------------------------------------------------------------------------------------------------------


def _randomized_left_basis(a: torch.Tensor, rank: int, seed: int) -> torch.Tensor:
    """Top-``rank`` left singular vectors of fp32 ``a`` (m x n) by a randomized range finder; returns (m, rank)."""
    m, n = a.shape
    width = min(rank + _OVERSAMPLE, m, n)
    gen = torch.Generator(device=a.device).manual_seed(seed)
    omega = torch.randn(n, width, generator=gen, device=a.device, dtype=a.dtype)
    q = torch.linalg.qr(a @ omega).Q
    for _ in range(_POWER_ITERS):  # power iterations sharpen a slowly decaying spectrum (gradients have one)
        q = torch.linalg.qr(a.T @ q).Q
        q = torch.linalg.qr(a @ q).Q
    u_small, _, _ = torch.linalg.svd(q.T @ a, full_matrices=False)
    return (q @ u_small)[:, :rank]


def orthogonal_basis(matrix: torch.Tensor, rank: int, side: str, method: str = "exact", seed: int = 0) -> torch.Tensor:
    """Orthonormal basis of the top-``rank`` singular subspace of ``matrix`` (m x n), computed in fp32.

    ``side="left"`` returns U[:, :rank] (m x rank); ``side="right"`` returns V[:, :rank] (n x rank). ``method`` is
    "exact" (``torch.linalg.svd``) or "randomized". Raises ``torch.linalg.LinAlgError`` when the SVD fails.
    """
    a = matrix.detach().float()
    if side == "right":
        a = a.T
    if method == "randomized":
        basis = _randomized_left_basis(a, rank, seed)
    else:
        u, _, _ = torch.linalg.svd(a, full_matrices=False)
        basis = u[:, :rank]
    return basis.contiguous()


def _resolve_sides(proj_type: str, shape: torch.Size) -> tuple[str, ...]:
    m, n = shape
    if proj_type == "std":  # project the smaller dimension away: the projector is the small matrix
        return ("right",) if m >= n else ("left",)
    if proj_type == "reverse_std":
        return ("left",) if m >= n else ("right",)
    if proj_type == "full":
        return ("left", "right")
    return (proj_type,)


class GaLoreProjector:
    """Stateless helper: projects a gradient into / out of the subspace whose basis lives in ``state``.

    ``state`` is the optimizer's per-parameter dict; the projector writes ``proj_left`` (m x r) and/or ``proj_right``
    (n x r) there, in the parameter's dtype. Refreshes happen when ``step % update_proj_gap == 0`` (step counted
    before the increment, so the first step always builds a basis).
    """

    def __init__(
        self,
        rank: int,
        update_proj_gap: int = GALORE_DEFAULTS["update_proj_gap"],
        scale: float = GALORE_DEFAULTS["scale"],
        proj_type: str = GALORE_DEFAULTS["proj_type"],
        svd: str = GALORE_DEFAULTS["svd"],
    ) -> None:
        if proj_type not in PROJ_TYPES:
            raise ValueError(f"GaLore proj_type must be one of {PROJ_TYPES}, got {proj_type!r}")
        if svd not in SVD_METHODS:
            raise ValueError(f"GaLore svd must be one of {SVD_METHODS}, got {svd!r}")
        if int(rank) < 1 or int(update_proj_gap) < 1:
            raise ValueError(f"GaLore rank and update_proj_gap must be >= 1, got rank={rank}, gap={update_proj_gap}")
        self.rank, self.update_proj_gap, self.scale = int(rank), int(update_proj_gap), float(scale)
        self.proj_type, self.svd = proj_type, svd

    def effective_rank(self, shape: torch.Size) -> int:
        limit = min(shape)
        if self.rank > limit:
            warn_once(
                f"fastft GaLore: rank {self.rank} > min{tuple(shape)} = {limit}; clamped to {limit} "
                f"(the projection then keeps the full subspace and saves no memory on this weight)",
                key=f"galore-clamp-{self.rank}-{tuple(shape)}",
            )
            return limit
        return self.rank

    def sides(self, shape: torch.Size) -> tuple[str, ...]:
        return _resolve_sides(self.proj_type, shape)

    def init_state(self, p: torch.Tensor, state: dict[str, Any]) -> tuple[int, ...]:
        """Allocate the projector buffers (zeros; filled at the first step); returns the projected shape."""
        m, n = p.shape
        r = self.effective_rank(p.shape)
        sides = self.sides(p.shape)
        if "left" in sides:
            state["proj_left"] = torch.zeros(m, r, dtype=p.dtype, device=p.device)
        if "right" in sides:
            state["proj_right"] = torch.zeros(n, r, dtype=p.dtype, device=p.device)
        return (r if "left" in sides else m, r if "right" in sides else n)

    def _method(self, shape: torch.Size, r: int) -> str:
        if self.svd != "auto":
            return self.svd
        return "randomized" if (r + _OVERSAMPLE) * 4 <= min(shape) else "exact"

    def refresh(self, grad: torch.Tensor, state: dict[str, Any], step: int) -> None:
        """Recompute the basis from ``grad``; on failure keep the previous basis (warn once)."""
        for side in ("left", "right"):
            key = f"proj_{side}"
            if key not in state:
                continue
            r = state[key].shape[1]
            method = self._method(grad.shape, r)
            info_once(f"fastft GaLore: {method} SVD for {tuple(grad.shape)} rank {r}", key=f"galore-svd-{method}")
            first = step == 0
            basis = None
            try:
                basis = orthogonal_basis(grad, r, side, method, seed=step + 1)
                if not torch.isfinite(basis).all():
                    raise torch.linalg.LinAlgError("non-finite singular vectors")
            except (torch.linalg.LinAlgError, RuntimeError) as err:
                basis = None
                if not first:
                    warn_once(
                        f"fastft GaLore: SVD failed at step {step} for a {tuple(grad.shape)} gradient "
                        f"({err}); keeping the previous projector",
                        key="galore-svd-failed",
                    )
                else:  # no previous basis: any orthonormal basis keeps training finite until the next refresh
                    warn_once(
                        f"fastft GaLore: SVD failed on the first step for a {tuple(grad.shape)} gradient "
                        f"({err}); using a fallback basis until the next refresh",
                        key="galore-svd-failed",
                    )
                    try:
                        basis = orthogonal_basis(torch.nan_to_num(grad), r, side, "randomized", seed=step + 1)
                        if not torch.isfinite(basis).all():
                            basis = None
                    except (torch.linalg.LinAlgError, RuntimeError):
                        basis = None
                    if basis is None:
                        basis = torch.eye(state[key].shape[0], r, device=grad.device)
            if basis is not None:
                state[key].copy_(basis)

    @staticmethod
    def project(grad: torch.Tensor, state: dict[str, Any]) -> torch.Tensor:
        """(m, n) gradient -> projected fp32 tensor: P^T G, G Q, or P^T G Q."""
        r = grad
        if "proj_left" in state:
            r = state["proj_left"].to(grad.dtype).T @ r
        if "proj_right" in state:
            r = r @ state["proj_right"].to(grad.dtype)
        return r.float()

    def project_back(self, low: torch.Tensor, state: dict[str, Any], dtype: torch.dtype) -> torch.Tensor:
        """Projected update -> full (m, n) update in ``dtype``, times ``scale``."""
        full = low.to(dtype)
        if "proj_left" in state:
            full = state["proj_left"].to(dtype) @ full
        if "proj_right" in state:
            full = full @ state["proj_right"].to(dtype).T
        return full.mul_(self.scale) if full is not low else full * self.scale


# ----------------------------------------------------------------------------------------------------------------------
# Base class: projection bookkeeping, layer-wise hooks, dtype-preserving checkpoint load
# ----------------------------------------------------------------------------------------------------------------------

_GALORE_KEYS = tuple(GALORE_DEFAULTS)


class _GaLoreBase(torch.optim.Optimizer):
    """Shared machinery. Groups with ``rank`` set (not None) are GaLore groups; their params must be 2-D."""

    def __init__(self, params: Iterable, defaults: dict[str, Any], layerwise: bool = False) -> None:
        defaults = {**GALORE_DEFAULTS, "rank": None, **defaults}
        super().__init__(params, defaults)
        for group in self.param_groups:
            if group["rank"] is not None:
                GaLoreProjector(*(group[k] for k in _GALORE_KEYS))  # validate now, not at step 1
                for p in group["params"]:
                    if p.dim() != 2:
                        raise ValueError(f"GaLore groups take 2-D weights only; got a param of shape {tuple(p.shape)}")
        self.layerwise = False
        self._hooks: list[Any] = []
        if layerwise:
            self.enable_layerwise()

    # -- per-parameter protocol implemented by subclasses ----------------------------------------------------------
    def _init_param_state(
        self, p: torch.Tensor, group: dict[str, Any], state: dict[str, Any], shape: tuple[int, ...]
    ) -> None:
        raise NotImplementedError

    def _unit_update(self, r: torch.Tensor, group: dict[str, Any], state: dict[str, Any], step: int) -> torch.Tensor:
        """Return the base optimizer's update direction on ``r`` (fp32, same shape), before ``-lr`` (Adam) or final."""
        raise NotImplementedError

    _update_includes_lr = False  # Adafactor's update already carries lr (its clipping acts on the lr-free RMS)

    def _decay_after_step(self, group: dict[str, Any]) -> bool:
        """Whether decoupled weight decay scales the weight after the step (galore-torch's AdamW) or before (torch)."""
        return False

    # -- state -----------------------------------------------------------------------------------------------------
    @staticmethod
    def _projector(group: dict[str, Any]) -> GaLoreProjector | None:
        if group["rank"] is None:
            return None
        return GaLoreProjector(*(group[k] for k in _GALORE_KEYS))

    def _init_state(self, p: torch.Tensor, group: dict[str, Any]) -> dict[str, Any]:
        state = self.state[p]
        # step lives on the CPU (as in torch.optim.AdamW): reading it each step is then free, not a device sync
        state["step"] = torch.zeros((), dtype=torch.float32)
        proj = self._projector(group)
        shape = proj.init_state(p, state) if proj is not None else tuple(p.shape)
        self._init_param_state(p, group, state, shape)
        return state

    def materialize_state(self) -> None:
        """Allocate every parameter's state now (works on meta tensors): used to model optimizer-state memory."""
        for group in self.param_groups:
            for p in group["params"]:
                if not self.state[p]:
                    self._init_state(p, group)

    def state_bytes(self) -> int:
        """Bytes held by all state tensors (projectors included)."""
        return sum(
            v.numel() * v.element_size() for s in self.state.values() for v in s.values() if isinstance(v, torch.Tensor)
        )

    # -- stepping --------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def _step_param(self, p: torch.Tensor, group: dict[str, Any]) -> None:
        grad = p.grad
        if grad.is_sparse:
            raise RuntimeError("fastft GaLore optimizers do not support sparse gradients")
        state = self.state[p] if self.state[p] else self._init_state(p, group)
        step = int(state["step"].item())
        proj = self._projector(group)
        if proj is not None:
            if step % proj.update_proj_gap == 0:
                proj.refresh(grad, state, step)
            r = proj.project(grad, state)
        else:
            r = grad.float()
        state["step"] += 1
        update = self._unit_update(r, group, state, step + 1)
        lr, wd = group["lr"], group["weight_decay"]
        decay_after = self._decay_after_step(group)
        if wd and not decay_after:
            p.mul_(1.0 - lr * wd)  # decoupled, on the full weight
        full = proj.project_back(update, state, p.dtype) if proj is not None else update.to(p.dtype)
        p.add_(full, alpha=-1.0 if self._update_includes_lr else -lr)
        if wd and decay_after:
            p.mul_(1.0 - lr * wd)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self.layerwise:  # parameters were already stepped by their post-accumulate-grad hooks
            return loss
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self._step_param(p, group)
        return loss

    # -- layer-wise mode -------------------------------------------------------------------------------------------
    def enable_layerwise(self) -> None:
        """Step each parameter as soon as its gradient is accumulated, then free that gradient."""
        if self.layerwise:
            return
        # Map to the group's index, not the dict: load_state_dict (ours on resume, accelerate's on device placement)
        # replaces the group dicts, and the LR scheduler writes the new ones.
        group_of = {p: i for i, g in enumerate(self.param_groups) for p in g["params"]}

        def hook(p: torch.Tensor) -> None:
            if p.grad is None:
                return
            self._step_param(p, self.param_groups[group_of[p]])
            p.grad = None

        for p in group_of:
            if p.requires_grad:
                self._hooks.append(p.register_post_accumulate_grad_hook(hook))
        self.layerwise = True
        info_once(f"fastft: layer-wise {type(self).__name__} ({len(self._hooks)} hooked params)", key="galore-lw")

    def disable_layerwise(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        self.layerwise = False

    def zero_grad(self, set_to_none: bool = True) -> None:
        if not self.layerwise:
            super().zero_grad(set_to_none)

    # -- checkpointing ---------------------------------------------------------------------------------------------
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Standard load, then put back each state tensor with its saved dtype.

        torch casts floating state to the param's dtype on load, which would round fp32 moments of a bf16 weight to
        bf16 (and the resumed run would drift); we re-copy the saved tensors onto the param's device unchanged.
        """
        super().load_state_dict(state_dict)
        index_to_param = [p for g in self.param_groups for p in g["params"]]
        for idx, entries in state_dict["state"].items():
            p = index_to_param[int(idx)]
            st = self.state[p]
            for key, value in entries.items():
                if isinstance(value, torch.Tensor) and key != "step":
                    st[key] = value.to(device=p.device, copy=True)


def _check_common(lr: float, weight_decay: float) -> None:
    if lr < 0 or weight_decay < 0:
        raise ValueError(f"lr and weight_decay must be >= 0, got lr={lr}, weight_decay={weight_decay}")


class GaLoreAdamW(_GaLoreBase):
    """AdamW whose ``rank`` groups keep their moments in GaLore's projected space: galore-torch 1.0's update.

    Registered under transformers' name ``galore_adamw`` (transformers builds ``galore_torch.GaLoreAdamW`` for it), so
    it takes the same step, on every group: ``R = project(G)``; Adam moments ``m, v`` on ``R``;
    ``W -= lr * sqrt(1 - beta2^t) / (1 - beta1^t) * scale * project_back(m / (sqrt(v) + eps))``; then
    ``W -= lr * wd * W``. That is transformers' (deprecated) AdamW, which galore-torch copies: eps is added to the
    uncorrected ``sqrt(v)`` and the bias corrections are folded into the step size -- unlike torch.optim.AdamW, which
    adds eps to ``sqrt(v_hat)`` and decays before the step. The two differ by ``eps * (1 / sqrt(1 - beta2^t) - 1)`` in
    the denominator (largest in the first steps, and when ``v`` is near eps) and by a second-order decay term.
    tests/optim/test_galore_reference.py compares step by step with galore-torch.
    """

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        layerwise: bool = False,
        **galore: Any,
    ) -> None:
        _check_common(lr, weight_decay)
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, **galore), layerwise)

    def _init_param_state(self, p, group, state, shape):
        state["exp_avg"] = torch.zeros(shape, dtype=torch.float32, device=p.device)
        state["exp_avg_sq"] = torch.zeros(shape, dtype=torch.float32, device=p.device)

    def _moments(self, state):
        return state["exp_avg"], state["exp_avg_sq"]

    def _store_moments(self, state, exp_avg, exp_avg_sq):
        pass

    _eps_on_corrected_root = False  # galore-torch / transformers' AdamW: eps on the uncorrected sqrt(v)

    def _decay_after_step(self, group):
        return True  # galore-torch's AdamW decays every group after its step

    def _unit_update(self, r, group, state, step):
        beta1, beta2 = group["betas"]
        exp_avg, exp_avg_sq = self._moments(state)
        exp_avg.mul_(beta1).add_(r, alpha=1.0 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(r, r, value=1.0 - beta2)
        bc1, bc2 = 1.0 - beta1**step, 1.0 - beta2**step
        if self._eps_on_corrected_root:  # torch.optim.AdamW / bitsandbytes: m_hat / (sqrt(v_hat) + eps)
            update = exp_avg / (exp_avg_sq.sqrt() / math.sqrt(bc2)).add_(group["eps"]) / bc1
        else:  # galore-torch: m / (sqrt(v) + eps), bias corrections folded into the step size
            update = (exp_avg / exp_avg_sq.sqrt().add_(group["eps"])).mul_(math.sqrt(bc2) / bc1)
        self._store_moments(state, exp_avg, exp_avg_sq)
        return update


class GaLoreAdamW8bit(GaLoreAdamW):
    """GaLore AdamW with both moments stored 8-bit, blockwise-quantized (bitsandbytes dynamic maps, blocks of 256).

    The update follows galore-torch 1.0's ``GaLoreAdamW8bit`` (transformers' ``galore_adamw_8bit``), which runs
    bitsandbytes' 8-bit Adam on the projected gradient: bitsandbytes places eps as torch.optim.AdamW does
    (``sqrt(v_hat) + eps``) and decays plain groups before the step, while galore-torch decays projected weights after
    the back-projected step. (galore-torch's 8-bit optimizer calls ``torch.cuda.synchronize`` every step, so it is
    not run as a CPU test oracle; the fp32 math it shares with :class:`GaLoreAdamW` is.)

    Each step dequantizes a parameter's moments to fp32, runs the AdamW math, and requantizes -- the same storage
    format as bitsandbytes' blockwise 8-bit Adam (signed map for m, unsigned for v, one fp32 absmax per block).
    bitsandbytes' fused 8-bit update writes into the parameter, which does not fit a back-projected step, so we use
    its ``quantize_blockwise`` / ``dequantize_blockwise`` pieces. Tensors with fewer than ``min_8bit_size`` elements
    keep fp32 moments (bitsandbytes' default of 4096 too), and so do groups with ``optim_bits=32`` (create_optimizer
    puts the embedding group there by default, as transformers does for bitsandbytes 8-bit optimizers).
    """

    BLOCKSIZE = 256
    _codes: dict[tuple[str, bool], torch.Tensor] = {}
    _eps_on_corrected_root = True  # bitsandbytes' Adam kernels

    def _decay_after_step(self, group):
        return group["rank"] is not None  # projected weights after the step (galore-torch), plain ones before (bnb)

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        layerwise: bool = False,
        min_8bit_size: int = 4096,
        **galore: Any,
    ) -> None:
        import bitsandbytes.functional  # noqa: F401  (fail at construction if bitsandbytes is missing)

        self.min_8bit_size = int(min_8bit_size)
        super().__init__(params, lr, betas, eps, weight_decay, layerwise, **galore)

    @classmethod
    def _code(cls, device: torch.device, signed: bool) -> torch.Tensor:
        key = (str(device), signed)
        if key not in cls._codes:
            from bitsandbytes.functional import create_dynamic_map

            cls._codes[key] = create_dynamic_map(signed=signed).to(device)
        return cls._codes[key]

    def _init_param_state(self, p, group, state, shape):
        numel = math.prod(shape)
        if numel < self.min_8bit_size or group.get("optim_bits", 8) == 32:
            return super()._init_param_state(p, group, state, shape)
        nblocks = -(-numel // self.BLOCKSIZE)
        for name in ("exp_avg", "exp_avg_sq"):
            state[name] = torch.zeros(shape, dtype=torch.uint8, device=p.device)
            state[name + "_absmax"] = torch.zeros(nblocks, dtype=torch.float32, device=p.device)
        # all-zero absmax decodes to zeros whatever the codes are, so a fresh state needs no fill

    def _moments(self, state):
        if state["exp_avg"].dtype != torch.uint8:
            return state["exp_avg"], state["exp_avg_sq"]
        from bitsandbytes.functional import dequantize_blockwise

        out = []
        for name, signed in (("exp_avg", True), ("exp_avg_sq", False)):
            q = state[name]
            deq = dequantize_blockwise(
                q.reshape(-1), absmax=state[name + "_absmax"], code=self._code(q.device, signed), blocksize=self.BLOCKSIZE
            )
            out.append(deq.reshape(q.shape).float())
        return out[0], out[1]

    def _store_moments(self, state, exp_avg, exp_avg_sq):
        if state["exp_avg"].dtype != torch.uint8:
            return
        from bitsandbytes.functional import quantize_blockwise

        for name, signed, value in (("exp_avg", True, exp_avg), ("exp_avg_sq", False, exp_avg_sq)):
            q, qs = quantize_blockwise(value.reshape(-1), code=self._code(value.device, signed), blocksize=self.BLOCKSIZE)
            state[name].copy_(q.reshape(state[name].shape))
            state[name + "_absmax"].copy_(qs.absmax)


class GaLoreAdafactor(_GaLoreBase):
    """Adafactor (external lr, no relative step / parameter scaling) whose second moment is factored on ``R``.

    For a 2-D ``R`` (every GaLore weight) the second moment is a row vector plus a column vector; 1-D params keep a
    full second moment. ``beta1`` (default None) adds a first moment on ``R``. Update clipping at ``clip_threshold``
    RMS, decay ``1 - step**decay_rate``, eps ``(1e-30, 1e-3)`` for the squared-gradient floor -- Shazeer & Stern's
    defaults, as transformers' Adafactor uses them.
    """

    _update_includes_lr = True

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        eps: tuple[float, float] = (1e-30, 1e-3),
        clip_threshold: float = 1.0,
        decay_rate: float = -0.8,
        beta1: float | None = None,
        weight_decay: float = 0.0,
        layerwise: bool = False,
        **galore: Any,
    ) -> None:
        _check_common(lr, weight_decay)
        super().__init__(
            params,
            dict(
                lr=lr,
                eps=tuple(eps),
                clip_threshold=clip_threshold,
                decay_rate=decay_rate,
                beta1=beta1,
                weight_decay=weight_decay,
                **galore,
            ),
            layerwise,
        )

    def _init_param_state(self, p, group, state, shape):
        kw = dict(dtype=torch.float32, device=p.device)
        if len(shape) >= 2:
            state["exp_avg_sq_row"] = torch.zeros(shape[:-1], **kw)
            state["exp_avg_sq_col"] = torch.zeros(shape[:-2] + shape[-1:], **kw)
        else:
            state["exp_avg_sq"] = torch.zeros(shape, **kw)
        if group["beta1"] is not None:
            state["exp_avg"] = torch.zeros(shape, **kw)

    def _unit_update(self, r, group, state, step):
        beta2t = 1.0 - step ** group["decay_rate"]
        sq = r * r + group["eps"][0]
        if "exp_avg_sq_row" in state:
            row, col = state["exp_avg_sq_row"], state["exp_avg_sq_col"]
            row.mul_(beta2t).add_(sq.mean(dim=-1), alpha=1.0 - beta2t)
            col.mul_(beta2t).add_(sq.mean(dim=-2), alpha=1.0 - beta2t)
            r_factor = (row / row.mean(dim=-1, keepdim=True)).rsqrt().unsqueeze(-1)
            update = r_factor * col.rsqrt().unsqueeze(-2) * r
        else:
            v = state["exp_avg_sq"]
            v.mul_(beta2t).add_(sq, alpha=1.0 - beta2t)
            update = v.rsqrt() * r
        rms = update.norm() / math.sqrt(update.numel())
        update.div_((rms / group["clip_threshold"]).clamp_(min=1.0)).mul_(group["lr"])  # tensor op: no device sync
        if group["beta1"] is not None:
            m = state["exp_avg"]
            m.lerp_(update, 1.0 - group["beta1"])
            update = m.clone()
        return update
