"""Input embedding kept in host memory: same training, weight out of the parameter list, saved and reverted.

There is no GPU here, so the device->host->device hops are exercised as cpu->cpu (the same code path: the module
gathers on the weight's device and returns on the ids' device); the memory it saves on a GPU is modeled by
``fastft plan --offload-embeddings`` (tests/memory/test_step_model.py checks that figure by hand).
"""

import logging

import peft
import pytest
import torch

import fastft
from fastft import FastModel
from fastft.offline import build_tiny_model, save_tiny_model
from fastft.patches.embedding_offload import HostEmbedding, offload_input_embeddings


@pytest.fixture
def model_dir(tmp_path):
    return save_tiny_model(str(tmp_path / "llama"), "llama")


def _step_losses(model, steps=3):
    torch.manual_seed(0)
    ids = torch.randint(5, 384, (2, 11))
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    losses = []
    model.train()
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def test_training_unchanged_and_weight_leaves_the_parameters(model_dir):
    ref, _ = FastModel.from_pretrained(model_dir)
    ref = FastModel.get_peft_model(ref, r=4, lora_alpha=8, init_lora_weights=False)
    expected = _step_losses(ref)
    fastft.unpatch()

    model, _ = FastModel.from_pretrained(model_dir)
    n_before = sum(p.numel() for p in model.parameters())
    model = FastModel.get_peft_model(model, r=4, lora_alpha=8, init_lora_weights=False, offload_embeddings=True)
    emb = model.get_base_model().get_input_embeddings()
    assert isinstance(emb, HostEmbedding)
    names = [n for n, _ in model.named_parameters()]
    assert not any("embed_tokens" in n for n in names), names  # model.device / optimizers never see it
    lora = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert sum(p.numel() for p in model.parameters()) == n_before - emb.weight.numel() + lora
    assert any(k.endswith("embed_tokens.weight") for k in model.state_dict())  # still saved under its key
    assert _step_losses(model) == pytest.approx(expected, rel=1e-6)


def test_merged_save_includes_the_host_embedding(model_dir, tmp_path):
    model, tok = FastModel.from_pretrained(model_dir)
    model = FastModel.get_peft_model(model, r=4, lora_alpha=8, offload_embeddings=True)
    out = model.save_pretrained_merged(str(tmp_path / "merged"), tok, dtype=torch.float32)
    import glob

    from safetensors.torch import load_file

    state = {}
    for f in glob.glob(f"{out}/*.safetensors"):
        state.update(load_file(f))
    plain = build_tiny_model("llama")
    assert torch.equal(state["model.embed_tokens.weight"], plain.model.embed_tokens.weight)


def test_refusals_are_explained(caplog):
    tied = build_tiny_model("llama", tie_word_embeddings=True)
    with caplog.at_level(logging.WARNING, logger="fastft"):
        assert "tied to the LM head" in offload_input_embeddings(tied)
    trainable = build_tiny_model("llama")
    assert "trainable" in offload_input_embeddings(trainable)  # a plain model: every weight requires grad
    lora = peft.get_peft_model(
        build_tiny_model("llama"), peft.LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["embed_tokens"])
    )
    assert "trainable" in offload_input_embeddings(lora)
    assert "stays on" in caplog.text


def test_sharded_or_zero3_embeddings_are_refused_as_fastft_distributed_detects_them():
    """A frozen embedding that is an FSDP2 shard (a real DTensor, on a one-process gloo group) or a DeepSpeed ZeRO-3
    parameter -- even one gathered on this rank -- stays where its engine put it."""
    import types

    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    model = build_tiny_model("llama")
    embedding = model.get_input_embeddings()
    frozen = embedding.weight.detach()
    zero3 = torch.nn.Parameter(frozen.clone(), requires_grad=False)
    zero3.ds_id, zero3.ds_status = 7, types.SimpleNamespace(name="AVAILABLE")  # gathered, still ZeRO-3's
    embedding.weight = zero3
    assert "DeepSpeed ZeRO-3" in offload_input_embeddings(model)
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        embedding.weight = torch.nn.Parameter(distribute_tensor(frozen, mesh, [Shard(0)]), requires_grad=False)
        assert "sharded (FSDP2)" in offload_input_embeddings(model)
    finally:
        dist.destroy_process_group()
    assert not isinstance(model.get_input_embeddings(), HostEmbedding)


def test_idempotent_and_reverted_by_unpatch():
    model = build_tiny_model("llama")
    model.requires_grad_(False)
    original = model.model.embed_tokens
    weight = original.weight
    assert offload_input_embeddings(model) is None
    first = model.model.embed_tokens
    assert offload_input_embeddings(model) is None and model.model.embed_tokens is first  # no double wrap
    assert first.num_embeddings == 384 and first.weight is weight  # attributes read through
    ids = torch.tensor([[3, 7, 0, 383]])
    assert torch.equal(first(ids), torch.nn.functional.embedding(ids, weight))
    fastft.unpatch()
    assert model.model.embed_tokens is original and original.weight is weight
    assert any(n == "model.embed_tokens.weight" for n, _ in model.named_parameters())


def test_load_state_dict_reaches_the_host_weight():
    model = build_tiny_model("llama")
    model.requires_grad_(False)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["model.embed_tokens.weight"] = torch.full_like(state["model.embed_tokens.weight"], 0.25)
    offload_input_embeddings(model)
    model.load_state_dict(state)
    assert torch.all(model.get_input_embeddings().weight == 0.25)
