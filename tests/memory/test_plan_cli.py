"""`fastft plan`: size parsing, model resolution, CLI errors, and one tiny end-to-end JSON run."""

import json

import pytest

from fastft.cli import main
from fastft.memory.plan import known_models, load_config, parse_size


@pytest.mark.parametrize("text,expected", [
    ("16 GB", 16 * 10**9), ("16GiB", 16 * 2**30), ("16000MB", 16 * 10**9), ("0.5 GiB", 2**29),
    ("80gb", 80 * 10**9), ("1024", 1024), ("12 gib", 12 * 2**30),
])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("bad", ["sixteen", "16 GX", "", "GB", "-3GB", "16 G B"])
def test_parse_size_rejects(bad):
    with pytest.raises(ValueError, match="cannot parse memory size"):
        parse_size(bad)


def test_known_models_ship_and_load():
    names = known_models()
    for want in ("Llama-3.1-8B", "Llama-3.2-1B", "Llama-3.2-3B", "Qwen2.5-7B", "Qwen3-8B", "Mistral-7B-v0.3",
                 "Gemma-2-9B"):
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
    assert main(["plan", "--model", str(tmp_path), "--seq-len", "256", "--lora-r", "4", "--load-in-4bit",
                 "--gpu-memory", "3MB", "--reserve", "0", "--baseline", "--json"]) == 0
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


@pytest.mark.parametrize("name", ["meta-llama/Meta-Llama-3.1-8B-Instruct", "unsloth/llama-3.2-1b-bnb-4bit",
                                  "google/gemma-2-9b-it", "mistralai/Mistral-7B-Instruct-v0.3", "Qwen3-8B-Base"])
def test_instruct_and_quantized_repo_names_use_the_base_config(name):
    assert load_config(name).model_type in ("llama", "gemma2", "mistral", "qwen3")


def test_gpu_presets_reserve_and_errors(capsys):
    from fastft.memory.plan import parse_gpu_memory, tensor_budget

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
    assert main(["plan", "--model", str(tmp_path), "--seq-len", "128", "--lora-r", "4", "--gpu-memory", "8MB",
                 "--reserve", "0"]) == 0
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
