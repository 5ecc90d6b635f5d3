"""Any architecture transformers can build: exact counts, PEFT's adapters, every causal-LM model type
plans or stops with one clear line, shipped readings stay fresh, and tiny LoRA runs across families."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from conftest import build_tiny_model, compose, run_cli, tiny_overrides

from finetune import UserError, memory, source
from finetune.memory import GIB, Settings, count_params, estimate, lora_target_names, reference_param_count
from finetune.memory.reading import SHIPPED, key, read

ROOT = Path(__file__).resolve().parents[1]
CALIBRATION = ROOT.parent / "shared" / "calibration" / "archs"


def _calibration_archs() -> list[Path]:
    if not CALIBRATION.is_dir():
        return []
    return sorted(
        d
        for d in CALIBRATION.iterdir()
        if any(
            a.endswith("ForCausalLM")
            for a in json.loads((d / "config.json").read_text()).get("architectures", [])
        )
    )


# Modern families not in the calibration set, at small widths (the structure is what is read)
SMALL = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 256,
    "head_dim": 16,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
}
MODERN = {
    "qwen3": {},
    "qwen3_moe": {"moe_intermediate_size": 32, "num_experts": 8, "num_experts_per_tok": 2},
    "gemma3_text": {},
    "olmo2": {},
    "granite": {},
    "granitemoe": {"num_local_experts": 4, "num_experts_per_tok": 2},
    "deepseek_v2": {"moe_intermediate_size": 32, "n_routed_experts": 8, "first_k_dense_replace": 1},
    "deepseek_v3": {"moe_intermediate_size": 32, "n_routed_experts": 8, "first_k_dense_replace": 1},
    "glm4": {},
    "smollm3": {},
    "llama4_text": {"intermediate_size_mlp": 128, "num_local_experts": 4},
    "gpt_oss": {"num_local_experts": 4},
    "qwen2_moe": {"moe_intermediate_size": 32, "num_experts": 8, "shared_expert_intermediate_size": 64},
}


@pytest.mark.parametrize("folder", _calibration_archs(), ids=lambda p: p.name)
def test_counts_equal_the_meta_model_calibration(folder):
    a = source.read_config(folder / "config.json")
    assert count_params(a).total == reference_param_count(a)


@pytest.mark.parametrize("model_type", sorted(MODERN))
def test_counts_equal_the_meta_model_modern(model_type):
    a = {"model_type": model_type, **SMALL, **MODERN[model_type]}
    pc = count_params(a)
    assert pc.total == reference_param_count(a)
    parts = pc.as_dict()
    assert parts.pop("total") == sum(parts.values())
    if "moe" in model_type or model_type in ("deepseek_v2", "deepseek_v3", "llama4_text", "gpt_oss"):
        assert pc.experts > 0 and pc.router > 0, pc


@pytest.mark.parametrize(
    "model_type, targets",
    [
        ("gpt2", ("all-linear",)),
        ("gpt2", ("c_attn",)),
        ("bloom", ("all-linear",)),
        ("falcon", ("query_key_value", "dense")),
        ("qwen3_moe", ("all-linear",)),
        ("deepseek_v3", ("all-linear",)),
        ("qwen3", ("q_proj", "mlp.down_proj", "lm_head")),
    ],
)
def test_adapter_counts_are_peft_s(model_type, targets):
    import torch
    from peft import get_peft_model

    from finetune.memory.reading import lora_config

    a = {"model_type": model_type, **SMALL, **MODERN.get(model_type, {})}
    if model_type == "falcon":
        del a["head_dim"]  # derived by FalconConfig
    model = memory.reading.build(a)
    with warnings.catch_warnings(), torch.device("meta"):
        warnings.simplefilter("ignore")
        target = "all-linear" if targets == ("all-linear",) else list(targets)
        model = get_peft_model(model, lora_config(r=8, target_modules=target))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    est = estimate(a, Settings(lora_r=8, lora_targets=targets))
    assert est.adapter_gib * GIB == trainable * 4  # fp32 adapters on an unquantized base


def test_target_names_are_the_model_s_own():
    assert {"c_attn", "c_proj", "c_fc"} <= set(lora_target_names({"model_type": "gpt2", **SMALL}))
    assert "query_key_value" in lora_target_names({"model_type": "bloom", **SMALL})
    with pytest.raises(UserError, match=r"q_proj names no module of this gpt2 model.*c_attn"):
        estimate({"model_type": "gpt2", **SMALL}, Settings(lora_targets=("q_proj",)))


def test_unknown_mechanisms_are_conservative_and_marked():
    mamba = {"model_type": "mamba", "hidden_size": 64, "num_hidden_layers": 2, "vocab_size": 256}
    with pytest.raises(UserError, match="PEFT cannot apply lora.target_modules=all-linear to mamba"):
        estimate(mamba)
    full = estimate(mamba, Settings(lora_r=None))
    assert full.approximate and full.notes
    dense = estimate({"model_type": "llama", **SMALL})
    assert not dense.approximate and not dense.notes
    mla = memory.describe({"model_type": "deepseek_v3", **SMALL, **MODERN["deepseek_v3"]})
    assert mla.unknown  # multi-head latent attention is not in the table: estimated conservatively


@pytest.mark.parametrize(
    "arch, message",
    [
        ({"model_type": "t5"}, "'t5' is an encoder-decoder model: finetune trains causal"),
        ({"model_type": "mt5"}, "'mt5' is an encoder-decoder model"),
        ({"model_type": "bert"}, "'bert' has no causal language-model head"),
        ({"model_type": "llama", "hidden_size": "big"}, "transformers"),
        (
            {"model_type": "no_such_model"},
            "model_type 'no_such_model' is not an architecture transformers knows",
        ),
        ({"hidden_size": 64}, "no 'model_type'"),
    ],
)
def test_architecture_errors_are_one_clear_line(arch, message):
    with pytest.raises(UserError, match=message) as err:
        count_params(arch)
    assert "\n" not in str(err.value)


def _causal_lm_types() -> list[str]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def _small_config(model_type: str) -> dict:
    """The type's default config.json with two layers where the config allows it (meta device: the
    widths cost nothing, the layer count costs time)."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.for_model(model_type, num_hidden_layers=2)
        d = config.to_dict()
        if any(
            isinstance(v, list) and len(v) > 2 and k.endswith(("layer_types", "_layers"))
            for k, v in d.items()
        ):
            raise ValueError("per-layer lists")
        return d
    except Exception:
        return AutoConfig.for_model(model_type).to_dict()


