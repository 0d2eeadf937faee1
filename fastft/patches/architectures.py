"""Per-architecture support as data: one table row per ``model_type``.

A row says where the architecture's pieces live and how they behave (norm class and its casting style, the rotary
function, the MLP class, its layout -- separate gate/up projections or Phi-3's one gate_up_proj -- and the config
field naming its activation, logit softcapping / scaling / divisor fields), and which pieces fastft cannot compute
identically for it (``unfused``: OLMo 2's weight-in-fp32 RMSNorm, GLM-4's interleaved partial RoPE), which are then
left as transformers wrote them, with the reason in the report, while the rest is patched. The one generic patcher
(:func:`fastft.patches.patcher.patch_model`) applies fastft's kernels from the row; nothing is a copied forward, so a
new architecture is a row plus a test. The activations a row's ``activation_field`` may name are
:class:`fastft.kernels.activation.Activation`'s config names.
"""

from __future__ import annotations

import dataclasses

from torch import nn


@dataclasses.dataclass(frozen=True)
class Architecture:
    """How one transformers architecture is built, as far as fastft's kernels care."""

    model_type: str
    module: str  # transformers modeling module
    norm_class: str
    norm_style: str  # "llama": normalize, cast, * weight | "gemma": * (1 + weight) in fp32
    mlp_class: str | None  # the dense MLP class (None: every layer is MoE)
    activation_field: str  # config field naming the MLP activation
    rope_function: str = "apply_rotary_pos_emb"
    # The row's logit transform fields, as data: fastft.patches.lm_head.head_transform reads them (with every other
    # field transformers' forwards read) for any model type; tests/patches/test_lm_head.py checks that it does.
    final_logit_softcapping_field: str | None = None
    logit_scale_field: str | None = None  # logits * config.<field>
    logit_divisor_field: str | None = None  # logits / config.<field> (Granite's logits_scaling)
    #: "gated": gate_proj / up_proj / down_proj | "gate_up": one gate_up_proj whose output halves are (gate, up)
    mlp_style: str = "gated"
    #: (piece, why) pairs: pieces fastft cannot compute identically for this row, left as transformers wrote them
    unfused: tuple[tuple[str, str], ...] = ()
    #: MoE: the stacked experts class that gets the grouped-GEMM forward (fastft.patches.moe)
    experts_class: str | None = None


_OLMO2_NORM = (
    "rms_norm",
    "its RMSNorm multiplies the weight in fp32 before casting back; fastft's kernel casts "
    "first (Llama) or scales by 1 + weight (Gemma), which rounds differently in half precision",
)
_GPT_OSS_ROPE = (
    "rope",
    "gpt-oss passes half-width cos/sin and rotates the head's two halves itself; fastft's RoPE "
    "kernel takes full-width cos/sin",
)
_GLM4_ROPE = (
    "rope",
    "GLM-4 rotates interleaved pairs of a partial rotary slice; fastft's RoPE kernel rotates "
    "the two halves of the whole head",
)
_GEMMA4_NORM = (
    "rms_norm",
    "Gemma 4's RMSNorm multiplies the weight in fp32 before casting back (OLMo 2's style, "
    "neither fastft style), and its v_norm has no weight at all",
)
_GEMMA4_ROPE = (
    "rope",
    "Gemma 4's apply_rotary_pos_emb rotates one tensor per call (x, cos, sin), with proportional "
    "partial RoPE on global layers; fastft's RoPE kernel takes q and k together",
)


