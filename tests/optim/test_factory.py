"""create_optimizer: param groups, optim dispatch, bad input, training, layer-wise mode."""

import types

import pytest
import torch
from transformers import TrainingArguments

from fastft.offline import build_tiny_model
from fastft.optim import EmbeddingLRMixin, GaLoreAdamW, create_optimizer

GALORE_ARGS = "rank=8,update_proj_gap=5,scale=1.0,min_8bit_size=256"


def _args(tmp_path, optim="adamw_torch", **kw):
    kw.setdefault("optim_target_modules", ["self_attn", "mlp"] if "galore" in optim else None)
    if "galore" in optim and "optim_args" not in kw:
        kw["optim_args"] = GALORE_ARGS if "8bit" in optim else GALORE_ARGS.rsplit(",", 1)[0]
    return TrainingArguments(str(tmp_path), optim=optim, use_cpu=True, report_to="none", **kw)


def _groups(opt):
    return {g["name"]: g for g in opt.param_groups}


def test_param_groups_no_decay_on_norms_and_biases_and_embedding_lr(tmp_path):
    model = build_tiny_model("qwen2")  # qwen2 has q/k/v biases
    model.lm_head.weight.requires_grad_(False)  # frozen params must not be optimized
    args = _args(tmp_path, weight_decay=0.1, learning_rate=1e-3)
    args.embedding_learning_rate = 2e-5
    groups = _groups(create_optimizer(model, args))
    names = {id(p): n for n, p in model.named_parameters()}
    nd = [names[id(p)] for p in groups["no_decay"]["params"]]
    assert groups["no_decay"]["weight_decay"] == 0.0 and groups["decay"]["weight_decay"] == 0.1
    assert any(n.endswith("q_proj.bias") for n in nd) and any(n.endswith("input_layernorm.weight") for n in nd)
    assert "model.norm.weight" in nd
    assert all(p.dim() >= 2 for p in groups["decay"]["params"])
    assert not any("norm" in names[id(p)] or "bias" in names[id(p)] for p in groups["decay"]["params"])
    assert [names[id(p)] for p in groups["embedding"]["params"]] == ["model.embed_tokens.weight"]
    assert groups["embedding"]["lr"] == 2e-5 and groups["decay"]["lr"] == 1e-3
    n_opt = sum(len(g["params"]) for g in groups.values())
    assert n_opt == sum(1 for p in model.parameters() if p.requires_grad)


