"""Host-side math of the cross-entropy family (cross_entropy, linear_cross_entropy, selective_log_softmax): the
options, the reference, label checks, and the per-row algebra that turns kernel statistics into losses and losses'
gradients into the three per-row coefficients the gradient kernel takes. No kernels here: everything is [N]-sized.

Per-row loss, for a row i with target y (f = the transformed fp32 logits, lse = logsumexp f, V classes, class
weights w (all 1 when not given), W = sum_j w_j, label smoothing eps, z-loss scale s):
    ce_i = (1 - eps) * w_y * (lse - f_y) + (eps / V) * (W * lse - sum_j w_j f_j)
    z_i  = s * lse^2
which is ``F.cross_entropy(f, y, weight=w, label_smoothing=eps, reduction="none")`` plus the z-loss of PaLM /
Liger's ``lse_square_scale``. Ignored rows contribute 0 to both. Reductions (torch's semantics for ce, Liger's for z):
    "mean": sum ce_i / sum_{valid} w_y  +  sum z_i / #valid      (a zero denominator divides by 1: all-ignored is 0)
    "sum":  sum ce_i + sum z_i;   with n_items (transformers' num_items_in_batch) both sums are divided by n_items
    "none": ce_i + z_i per row.
Gradient of a_i * ce_i + b_i * z_i with respect to f_ij (p = softmax f), as three per-row coefficients:
    d/df_j = A_i p_j - B_i [j == y] - C_i w_j
    A = a ((1 - eps) w_y + eps W / V) + 2 b s lse,   B = a (1 - eps) w_y,   C = a eps / V
(without any option A = B = a: the usual ``a (p - onehot)``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, NamedTuple, TypedDict

import torch

from fastft.kernels._launch import option_kwargs

if TYPE_CHECKING:
    from typing_extensions import Unpack  # typing.Unpack from Python 3.11

REDUCTIONS = ("mean", "sum", "none")


def fold_transform(
    softcap: float | None, logit_scale: float | None, temperature: float = 1.0
) -> tuple[bool, bool, float, float]:
    """(SOFTCAP, SCALE, scale, cap) for the kernels; see cross_entropy's module docstring."""
    if softcap is not None and not softcap > 0:
        raise ValueError(f"softcap must be positive, got {softcap}")
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    s = 1.0 if logit_scale is None else float(logit_scale)
    if softcap is not None:
        return True, False, s / float(softcap), float(softcap) / temperature
    s = s / temperature
    return False, s != 1.0, s, 1.0


@dataclasses.dataclass(frozen=True)
class CrossEntropyOptions:
    """The non-tensor options of a cross-entropy op, validated once at construction.

    ignore_index: label value whose rows count for nothing. softcap / logit_scale / temperature: the logit transform
    ``softcap * tanh(logit_scale * x / softcap) / temperature`` (each only when given). label_smoothing: torch's
    ``label_smoothing`` in [0, 1]. lse_square_scale: z-loss weight s >= 0 (adds ``s * logsumexp(f)^2`` per row).
    """

    ignore_index: int = -100
    softcap: float | None = None
    logit_scale: float | None = None
    temperature: float = 1.0
    label_smoothing: float = 0.0
    lse_square_scale: float = 0.0

    def __post_init__(self) -> None:
        fold_transform(self.softcap, self.logit_scale, self.temperature)
        if not 0.0 <= self.label_smoothing <= 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1], got {self.label_smoothing}")
        if not (self.lse_square_scale >= 0.0 and math.isfinite(self.lse_square_scale)):
            raise ValueError(f"lse_square_scale must be finite and >= 0, got {self.lse_square_scale}")
        # Normalize the types the custom ops' schemas declare (an int ignore_index, plain floats).
        object.__setattr__(self, "ignore_index", int(self.ignore_index))
        object.__setattr__(self, "temperature", float(self.temperature))
        object.__setattr__(self, "label_smoothing", float(self.label_smoothing))
        object.__setattr__(self, "lse_square_scale", float(self.lse_square_scale))

    @property
    def fold(self) -> tuple[bool, bool, float, float]:
        return fold_transform(self.softcap, self.logit_scale, self.temperature)

    @property
    def smoothing(self) -> bool:
        return self.label_smoothing > 0.0

    @property
    def z_loss(self) -> bool:
        return self.lse_square_scale > 0.0

    def op_kwargs(self) -> dict:
        """The options as the custom ops' keyword arguments (the ops' schemas take them one by one)."""
        return option_kwargs(self)


