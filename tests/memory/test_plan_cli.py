"""`fastft plan`: size parsing, model resolution, CLI errors, and one tiny end-to-end JSON run."""

import json

import pytest

from fastft.cli import main
from fastft.memory.model_configs import known_models, load_config
from fastft.memory.units import parse_size
from fastft.patches.architectures import ARCHITECTURES


@pytest.mark.parametrize(
    "text,expected",
    [
        ("16 GB", 16 * 10**9),
        ("16GiB", 16 * 2**30),
        ("16000MB", 16 * 10**9),
        ("0.5 GiB", 2**29),
        ("80gb", 80 * 10**9),
        ("1024B", 1024),
        ("12 gib", 12 * 2**30),
        ("0", 0),
    ],
)
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("bad", ["sixteen", "16 GX", "", "GB", "-3GB", "16 G B"])
def test_parse_size_rejects(bad):
    with pytest.raises(ValueError, match="cannot parse memory size"):
        parse_size(bad)


def test_known_models_ship_and_load():
    names = known_models()
    for want in (
        "Llama-3.1-8B",
        "Llama-3.2-1B",
        "Llama-3.2-3B",
        "Qwen2.5-7B",
        "Qwen3-8B",
        "Mistral-7B-v0.3",
        "Gemma-2-9B",
        "Qwen2.5-0.5B",
        "Qwen2.5-1.5B",
        "Qwen3-0.6B",
        "Qwen3-1.7B",
        "Qwen3-4B",
    ):
        assert want in names
    cfg = load_config("meta-llama/llama-3.1-8b")
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.vocab_size) == (4096, 32, 8, 128256)
    g = load_config("Gemma-2-9B")
    assert g.final_logit_softcapping == 30.0 and g.tie_word_embeddings


def test_cli_unknown_model_lists_known_names(capsys):
    assert main(["plan", "--model", "not-a-model-xyz"]) == 2
    err = capsys.readouterr().err
    assert "unknown model 'not-a-model-xyz'" in err and "Llama-3.1-8B" in err and "Qwen3-8B" in err


def test_cli_bad_size(capsys):
    assert main(["plan", "--model", "Llama-3.2-1B", "--gpu-memory", "sixteen"]) == 2
    assert "cannot parse memory size 'sixteen'" in capsys.readouterr().err


def test_cli_json_on_local_config(tmp_path, capsys):
    from tests.memory._configs import tiny_llama

    tiny_llama(layers=2).save_pretrained(tmp_path)
    assert (
        main(
            [
                "plan",
                "--model",
                str(tmp_path),
                "--seq-len",
                "256",
                "--lora-r",
                "4",
                "--load-in-4bit",
                "--gpu-memory",
                "3MB",
                "--reserve",
                "0",
                "--baseline",
                "--json",
            ]
        )
        == 0
    )
    out = json.loads(capsys.readouterr().out)
    fast, base = out["variants"]
    assert out["modeled"] is True and fast["variant"] == "fastft" and base["variant"] == "baseline"
    assert fast["peak_bytes"] > 0 and sum(fast["breakdown"].values()) == fast["peak_bytes"]
    # the search's answer is consistent with the budget: it fits, and (coarse granularity) twice as long does not
    for v in (fast, base):
        assert v["max_context"] is not None
    assert fast["max_context"] >= base["max_context"]


