"""The gated-MLP activations fastft fuses, as one vocabulary: every name a model config or a caller may use, and the
code the GLU kernels take, are read and written here and nowhere else.

``Activation`` members are the three activations of :mod:`fastft.kernels.glu` (``h = act(gate) * up``); a member's
value is the ``ACTIVATION`` constexpr the Triton kernels and the torch path branch on. Names:

- Hugging Face ``hidden_act`` / ``hidden_activation`` strings (``silu``, ``swish``, ``gelu``, ``gelu_pytorch_tanh``,
  ``gelu_new``): :meth:`Activation.from_config`, the only ones a model row is patched for;
- names a caller of the fused LoRA MLP may also pass (the kernel family ``swiglu`` / ``geglu``, ``gelu_tanh``,
  ``geglu_tanh``): :meth:`Activation.parse`;
- the custom ops' string arguments (custom ops take no enums): :attr:`Activation.op_name` for
  ``glu_backward_inplace`` and :attr:`Activation.approximate` for the ``geglu_*`` ops.

The torch math of each activation (reference, torch path, derivative) lives with the kernels in ``glu.py``.
"""

from __future__ import annotations

import enum


class Activation(enum.Enum):
    """One gated-MLP activation; ``value`` is the kernel's ``ACTIVATION`` constexpr."""

    SILU = 0  # silu(g) = g * sigmoid(g): SwiGLU
    GELU = 1  # erf gelu: GeGLU, nn.GELU()
    GELU_TANH = 2  # tanh-approximated gelu: GeGLU, gelu_pytorch_tanh (Gemma)

    @property
    def op_name(self) -> str:
        """``"silu"`` | ``"gelu"`` | ``"gelu_tanh"``: the string ``torch.ops.fastft.glu_backward_inplace`` takes."""
        return self.name.lower()

    @property
    def kernel(self) -> str:
        """``"swiglu"`` | ``"geglu"``: the op family, as ``path_counts`` and the patch report name it."""
        return "swiglu" if self is Activation.SILU else "geglu"

    @property
    def approximate(self) -> str:
        """``F.gelu``'s ``approximate`` argument (``"none"`` | ``"tanh"``), which the ``geglu_*`` ops take; "none"
        for SILU, which no geglu op receives."""
        return "tanh" if self is Activation.GELU_TANH else "none"

    @classmethod
    def from_config(cls, name: object) -> Activation | None:
        """The member a Hugging Face config's activation string names, or None when fastft has no kernel for it
        (``gelu_fast``, ``relu``, ...: the MLP then stays transformers')."""
        return _CONFIG_NAMES.get(name) if isinstance(name, str) else None

    @classmethod
    def parse(cls, name: str | Activation) -> Activation:
        """A member, or any name for one (config names and ``swiglu`` / ``geglu`` / ``gelu_tanh`` / ``geglu_tanh``).

        Raises:
            ValueError: an unknown name, listing the accepted ones.
        """
        return name if isinstance(name, Activation) else _lookup(_ALIASES, name)

    @classmethod
    def from_op_name(cls, name: str) -> Activation:
        """The member whose :attr:`op_name` is ``name`` (the custom ops' strict spelling).

        Raises:
            ValueError: any other string.
        """
        return _lookup(_OP_NAMES, name)

    @classmethod
    def from_approximate(cls, approximate: str) -> Activation:
        """GELU for ``"none"``, GELU_TANH for ``"tanh"`` (``F.gelu``'s argument, as the ``geglu`` ops take it).

        Raises:
            ValueError: any other string.
        """
        if approximate == "none":
            return Activation.GELU
        if approximate == "tanh":
            return Activation.GELU_TANH
        raise ValueError(f"geglu: approximate must be 'none' or 'tanh', got {approximate!r}")


def _lookup(names: dict[str, Activation], name: object) -> Activation:
    try:
        return names[name]
    except (KeyError, TypeError):  # TypeError: an unhashable name
        raise ValueError(f"activation must be one of {sorted(names)}, got {name!r}") from None


#: Hugging Face activation strings whose function the GLU kernels compute exactly (transformers' ACT2FN keys).
_CONFIG_NAMES: dict[str, Activation] = {
    "silu": Activation.SILU,
    "swish": Activation.SILU,
    "gelu": Activation.GELU,
    "gelu_pytorch_tanh": Activation.GELU_TANH,
    "gelu_new": Activation.GELU_TANH,
}
_OP_NAMES: dict[str, Activation] = {member.op_name: member for member in Activation}
#: Every accepted spelling: config names, op names, and the kernel family names.
_ALIASES: dict[str, Activation] = {
    **_CONFIG_NAMES,
    **_OP_NAMES,
    "swiglu": Activation.SILU,
    "geglu": Activation.GELU,
    "geglu_tanh": Activation.GELU_TANH,
}