COMMON_TYPES = (
    "apertus arcee bamba bitnet bloom codegen cohere cohere2 dbrx deepseek_v2 deepseek_v3 ernie4_5 exaone4 "
    "falcon falcon_h1 gemma gemma2 gemma3_text glm glm4 gpt2 gpt_bigcode gpt_neox gpt_oss gptj granite "
    "granitemoe helium hunyuan_v1_dense jamba llama llama4_text mamba mistral mixtral mpt olmo olmo2 opt phi "
    "phi3 qwen2 qwen2_moe qwen3 qwen3_moe smollm3 stablelm starcoder2 bert roberta"
).split()


@pytest.mark.parametrize("tier", ["common", pytest.param("all", marks=pytest.mark.slow)])
def test_every_causal_lm_type_plans_or_says_why(tier):
    """Each decoder-only type transformers maps to a causal-LM head: an estimate, or one UserError line."""
    types = _causal_lm_types()
    if tier == "common":
        types = [t for t in COMMON_TYPES if t in types]
    assert len(types) >= 40
    planned, refused, failures = [], [], []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for mt in types:
            try:
                a = _small_config(mt)
            except Exception:  # transformers cannot even build its own default (remote code, ...)
                continue
            try:
                est = estimate(a, Settings(lora_r=16))
                assert est.total_gib > 0
                planned.append(mt)
            except UserError as e:
                assert "\n" not in str(e) and mt in str(e), (mt, str(e))
                refused.append(mt)
            except Exception as e:  # a traceback for the user: the bug this test exists for
                failures.append(f"{mt}: {type(e).__name__}: {e}")
    assert not failures, failures
    assert len(planned) >= 40, (len(planned), refused)


@pytest.mark.parametrize(
    "config, ok",
    [
        ({"model_type": "bloom", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4}, True),
        (
            {
                "model_type": "gpt_bigcode",
                "hidden_size": 64,
                "num_hidden_layers": 2,
                "num_attention_heads": 4,
            },
            True,
        ),
        ({"model_type": "t5"}, False),
        ({"model_type": "llama", "hidden_size": [1, 2]}, False),
    ],
    ids=["bloom", "gpt_bigcode", "t5", "bad-value"],
)
def test_plan_cli_on_a_config_folder(tmp_path, config, ok):
    (tmp_path / "config.json").write_text(json.dumps(config))
    result = run_cli(f"model.name_or_path={tmp_path}", "format=json", module="finetune.plan", cwd=tmp_path)
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    if ok:
        assert result.returncode == 0, result.stderr[-2000:]
        assert json.loads(result.stdout)["estimate"]["total_gib"] > 0
    else:
        assert result.returncode != 0 and len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_catalog_plan_never_imports_torch(tmp_path):
    code = (
        "import sys, runpy\nsys.argv = ['plan', 'model=llama-3-70b', 'format=json']\ntry:\n"
        "    runpy.run_module('finetune.plan', run_name='__main__')\nexcept SystemExit:\n    pass\n"
        "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH', file=sys.stderr)\n"
    )
    env = {**os.environ, "FINETUNE_CACHE": str(tmp_path)}  # an empty cache: the reading must be shipped
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert out.stderr.strip().endswith("NO-TORCH"), out.stderr[-2000:]
    assert json.loads(out.stdout)["model"]["params"] == 70_553_706_496