class LossOptions(TypedDict, total=False):
    """The keyword options of ``cross_entropy`` and ``linear_cross_entropy`` and their references, declared once
    (defaults in brackets; the transform and loss defaults are :class:`CrossEntropyOptions`').

    ignore_index [-100]: label value whose rows count for nothing.
    softcap [None]: Gemma-2 final-logit softcap (``softcap * tanh(logits / softcap)``), applied after ``logit_scale``.
    logit_scale [None]: Cohere/Granite multiplier on the logits.
    reduction ["mean"]: "mean" (over non-ignored labels -- weighted by their class weight --, or ``/ n_items``), "sum"
        (``/ n_items`` if given) or "none".
    n_items [None]: the target-token count across gradient-accumulation micro-batches (transformers'
        ``num_items_in_batch``).
    class_weight [None]: [V] floating, ``F.cross_entropy``'s ``weight`` (not differentiated).
    label_smoothing [0.0]: ``F.cross_entropy``'s, in [0, 1].
    lse_square_scale [0.0]: z-loss weight: adds ``lse_square_scale * logsumexp^2`` per non-ignored row (unweighted;
        "mean" divides its sum by the number of non-ignored rows).
    """

    ignore_index: int
    softcap: float | None
    logit_scale: float | None
    reduction: str
    n_items: int | torch.Tensor | None
    class_weight: torch.Tensor | None
    label_smoothing: float
    lse_square_scale: float


#: LossOptions' names (a constant tuple: torch.compile traces resolve_loss_options).
LOSS_OPTION_NAMES = tuple(LossOptions.__annotations__)
_REDUCTION_OPTIONS = ("reduction", "n_items", "class_weight")


class LossCall(NamedTuple):
    """:class:`LossOptions` resolved: defaults filled in, values checked. ``class_weight`` is as given (the public
    ops check it against the vocab with :func:`check_class_weight`)."""

    options: CrossEntropyOptions
    reduction: str
    n_items: int | torch.Tensor | None
    class_weight: torch.Tensor | None


def resolve_loss_options(op: str, kwargs: Mapping[str, Any]) -> LossCall:
    """Check ``op``'s :class:`LossOptions` keyword arguments and fill in the defaults, before any work."""
    for name in kwargs:
        if name not in LOSS_OPTION_NAMES:
            known = ", ".join(LOSS_OPTION_NAMES)
            raise TypeError(f"{op}() got an unexpected keyword argument {name!r}; its options: {known}")
    reduction = kwargs.get("reduction", "mean")
    check_reduction(reduction)
    n_items = kwargs.get("n_items")
    if n_items is not None and reduction == "none":
        raise ValueError("n_items divides a summed loss; it has no meaning with reduction='none'")
    options = CrossEntropyOptions(**{k: v for k, v in kwargs.items() if k not in _REDUCTION_OPTIONS})
    return LossCall(options, reduction, n_items, kwargs.get("class_weight"))


# ----------------------------------------------------------------------------------------------------------------
# Reference: the plain math on full fp32 logits, differentiable by autograd. The test oracle.
# ----------------------------------------------------------------------------------------------------------------
def transform_reference(
    logits: torch.Tensor, softcap: float | None = None, logit_scale: float | None = None, temperature: float = 1.0
) -> torch.Tensor:
    """Upcast to fp32, then scale, softcap and temperature in the order Hugging Face / TRL apply them."""
    z = logits.float()
    if logit_scale is not None:
        z = z * logit_scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    if temperature != 1.0:
        z = z / temperature
    return z


