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
* fastft's variant: ``fastft.patches.patcher.patch_model`` (fused RMSNorm / RoPE / SwiGLU-GeGLU, optionally
  the tiled MLP) on the meta model -- their custom ops run their fake impls -- plus fastft's fused LoRA (the real
  ``LoRAMLP`` / ``LoRAProjections`` autograd functions of fastft.kernels.lora over the stand-in layers, NF4
  dequantized into its shared buffers, adapters cast to the compute dtype as under the Trainer's autocast), the
  loss head patch_model installs (``fastft.kernels.linear_cross_entropy``; on meta its chunk loop runs in place of
  the op's fake impl, so the [C, V] logits chunk is charged), and optionally the input embedding in host memory.
* optimizer: torch AdamW (foreach, as on CUDA) with states created before the measured step (steady state: states
  live through forward and backward; gradients are set to None after each step, as the Trainer does);
  ``adamw_8bit`` is bitsandbytes' layout (two uint8 states + fp32 absmax per 256 values for tensors of >= 4096
  elements, fp32 otherwise) with an in-place update, which is what its fused kernel does.

The stand-ins live in :mod:`fastft.memory.standins` (re-exported here). The same code runs on real CPU tensors
(``device="cpu"``, tiny configs) and is validated against the tracker's measured peak there, and against a real
``FastModel`` + PEFT LoRA training step (tests/memory/test_validation.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from fastft.kernels import chunk_loop_in_place

# The stand-ins live in fastft.memory.standins; their names stay importable from here (the public surface).
from fastft.memory.standins.attention import (  # noqa: F401 - re-exported
    ATTENTION_NAME,
    _FlashAttention,
    flash_attention_backward,
    flash_attention_forward,
    meta_flash_attention,
    register_attention,
)
from fastft.memory.standins.checkpointing import CheckpointedLayer, HostLedger
from fastft.memory.standins.linear4bit import NESTED_BLOCK, QUANT_BLOCK, Linear4bit, dequantize_4bit  # noqa: F401
from fastft.memory.standins.lora import LoraLinear
from fastft.memory.standins.optim import Adam8bitModel, make_optimizer  # noqa: F401 - re-exported
from fastft.memory.tracker import LiveBytesTracker

#: FastModel.get_peft_model's default targets (fastft.model.ALL_LINEAR_PROJECTIONS): Phi-3's fused ones included
LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj", "gate_proj", "up_proj", "gate_up_proj", "down_proj")
VARIANTS = ("fastft", "baseline", "unpatched")

# ---------------------------------------------------------------------------------------------------------------
# Building and stepping
# ---------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class StepSpec:
    """What to model. ``variant``: "fastft" (fused kernels and loss head, offloaded checkpointing, tiled MLP),
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
    fused_kernels: bool = True  # fastft variant: apply patch_model (fused norm / RoPE / GLU / loss head)
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

        self.notes += replace_experts(
            model,
            spec.lora_r,
            spec.lora_alpha if spec.lora_alpha is not None else 2 * spec.lora_r,
            spec.variant == "fastft" and spec.fused_kernels,
            device,
        )
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
                    base = Linear4bit(in_features, out_features, spec.dtype, self.device, spec.double_quant, child.bias)
                if spec.lora_r > 0:
                    base = LoraLinear(
                        base, in_features, out_features, spec.lora_r, alpha, self.device, clone_result=spec.load_in_4bit
                    )
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
        self.notes.append(
            "baseline: embed_tokens/lm_head upcast to fp32 (prepare_model_for_kbit_training), "
            "used through bf16 casts as under autocast"
        )

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
            from fastft.patches.patcher import patch_model

            report = patch_model(model, tiled_mlp=self.spec.tiled_mlp)
        except Exception as exc:  # noqa: BLE001 - a half-written patch must not stop the plan; say what is missing
            self.notes.append(
                f"fastft patch_model failed ({type(exc).__name__}: {exc}); fused norm/RoPE/MLP/loss "
                "NOT modelled -- offloaded checkpointing only"
            )
            return
        self.notes.append(f"patch_model: applied {report.applied}, skipped {report.skipped}")
        if self.spec.lora_r > 0:
            self._fuse_lora(model)

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
                isinstance(getattr(module, k, None), LoraLinear) for k in ("gate_proj", "up_proj", "down_proj")
            ):
                module._fastft_mlp_once = types.MethodType(mlp_once, module)
                mlps += 1
            elif hasattr(module, "_fastft_mlp_once") and all(
                isinstance(getattr(module, k, None), LoraLinear) for k in ("gate_up_proj", "down_proj")
            ):
                module.gate_up_proj.fused = module.down_proj.fused = True  # Phi-3 / GLM-4: each projection fused
                mlps += 1
            elif isinstance(module, LoraLinear) and leaf in ("q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj"):
                module.fused = True
                projections += 1
        self.notes.append(f"fused LoRA (fastft.kernels.lora): {mlps} MLPs, {projections} attention projections")

    def step(self, seq_len: int, batch_size: int = 1, replay_layers: bool | None = None, counter: Any = None) -> StepResult:
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
            ids = torch.randint(
                0, model.config.vocab_size, (batch_size, seq_len), generator=torch.Generator().manual_seed(0)
            ).to(self.device)
        labels = ids.clone()
        if spec.variant == "fastft":
            from fastft.kernels.lora import clear_buffers

            clear_buffers()  # fused LoRA's shared NF4 buffers: allocated (and counted) by this step, then kept
        tracker = LiveBytesTracker()
        for layer in self.layers:
            if isinstance(layer, CheckpointedLayer):
                layer.tracker, layer.memo = tracker, memo
        hooks = [
            p.register_post_accumulate_grad_hook(lambda p: tracker.recharge(p.grad, "gradients")) for p in self.trainable
        ]
        self.ledger.live = self.ledger.peak = 0
        try:
            if counter is not None:
                counter.phase_of = lambda: tracker.phase
            with (
                _module_patches(spec.variant == "fastft" and spec.fused_kernels),
                tracker,
                counter if counter is not None else contextlib.nullcontext(),
            ):
                tracker.add_existing(list(model.parameters()) + list(model.buffers()), "weights")
                tracker.add_existing(self.state_tensors, "optimizer_state")
                tracker.add_existing([ids, labels], "inputs")
                with tracker.in_phase("activations"):
                    loss = self._loss(ids, labels, tracker, counter)
                with tracker.in_phase("loss"):
                    loss.backward()
                del loss
                with tracker.in_phase("optimizer_step"):
                    self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
        finally:
            for h in hooks:
                h.remove()
        return StepResult(
            tracker.peak_bytes,
            dict(tracker.peak_breakdown),
            self.ledger.peak + self.host_static,
            dict(tracker.peak_by_phase),
            time.perf_counter() - t0,
            list(self.notes),
        )

    def _loss(self, ids: torch.Tensor, labels: torch.Tensor, tracker: LiveBytesTracker, counter: Any = None) -> torch.Tensor:
        """The model's own loss: transformers' full logits (upcast to fp32 in ForCausalLMLoss) for the baseline and
        unpatched variants, and for fastft whatever ``patch_model`` installed -- its fused loss head, i.e.
        ``fastft.kernels.linear_cross_entropy`` -- with fastft's chunk loop run in place of the op's fake impl on
        meta (see :func:`_chunk_loop_visible`)."""
        model = self.model

        def enter_loss(hidden: torch.Tensor) -> None:
            tracker.phase = "loss"
            if hidden.requires_grad:
                hidden.register_hook(lambda g: setattr(tracker, "phase", "backward"))

        # The loss starts where the backbone ends: the lm_head's input (full logits) or the backbone's output
        # (fastft's fused head never calls lm_head).
        handles = [
            model.get_output_embeddings().register_forward_pre_hook(lambda m, args: enter_loss(args[0])),
            getattr(model, model.base_model_prefix).register_forward_hook(
                lambda m, args, out: enter_loss(out.last_hidden_state)
            ),
        ]
        try:
            with _chunk_loop_visible(self.device == "meta", counter):
                return model(input_ids=ids, labels=labels).loss
        finally:
            for handle in handles:
                handle.remove()


@contextlib.contextmanager
def _chunk_loop_visible(active: bool, counter: Any = None) -> Iterator[None]:
    """On meta, run linear_cross_entropy's chunk loop itself instead of its custom op, whose fake impl models the
    op's outputs only: the loop's [C, V] logits chunk and its gradient buffers are then charged as on a GPU. The
    per-chunk softmax (cross_entropy's stats / in-place grad) takes its Triton launchers with the launches dropped:
    they allocate their outputs, and the kernels' scratch lives in registers. A ``counter`` (speed_model.OpCounter)
    gets each dropped launch as one op moving its tensor arguments' bytes (a tensor passed twice, as the in-place
    grad's logits are, is read and written). On real tensors the op's real impl runs the same loop inside the
    tracker, so nothing is swapped."""
    if not active:
        yield
        return

    def dropped(kernel: Any, grid: tuple, args: tuple, kwargs: dict) -> None:
        if counter is not None:
            from fastft.memory.speed_model import OpKey, footprint

            nbytes = sum(footprint(t) for t in args if isinstance(t, torch.Tensor))
            name = "triton::" + getattr(getattr(kernel, "fn", kernel), "__name__", "kernel")
            counter.calls[OpKey(name, counter.phase_of(), "", 0, nbytes, True)] += 1

    # Without triton the torch path runs on meta; its fp32 temporaries are bounded 4 MiB row pieces.
    with chunk_loop_in_place(dropped):
        yield


@contextlib.contextmanager
def _module_patches(active: bool) -> Iterator[None]:
    """fastft's process-wide patches (RoPE functions) on for the fastft variant, off for the baseline."""
    try:
        from fastft.patches.patcher import module_patches
    except Exception:  # noqa: BLE001 - no patches module: nothing to scope
        yield
        return
    changed = []
    for patch in module_patches():
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
    names = {
        name.rsplit(".", 1)[-1]
        for layer in decoder_layers(model)
        for name, m in layer.named_modules()
        if _linear_shape(m) is not None
    }
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
        raise ValueError(
            f"cannot find the decoder layers of {type(model).__name__}: {len(found)} module lists with "
            f"num_hidden_layers={count} entries"
        )
    return found[0]


def _copy_config(config: Any) -> Any:
    import copy

    return copy.deepcopy(config)