def test_max_context_search_brackets_the_budget():
    from fastft.memory.plan import Planner
    from fastft.memory.step_model import StepSpec
    from tests.memory._configs import tiny_llama

    planner = Planner(tiny_llama(layers=2), StepSpec(variant="baseline", lora_r=4, load_in_4bit=True))
    budget = 4 * 10**6
    best = planner.max_context(budget)
    assert best > 0 and planner.step(best).peak_bytes <= budget
    # the first measured length above best exceeds the budget and is within the coarse granularity
    above = min(t for t in planner.cache if t > best)
    assert planner.step(above).peak_bytes > budget and above - best <= max(256, best // 32) + 128


@pytest.mark.parametrize(
    "name",
    [
        "meta-llama/Meta-Llama-3.1-8B-Instruct",
        "unsloth/llama-3.2-1b-bnb-4bit",
        "google/gemma-2-9b-it",
        "mistralai/Mistral-7B-Instruct-v0.3",
        "Qwen3-8B-Base",
    ],
)
def test_instruct_and_quantized_repo_names_use_the_base_config(name):
    assert load_config(name).model_type in ("llama", "gemma2", "mistral", "qwen3")


# (name as the notebooks/examples/users write it) -> (hidden, layers, heads, kv heads, intermediate, tied, positions)
NOTEBOOK_MODELS = {
    "Qwen/Qwen2.5-1.5B-Instruct": (1536, 28, 12, 2, 8960, True, 131072),  # the notebooks' and T4 examples' model
    "unsloth/Qwen2.5-1.5B-Instruct-bnb-4bit": (1536, 28, 12, 2, 8960, True, 131072),
    "Qwen/Qwen2.5-0.5B-Instruct": (896, 24, 14, 2, 4864, True, 32768),
    "Qwen/Qwen3-0.6B": (1024, 28, 16, 8, 3072, True, 40960),
    "Qwen/Qwen3-1.7B-Base": (2048, 28, 16, 8, 6144, True, 40960),
    "unsloth/Qwen3-4B-unsloth-bnb-4bit": (2560, 36, 32, 8, 9728, True, 40960),
    "meta-llama/Llama-3.2-1B-Instruct": (2048, 16, 32, 8, 8192, True, 131072),
    "unsloth/Llama-3.2-3B-Instruct": (3072, 28, 24, 8, 8192, True, 131072),
}


@pytest.mark.parametrize("name", sorted(NOTEBOOK_MODELS))
def test_notebook_and_example_models_have_shipped_configs(name):
    c = load_config(name)
    got = (
        c.hidden_size,
        c.num_hidden_layers,
        c.num_attention_heads,
        c.num_key_value_heads,
        c.intermediate_size,
        c.tie_word_embeddings,
        c.max_position_embeddings,
    )
    assert got == NOTEBOOK_MODELS[name]
    assert c.model_type in ARCHITECTURES  # modeled with fastft's kernels, not as an unpatched model


def test_every_shipped_config_is_documented_in_sources_md():
    from fastft.memory.model_configs import CONFIG_DIR

    sources = (CONFIG_DIR / "SOURCES.md").read_text()
    for name in known_models():
        assert f"## {name} (" in sources or f"### {name} (" in sources, name


def test_a_different_release_is_not_mapped_to_a_shipped_config():
    with pytest.raises(ValueError, match="unknown model 'Qwen/Qwen3-4B-Instruct-2507'"):
        load_config("Qwen/Qwen3-4B-Instruct-2507")  # 262,144 positions, rope_theta 5e6: not Qwen3-4B's file


def test_gpu_presets_reserve_and_errors(capsys):
    from fastft.memory.plan import tensor_budget
    from fastft.memory.units import parse_gpu_memory

    assert parse_gpu_memory("t4") == 15_360 * 2**20 and parse_gpu_memory("16GB") == 16 * 10**9
    assert tensor_budget(16 * 2**30, 2**30) == 15 * 2**30 and tensor_budget(None, 2**30) is None
    with pytest.raises(ValueError, match="leaves nothing"):
        tensor_budget(2**30, 2**30)
    assert main(["plan", "--model", "Llama-3.2-1B", "--gpu-memory", "1GB", "--reserve", "2GB"]) == 2
    assert "leaves nothing" in capsys.readouterr().err
    assert main(["plan", "--model", "Llama-3.2-1B", "--gpu-memory", "T4", "--host-memory", "lots"]) == 2
    assert "cannot parse memory size 'lots'" in capsys.readouterr().err


def test_reserve_and_host_budget_bound_the_search(tmp_path, capsys):
    from tests.memory._configs import tiny_llama

    tiny_llama(layers=2).save_pretrained(tmp_path)
    base = ["plan", "--model", str(tmp_path), "--seq-len", "256", "--lora-r", "4", "--load-in-4bit", "--json"]

    def run(*extra):
        assert main(base + list(extra)) == 0
        return json.loads(capsys.readouterr().out)

    free = run("--gpu-memory", "4MB", "--reserve", "0")["variants"][0]
    reserved = run("--gpu-memory", "4MB", "--reserve", "1MB")
    assert reserved["tensor_budget_bytes"] == 3 * 10**6
    assert 0 < reserved["variants"][0]["max_context"] < free["max_context"]
    assert reserved["variants"][0]["fits"] == (reserved["variants"][0]["peak_bytes"] <= 3 * 10**6)
    # host RAM: offloaded checkpoints are 2 layers x T x 96 x 2 bytes; 0.2 MB of host allows ~520 tokens at most
    hosted = run("--gpu-memory", "4MB", "--reserve", "0", "--host-memory", "0.2MB")["variants"][0]
    assert hosted["limited_by"] == "host" and 0 < hosted["max_context"] < free["max_context"]
    assert hosted["max_context_host_bytes"] <= 200_000


def test_text_output_notes_max_positions(tmp_path, capsys):
    from tests.memory._configs import tiny_llama

    cfg = tiny_llama(layers=1)
    cfg.max_position_embeddings = 512
    cfg.save_pretrained(tmp_path)
    assert (
        main(
            ["plan", "--model", str(tmp_path), "--seq-len", "128", "--lora-r", "4", "--gpu-memory", "8MB", "--reserve", "0"]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "MODELED" in out and "beyond the model's max_position_embeddings (512)" in out


def test_tiled_mlp_flag_models_fastmodel_option(tmp_path, capsys):
    from tests.memory._configs import tiny_llama

    tiny_llama(layers=1).save_pretrained(tmp_path)
    base = ["plan", "--model", str(tmp_path), "--seq-len", "512", "--lora-r", "4", "--json"]
    assert main(base) == 0
    plain = json.loads(capsys.readouterr().out)["variants"][0]
    assert main(base + ["--tiled-mlp", "64"]) == 0
    tiled = json.loads(capsys.readouterr().out)["variants"][0]
    assert any("tiled(64)" in n for n in tiled["notes"]) and not any("tiled" in n for n in plain["notes"])
    assert tiled["peak_bytes"] < plain["peak_bytes"]  # the [512, intermediate] MLP activations exist 64 rows at a time
    assert main(base + ["--tiled-mlp", "0"]) == 2
    assert "--tiled-mlp TOKENS must be >= 1" in capsys.readouterr().err


def test_search_cap_is_reported_as_a_lower_bound():
    from fastft.memory.plan import Planner, plan_variant
    from fastft.memory.step_model import StepSpec
    from tests.memory._configs import tiny_llama

    cfg, spec = tiny_llama(layers=1), StepSpec(variant="fastft", lora_r=4)
    planner = Planner(cfg, spec)
    assert planner.max_context(10**12, limit=4096) == 4096  # everything fits: stops at the cap
    plan = plan_variant(cfg, spec, 256, 1, 10**12, planner=planner)
    assert plan.limited_by == "search cap"
    assert plan_variant(cfg, spec, 256, 1, 3 * 10**6).limited_by == "gpu"


@pytest.mark.parametrize("flag", ["--gpu-memory", "--host-memory", "--reserve"])
def test_bare_numbers_need_a_unit(flag, capsys):
    args = ["plan", "--model", "Llama-3.2-1B", "--gpu-memory", "T4", flag, "16"]
    assert main(args) == 2
    assert f"{flag} 16: 16 what? write 16GB or 16GiB" in capsys.readouterr().err
    with pytest.raises(ValueError, match="12.5 what"):
        parse_size("12.5")


def test_gpu_presets_still_work_and_misspelt_ones_get_a_suggestion(capsys):
    from fastft.memory.units import parse_gpu_memory

    assert parse_gpu_memory("T4") == 15_360 * 2**20 and parse_gpu_memory("a100-80gb") == 81_920 * 2**20
    assert main(["plan", "--model", "Llama-3.2-1B", "--gpu-memory", "T5"]) == 2
    err = capsys.readouterr().err
    assert "it is not a known GPU; did you mean T4" in err and "A100-80GB" in err


def _gpt2(tmp_path):
    from transformers import GPT2Config

    GPT2Config(
        n_layer=2, n_embd=96, n_head=6, vocab_size=320, n_positions=1024, bos_token_id=0, eos_token_id=0
    ).save_pretrained(tmp_path)
    return str(tmp_path)


def test_unsupported_architecture_is_modeled_unpatched_and_says_so(tmp_path, capsys):
    """gpt2 is not in fastft's table: FastModel applies no kernel, fused LoRA or fused loss to it, so the plan must
    not model them (it crashed on `hidden_act` before)."""
    model = _gpt2(tmp_path)
    assert main(["plan", "--model", model, "--seq-len", "256", "--lora-r", "4", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    (variant,) = out["variants"]
    assert out["architecture_supported"] is False and variant["variant"] == "unpatched"
    assert "not in fastft's architecture table" in out["unpatched_reason"]
    assert out["lora_target_modules"] == ["c_attn"]  # PEFT's default for gpt2: the usual q/k/v names do not exist
    assert not any("patch_model" in n or "fused LoRA" in n for n in variant["notes"]), variant["notes"]
    assert variant["peak_bytes"] > 0 and variant["host_bytes"] > 0  # fastft's offloaded checkpointing still applies

    assert main(["plan", "--model", model, "--seq-len", "256", "--lora-r", "4"]) == 0
    text = capsys.readouterr().out
    assert "UNPATCHED: model_type 'gpt2' is not in fastft's architecture table" in text
    assert "== fastft, UNPATCHED: no fastft kernels apply to this architecture ==" in text
    assert "FastModel.get_peft_model needs target_modules=['c_attn']" in text

    assert main(["plan", "--model", model, "--tiled-mlp"]) == 2  # a patch that would not be applied is refused
    assert "the tiled MLP is one of fastft's architecture patches" in capsys.readouterr().err
    assert main(["plan", "--model", model, "--target-modules", "c_atn"]) == 2
    assert "did you mean 'c_attn' for 'c_atn'?" in capsys.readouterr().err


def test_unsupported_llama_shaped_architecture_gets_no_fused_paths(tmp_path, capsys):
    from transformers import OlmoConfig

    OlmoConfig(
        hidden_size=96,
        intermediate_size=224,
        num_hidden_layers=2,
        num_attention_heads=6,
        num_key_value_heads=2,
        vocab_size=320,
        max_position_embeddings=1024,
        pad_token_id=0,
        bos_token_id=0,
        eos_token_id=0,
    ).save_pretrained(tmp_path)
    assert main(["plan", "--model", str(tmp_path), "--seq-len", "256", "--lora-r", "4", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    (variant,) = out["variants"]
    assert variant["variant"] == "unpatched" and not any("fused LoRA" in n for n in variant["notes"])
    assert out["lora_target_modules"] == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.mark.parametrize("load_in_4bit", [True, False])
def test_unpatched_gpt2_meta_peak_matches_real_cpu_peak(load_in_4bit):
    """The stand-ins for an unpatched model (GPT-2's Conv1D as a linear layer, its decoder stack, its own loss) are
    what a real CPU step allocates, within the 5% the step model is held to for Llama."""
    from transformers import GPT2Config

    from fastft.memory.step_model import StepModel, StepSpec

    cfg = GPT2Config(n_layer=2, n_embd=96, n_head=6, vocab_size=320, n_positions=1024)
    spec = StepSpec(variant="unpatched", lora_r=8, load_in_4bit=load_in_4bit, target_modules=("c_attn",))
    real = StepModel(cfg, spec, device="cpu").step(192)
    modeled = StepModel(cfg, spec, device="meta").step(192)
    assert abs(modeled.peak_bytes - real.peak_bytes) <= 0.05 * real.peak_bytes, (modeled.breakdown, real.breakdown)
    assert modeled.host_bytes == real.host_bytes > 0