def cross_entropy_reference(logits: torch.Tensor, labels: torch.Tensor, **options: Unpack[LossOptions]) -> torch.Tensor:
    """The family's test oracle: ``F.cross_entropy`` (+ the z-loss term, see the module docstring) on the transformed
    fp32 logits [N, V], labels [N], with transformers' semantics for n_items.

    All-ignored "mean" gives NaN here, as in torch; the fused ops return 0 (see cross_entropy's module docstring).
    """
    call = resolve_loss_options("cross_entropy_reference", options)
    o = call.options
    z = transform_reference(logits, o.softcap, o.logit_scale)
    cw = None if call.class_weight is None else call.class_weight.float()
    ce_kw = dict(weight=cw, ignore_index=o.ignore_index, label_smoothing=o.label_smoothing)
    valid = labels != o.ignore_index
    z_rows = o.lse_square_scale * torch.where(valid, torch.logsumexp(z, -1), 0.0) ** 2
    if call.n_items is not None:
        ce = torch.nn.functional.cross_entropy(z, labels, reduction="sum", **ce_kw)
        return (ce + z_rows.sum()) / call.n_items if o.lse_square_scale else ce / call.n_items
    ce = torch.nn.functional.cross_entropy(z, labels, reduction=call.reduction, **ce_kw)
    if not o.lse_square_scale:
        return ce
    if call.reduction == "none":
        return ce + z_rows
    return ce + (z_rows.sum() / valid.sum() if call.reduction == "mean" else z_rows.sum())


# ----------------------------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------------------------
def check_reduction(reduction: str) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")


def check_labels(name: str, labels: torch.Tensor, n_classes: int, ignore_index: int | None) -> torch.Tensor:
    """int64 labels; raises (before any kernel runs) if one lies outside [0, n_classes) and is not ignore_index.

    The kernels never read outside a row anyway (the target is picked up by comparison, not a gather), but a bad label
    would silently yield a wrong loss, so it is an error. This check syncs with the GPU once per call; it is skipped
    on meta tensors and while torch.compile traces (a data-dependent branch would break the graph).
    """
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor, got {labels.dtype}")
    labels = labels.long()
    if labels.device.type != "meta" and labels.numel() and not torch.compiler.is_compiling():
        bad = (labels < 0) | (labels >= n_classes)
        if ignore_index is not None:
            bad &= labels != ignore_index
        if bool(bad.any()):
            first = labels[bad][0].item()
            raise ValueError(
                f"{name} holds {int(bad.sum())} value(s) outside [0, {n_classes}) that are not ignore_index="
                f"{ignore_index} (first: {first})"
            )
    return labels


def check_class_weight(class_weight: torch.Tensor | None, n_classes: int, device: torch.device) -> torch.Tensor | None:
    """F.cross_entropy's ``weight``: a floating [V] tensor on the logits' device, returned as contiguous fp32. Like
    torch, it is not differentiated (a class weight that requires grad is an error, not a silent constant)."""
    if class_weight is None:
        return None
    if not class_weight.dtype.is_floating_point:
        raise TypeError(f"class_weight must be a floating tensor, got {class_weight.dtype}")
    if tuple(class_weight.shape) != (n_classes,):
        raise ValueError(f"class_weight must be [{n_classes}] (one weight per class); got {tuple(class_weight.shape)}")
    if class_weight.device != device:
        raise ValueError(f"class_weight on {class_weight.device} but the logits/hidden on {device}")
    if class_weight.requires_grad and torch.is_grad_enabled():
        raise ValueError(
            "class_weight requires grad, but the loss is not differentiated with respect to it "
            "(nor is torch's); pass class_weight.detach()"
        )
    return class_weight.detach().float().contiguous()


# ----------------------------------------------------------------------------------------------------------------
# Per-row algebra
# ----------------------------------------------------------------------------------------------------------------
class RowWeights(NamedTuple):
    """d(reduced loss)/d(ce_i) and d(reduced loss)/d(z_i) per row [N] fp32 (0 at ignored rows)."""

    valid: torch.Tensor
    ce: torch.Tensor
    z: torch.Tensor


def _target_weight(labels: torch.Tensor, valid: torch.Tensor, class_weight: torch.Tensor | None) -> torch.Tensor:
    """w_y per row (fp32; 1 without class weights, 0 at ignored rows)."""
    if class_weight is None:
        return valid.float()
    return torch.where(valid, class_weight[torch.where(valid, labels, 0)], 0.0)


def _denominator(total: torch.Tensor) -> torch.Tensor:
    # A zero denominator (every row ignored, or every target weighing 0) divides by 1: the loss is 0, not NaN.
    return torch.where(total == 0, torch.ones_like(total), total)