@pytest.mark.parametrize("tier", ["some", pytest.param("all", marks=pytest.mark.slow)])
def test_shipped_readings_equal_fresh_readings(tier):
    """scripts/write_readings.py rewrites them: run it after a transformers upgrade or a new model YAML."""
    import yaml

    shipped = json.loads(SHIPPED.read_text())
    paths = sorted((ROOT / "configs" / "model").glob("*.yaml"))
    if tier == "some":  # dense, MoE with sinks, vision-language
        paths = [p for p in paths if p.stem in ("llama-3-70b", "gpt-oss-20b", "qwen2-vl-7b")]
    for path in paths:
        arch = yaml.safe_load(path.read_text())["arch"]
        got = shipped.get(key(arch))
        assert got is not None, f"{path.name}: no shipped reading (run scripts/write_readings.py)"
        fresh = read(arch)
        strip = lambda r: {k: v for k, v in r.items() if k not in ("transformers", "catalog")}  # noqa: E731
        assert strip(got) == strip(json.loads(json.dumps(fresh))), path.name


def test_unseen_architecture_is_read_once_and_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("FINETUNE_CACHE", str(tmp_path))
    a = {"model_type": "olmo2", **SMALL, "hidden_size": 96}
    memory.reading._memo.clear()
    first = count_params(a)
    files = list((tmp_path / "readings").glob("*.json"))
    assert len(files) == 1
    memory.reading._memo.clear()
    monkeypatch.setattr(memory.reading, "read", lambda *_: pytest.fail("read again"))
    assert count_params(a) == first


# ---- tiny LoRA training across families (all-linear targets) --------------------------------

TRAIN = {
    "gpt2": {},
    "bloom": {},
    "falcon": {},
    "phi": {},
    "gpt_bigcode": {},
    "gpt_neox": {},
    "gemma2": {"head_dim": 16},
    "qwen3": {"head_dim": 16},
    "olmo2": {},
    "qwen3_moe": {"head_dim": 16, "moe_intermediate_size": 32, "num_experts": 4, "num_experts_per_tok": 2},
}


FAST_TRAIN = {"gpt2", "bloom", "phi", "gemma2", "qwen3_moe"}  # the rest run with -m slow (CI budget)


@pytest.mark.parametrize(
    "model_type", [t if t in FAST_TRAIN else pytest.param(t, marks=pytest.mark.slow) for t in sorted(TRAIN)]
)
def test_tiny_lora_training(tmp_path, model_type):
    from finetune import pipeline

    model_dir = build_tiny_model(tmp_path / "model", model_type, **TRAIN[model_type])
    # autofit's speed model still reads num_attention_heads / num_hidden_layers from config.json;
    # GPT-2-style configs name them n_head / n_layer (until it uses memory.dims): add the aliases
    cfg_file = model_dir / "config.json"
    d = json.loads(cfg_file.read_text())
    sizes = memory.dims(d)
    d.setdefault("num_attention_heads", sizes["heads"])
    d.setdefault("num_hidden_layers", sizes["layers"])
    d.setdefault("hidden_size", sizes["hidden"])
    cfg_file.write_text(json.dumps(d))
    extra = ["lora.target_modules=[all-linear]", "train.eval_samples=0"]
    # BLOOM and Gemma-2 have no SDPA path (ALiBi, soft-capping); the reading knows it, the pipeline's
    # attn_implementation=auto does not yet
    if "sdpa" not in memory.attention_implementations(json.loads(cfg_file.read_text())):
        extra.append("model.attn_implementation=eager")
    if model_type.endswith("moe"):
        extra.append("lora.dropout=0")  # PEFT's LoRA on fused expert parameters has no dropout
    overrides = tiny_overrides(model_dir, tmp_path / "out", *extra)
    result = pipeline.run(compose(overrides))
    adapters = [n for n, p in result.model.named_parameters() if p.requires_grad]
    assert adapters and all("lora_" in n for n in adapters)