ARCHITECTURES: dict[str, Architecture] = {
    row.model_type: row
    for row in [
        Architecture("llama", "transformers.models.llama.modeling_llama", "LlamaRMSNorm", "llama", "LlamaMLP", "hidden_act"),
        Architecture(
            "mistral", "transformers.models.mistral.modeling_mistral", "MistralRMSNorm", "llama", "MistralMLP", "hidden_act"
        ),
        Architecture("qwen2", "transformers.models.qwen2.modeling_qwen2", "Qwen2RMSNorm", "llama", "Qwen2MLP", "hidden_act"),
        Architecture("qwen3", "transformers.models.qwen3.modeling_qwen3", "Qwen3RMSNorm", "llama", "Qwen3MLP", "hidden_act"),
        Architecture(
            "gemma", "transformers.models.gemma.modeling_gemma", "GemmaRMSNorm", "gemma", "GemmaMLP", "hidden_activation"
        ),
        Architecture(
            "gemma2",
            "transformers.models.gemma2.modeling_gemma2",
            "Gemma2RMSNorm",
            "gemma",
            "Gemma2MLP",
            "hidden_activation",
            final_logit_softcapping_field="final_logit_softcapping",
        ),
        # Phi-3 / 3.5 / 4: fused qkv_proj (attention untouched) and gate_up_proj, split by the MLP patch.
        Architecture(
            "phi3",
            "transformers.models.phi3.modeling_phi3",
            "Phi3RMSNorm",
            "llama",
            "Phi3MLP",
            "hidden_act",
            mlp_style="gate_up",
        ),
        # Gemma 3 text: q/k norms and the four norms per layer are Gemma3RMSNorm instances; sliding and global
        # layers share apply_rotary_pos_emb (different cos/sin); the embedding scale stays in transformers' code.
        Architecture(
            "gemma3_text",
            "transformers.models.gemma3.modeling_gemma3",
            "Gemma3RMSNorm",
            "gemma",
            "Gemma3MLP",
            "hidden_activation",
            final_logit_softcapping_field="final_logit_softcapping",
        ),
        Architecture(
            "olmo2",
            "transformers.models.olmo2.modeling_olmo2",
            "Olmo2RMSNorm",
            "llama",
            "Olmo2MLP",
            "hidden_act",
            unfused=(_OLMO2_NORM,),
        ),
        Architecture(
            "olmo3",
            "transformers.models.olmo3.modeling_olmo3",
            "Olmo3RMSNorm",
            "llama",
            "Olmo3MLP",
            "hidden_act",
            unfused=(_OLMO2_NORM,),
        ),
        # Granite: embedding / residual / attention multipliers stay in transformers' forwards; logits_scaling
        # divides the logits, so the fused loss head applies it.
        Architecture(
            "granite",
            "transformers.models.granite.modeling_granite",
            "GraniteRMSNorm",
            "llama",
            "GraniteMLP",
            "hidden_act",
            logit_divisor_field="logits_scaling",
        ),
        # SmolLM3: attention skips apply_rotary_pos_emb on its no-RoPE layers; nothing else differs here.
        Architecture(
            "smollm3", "transformers.models.smollm3.modeling_smollm3", "SmolLM3RMSNorm", "llama", "SmolLM3MLP", "hidden_act"
        ),
        Architecture(
            "glm4",
            "transformers.models.glm4.modeling_glm4",
            "Glm4RMSNorm",
            "llama",
            "Glm4MLP",
            "hidden_act",
            mlp_style="gate_up",
            unfused=(_GLM4_ROPE,),
        ),
        Architecture(
            "ministral",
            "transformers.models.ministral.modeling_ministral",
            "MinistralRMSNorm",
            "llama",
            "MinistralMLP",
            "hidden_act",
        ),
        Architecture(
            "ministral3",
            "transformers.models.ministral3.modeling_ministral3",
            "Ministral3RMSNorm",
            "llama",
            "Ministral3MLP",
            "hidden_act",
        ),
        # MoE: the experts stack runs the grouped GEMM; router, aux loss and the block's forward stay transformers'.
        Architecture(
            "qwen3_moe",
            "transformers.models.qwen3_moe.modeling_qwen3_moe",
            "Qwen3MoeRMSNorm",
            "llama",
            "Qwen3MoeMLP",
            "hidden_act",
            experts_class="Qwen3MoeExperts",
        ),
        Architecture(
            "mixtral",
            "transformers.models.mixtral.modeling_mixtral",
            "MixtralRMSNorm",
            "llama",
            None,
            "hidden_act",
            experts_class="MixtralExperts",
        ),
        Architecture(
            "gpt_oss",
            "transformers.models.gpt_oss.modeling_gpt_oss",
            "GptOssRMSNorm",
            "llama",
            None,
            "hidden_act",
            unfused=(_OLMO2_NORM, _GPT_OSS_ROPE),
            experts_class="GptOssExperts",
        ),
        # Gemma 4 text (Gemma4ForCausalLM): the dense MLP (double-wide on KV-shared layers; built per layer index) and
        # the softcapped loss head are patched. Per-layer embeddings, KV sharing, k == v global layers and the
        # embedding scale stay in transformers' code; so does the MoE block of the 26B-A4B (enable_moe_block),
        # whose router and experts are Gemma 4's own classes.
        Architecture(
            "gemma4_text",
            "transformers.models.gemma4.modeling_gemma4",
            "Gemma4RMSNorm",
            "llama",
            "Gemma4TextMLP",
            "hidden_activation",
            final_logit_softcapping_field="final_logit_softcapping",
            unfused=(_GEMMA4_NORM, _GEMMA4_ROPE),
        ),
    ]
}


def architecture_of(model: nn.Module) -> Architecture | None:
    config = getattr(model, "config", None)
    return ARCHITECTURES.get(getattr(config, "model_type", None))