def row_weights(
    labels: torch.Tensor,
    ignore_index: int,
    reduction: str,
    n_items: int | float | torch.Tensor | None,
    class_weight: torch.Tensor | None = None,
) -> RowWeights | None:
    """The reduction as per-row weights of ce_i and z_i, for "mean" / "sum" (see the module docstring); None for
    "none" (the per-row losses themselves: nothing to weigh)."""
    if reduction == "none":
        if n_items is not None:
            raise ValueError("n_items divides a summed loss; it has no meaning with reduction='none'")
        return None
    valid = labels != ignore_index
    ones = valid.float()
    if n_items is not None:
        if isinstance(n_items, torch.Tensor):
            denom = n_items.to(device=labels.device, dtype=torch.float32).clamp_min(1.0)
        else:
            if n_items <= 0:
                raise ValueError(f"n_items must be positive, got {n_items}")
            denom = float(n_items)
        scaled = ones / denom
        return RowWeights(valid, scaled, scaled)
    if reduction == "mean":
        z = ones / _denominator(ones.sum())
        ce = z if class_weight is None else ones / _denominator(_target_weight(labels, valid, class_weight).sum())
        return RowWeights(valid, ce, z)
    return RowWeights(valid, ones, ones)


def row_losses(
    lse: torch.Tensor,
    tgt: torch.Tensor,
    sumf: torch.Tensor,
    labels: torch.Tensor,
    options: CrossEntropyOptions,
    class_weight: torch.Tensor | None,
    n_classes: int,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(ce [N], z [N] or None) fp32 from the kernel statistics lse, f_y (tgt) and sum_j w_j f_j (sumf, smoothing
    only); 0 at ignored rows."""
    valid = labels != options.ignore_index
    nll = torch.where(valid, lse - tgt, 0.0)
    if class_weight is not None:
        nll = nll * _target_weight(labels, valid, class_weight)
    ce = nll
    if options.smoothing:
        eps = options.label_smoothing
        total = float(n_classes) if class_weight is None else class_weight.sum()
        smooth = torch.where(valid, total * lse - sumf, 0.0)
        ce = (1.0 - eps) * nll + (eps / n_classes) * smooth
    z = torch.where(valid, options.lse_square_scale * lse * lse, 0.0) if options.z_loss else None
    return ce, z


def reduce_rows(ce: torch.Tensor, z: torch.Tensor | None, weights: RowWeights | None) -> torch.Tensor:
    """The loss from the per-row terms of :func:`row_losses`: ``ce + z`` per row without weights (reduction "none"),
    else the sum of each term times its :func:`row_weights` weight."""
    if weights is None:
        return ce if z is None else ce + z
    return (ce * weights.ce).sum() + (0.0 if z is None else (z * weights.z).sum())


class GradCoefficients(NamedTuple):
    """A, B [N] fp32 and C [N] fp32 or None (no smoothing): d/df_j = A p_j - B [j == y] - C w_j."""

    p: torch.Tensor
    target: torch.Tensor
    smooth: torch.Tensor | None


def grad_coefficients(
    lse: torch.Tensor,
    labels: torch.Tensor,
    d_ce: torch.Tensor,
    d_z: torch.Tensor | None,
    options: CrossEntropyOptions,
    class_weight: torch.Tensor | None,
    n_classes: int,
) -> GradCoefficients:
    """The three gradient coefficients of ``sum_i d_ce_i * ce_i + d_z_i * z_i`` (see the module docstring)."""
    d_ce = d_ce.float()
    if not options.smoothing and not options.z_loss and class_weight is None:
        return GradCoefficients(d_ce, d_ce, None)  # the plain case: one array serves as A and B
    valid = labels != options.ignore_index
    eps = options.label_smoothing
    a = torch.where(valid, d_ce, 0.0)
    wy = _target_weight(labels, valid, class_weight)
    target = a * ((1.0 - eps) * wy) if (eps or class_weight is not None) else a
    p = target
    smooth = None
    if options.smoothing:
        total = float(n_classes) if class_weight is None else class_weight.sum()
        p = target + a * (eps * total / n_classes)
        smooth = a * (eps / n_classes)
    if options.z_loss and d_z is not None:
        p = p + torch.where(valid, d_z.float(), 0.0) * (2.0 * options.lse_square_scale) * lse
    return GradCoefficients(p.contiguous(), target.contiguous(), None if smooth is None else smooth.contiguous())