def test_param_groups_peft_modules_to_save_and_mixin(tmp_path):
    import dataclasses

    from peft import LoraConfig, get_peft_model

    model = get_peft_model(
        build_tiny_model(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head", "embed_tokens"])
    )

    @dataclasses.dataclass
    class Config(EmbeddingLRMixin, TrainingArguments):
        pass

    args = Config(str(tmp_path), use_cpu=True, report_to="none", learning_rate=1e-4, embedding_learning_rate=5e-6)
    groups = _groups(create_optimizer(model, args))
    names = {id(p): n for n, p in model.named_parameters()}
    emb = sorted(names[id(p)] for p in groups["embedding"]["params"])
    assert emb == [
        "base_model.model.lm_head.modules_to_save.default.weight",
        "base_model.model.model.embed_tokens.modules_to_save.default.weight",
    ]
    assert groups["embedding"]["lr"] == 5e-6
    assert all("lora_" in names[id(p)] for p in groups["decay"]["params"]) and len(groups["decay"]["params"]) == 8


def test_galore_groups_hold_only_target_linear_weights(tmp_path):
    model = build_tiny_model()
    opt = create_optimizer(model, _args(tmp_path, "galore_adamw", optim_target_modules=["mlp"]))
    assert isinstance(opt, GaLoreAdamW)
    g = _groups(opt)
    names = {id(p): n for n, p in model.named_parameters()}
    assert sorted({names[id(p)].rsplit(".", 2)[-2] for p in g["galore"]["params"]}) == ["down_proj", "gate_proj", "up_proj"]
    assert g["galore"]["rank"] == 8 and g["galore"]["update_proj_gap"] == 5 and g["galore"]["scale"] == 1.0
    assert g["decay"]["rank"] is None  # attention weights: plain AdamW
    regex = create_optimizer(model, _args(tmp_path, "galore_adamw", optim_target_modules=r".*\.q_proj"))
    assert len(_groups(regex)["galore"]["params"]) == 2


def test_unknown_optim_lists_choices():
    args = types.SimpleNamespace(optim="adamw_turbo", learning_rate=1e-3)
    with pytest.raises(ValueError, match="unknown optim 'adamw_turbo'.*galore_adamw_layerwise"):
        create_optimizer(build_tiny_model(), args)


def test_target_modules_matching_nothing_or_missing(tmp_path):
    model = build_tiny_model()
    with pytest.raises(ValueError, match="matched no trainable nn.Linear"):
        create_optimizer(model, _args(tmp_path, "galore_adamw", optim_target_modules=["not_a_module"]))
    with pytest.raises(ValueError, match="needs `optim_target_modules`"):
        create_optimizer(model, _args(tmp_path, "galore_adamw", optim_target_modules=None))
    with pytest.raises(ValueError, match="not understood"):
        create_optimizer(model, _args(tmp_path, "galore_adamw", optim_args="rank=4,rnak=3"))


def test_layerwise_refuses_gradient_accumulation(tmp_path):
    with pytest.raises(ValueError, match="gradient_accumulation_steps=4"):
        create_optimizer(build_tiny_model(), _args(tmp_path, "galore_adamw_layerwise", gradient_accumulation_steps=4))


def test_paged_on_cpu_falls_back_with_warning(tmp_path):
    with pytest.warns(UserWarning, match="non-paged"):
        opt = create_optimizer(build_tiny_model(), _args(tmp_path, "paged_adamw_8bit"))
    assert "bitsandbytes" in type(opt).__module__


OPTIMS = [
    "adamw_torch",
    "adamw_8bit",
    "adafactor",
    "galore_adamw",
    "galore_adamw_8bit",
    "galore_adafactor",
    "galore_adamw_layerwise",
    "galore_adamw_8bit_layerwise",
    "galore_adafactor_layerwise",
]


@pytest.mark.parametrize("optim", OPTIMS)
def test_each_optimizer_trains_the_tiny_model(tmp_path, optim):
    model = build_tiny_model().train()
    opt = create_optimizer(model, _args(tmp_path, optim, learning_rate=3e-3, max_grad_norm=0.0))
    batch = torch.randint(5, 384, (4, 24), generator=torch.Generator().manual_seed(0))
    losses = []
    for _ in range(20):
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5, losses  # memorizing one batch: loss must fall clearly


def test_layerwise_matches_regular_and_frees_grads(tmp_path):
    batches = [torch.randint(5, 384, (2, 16), generator=torch.Generator().manual_seed(i)) for i in range(4)]
    params = []
    for optim in ("galore_adamw", "galore_adamw_layerwise"):
        model = build_tiny_model().train()
        opt = create_optimizer(
            model,
            _args(tmp_path, optim, learning_rate=3e-3, max_grad_norm=0.0, optim_args="rank=8,update_proj_gap=2,svd=exact"),
        )
        for b in batches:
            model(input_ids=b, labels=b).loss.backward()
            if optim.endswith("layerwise"):
                assert all(p.grad is None for p in model.parameters())  # stepped and freed inside backward
            opt.step()
            opt.zero_grad()
        params.append([p.detach().clone() for p in model.parameters()])
        opt.disable_layerwise()
    for a, b in zip(*params):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bits", [32, 8])
def test_galore_8bit_keeps_embeddings_32bit_unless_asked(tmp_path, bits):
    model = build_tiny_model()
    opt = create_optimizer(
        model, _args(tmp_path, "galore_adamw_8bit", optim_args=f"rank=8,min_8bit_size=256,embedding_bits={bits}")
    )
    batch = torch.randint(5, 384, (2, 8))
    model(input_ids=batch, labels=batch).loss.backward()
    opt.step()
    g = _groups(opt)
    emb_dtype = opt.state[g["embedding"]["params"][0]]["exp_avg"].dtype
    assert emb_dtype == (torch.float32 if bits == 32 else torch.uint8)
    assert opt.state[g["galore"]["params"][0]]["exp_avg"].dtype == torch.uint8
