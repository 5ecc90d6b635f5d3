"""Every model x GPU of the catalog composes and plans; the make presets print a plan that fits."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import compose

from finetune import autofit, config_dir, memory, plan, schema, source

ROOT = Path(__file__).resolve().parents[1]
MODELS = sorted(p.stem for p in (config_dir() / "model").glob("*.yaml"))
GPUS = sorted(p.stem for p in (config_dir() / "hw").glob("*.yaml") if p.stem != "auto")

# Published parameter counts (model cards), in billions, to two decimals.
PUBLISHED = {
    "phi-3-mini": 3.82,
    "llama-3-8b": 8.03,
    "llama-3.1-8b": 8.03,
    "qwen2.5-7b": 7.62,
    "qwen2-vl-7b": 8.29,
    "gpt-oss-20b": 20.91,
    "llama-3-70b": 70.55,
    "mistral-7b": 7.25,
    "gemma-2-9b": 9.24,
    "qwen2.5-0.5b": 0.49,
    "qwen2.5-1.5b": 1.54,
    "qwen2.5-3b": 3.09,
    "qwen2.5-14b": 14.77,
    "qwen2.5-32b": 32.76,
    "qwen2.5-72b": 72.71,
    "llama-3.2-1b": 1.24,
    "llama-3.2-3b": 3.21,
    "tiny": 0.13,
}


def test_catalog_covers_the_seed_documents_and_popular_models():
    seed = {"phi-3-mini", "llama-3-8b", "qwen2.5-7b", "qwen2-vl-7b", "gpt-oss-20b", "llama-3-70b"}
    galore_chart = {"llama-350m", "llama-1b", "llama-3b", "llama-7b"}
    popular = {
        "llama-3.1-8b",
        "llama-3.2-1b",
        "llama-3.2-3b",
        "mistral-7b",
        "gemma-2-9b",
        "qwen2.5-0.5b",
        "qwen2.5-1.5b",
        "qwen2.5-3b",
        "qwen2.5-14b",
        "qwen2.5-32b",
        "qwen2.5-72b",
    }
    assert seed | galore_chart | popular | {"tiny"} <= set(MODELS)
    wanted_gpus = {
        "cpu",
        "t4",
        "v100-16gb",
        "v100-32gb",
        "rtx3090",
        "rtx4090",
        "a10g",
        "l4",
        "a6000",
        "l40s",
        "a100-40gb",
        "a100-80gb",
        "h100",
        "h200",
    }
    assert wanted_gpus <= set(GPUS)


@pytest.mark.parametrize("model", MODELS)
def test_model_parameter_count_matches_its_card(model):
    cfg = compose([f"model={model}"])
    params = memory.count_params(source.architecture(cfg.model)).total
    if model in PUBLISHED:
        assert round(params / 1e9, 2) == pytest.approx(PUBLISHED[model], abs=0.011)


@pytest.mark.parametrize("model", MODELS)
def test_every_model_on_every_gpu_composes_and_plans(model):
    for hw in GPUS:
        cfg = compose(
            [f"model={model}", f"hw={hw}", "data=file", "data.path=chats.jsonl", "data.max_length=1024"]
        )
        schema.validate(cfg)
        p = autofit.resolve(cfg)
        assert p.estimate.total_gib > 0 and p.budget_gib > 0
        if p.fits:
            assert p.estimate.total_gib <= p.budget_gib
        assert p.cfg.hw.name == hw


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
@pytest.mark.parametrize("preset,gpu", [("colab-t4", "t4"), ("rtx4090", "rtx4090"), ("a100", "a100-80gb")])
def test_make_presets_print_a_plan_that_fits_without_a_gpu(preset, gpu):
    result = subprocess.run(
        ["make", "-s", preset, f"PY={sys.executable}"], capture_output=True, text=True, cwd=ROOT
    )
    assert result.returncode == 0, result.stderr
    assert "No GPU on this machine: printing the plan" in result.stdout
    assert f"on {gpu}" in result.stdout and "fits (90% of the device" in result.stdout


def test_mixture_of_experts_plans_total_and_active_parameters():
    p = autofit.resolve(compose(["model=gpt-oss-20b", "hw=a6000"]))
    assert round(p.params / 1e9, 1) == 20.9 and round(p.active_params / 1e9, 1) == 3.6  # OpenAI's model card
    assert "3.61B active per token" in dict((r[0], r[2]) for r in plan.rows(p))["model"]
    dense = autofit.resolve(compose(["model=llama-3-8b", "hw=a6000"]))
    assert dense.active_params == dense.params - 128256 * 4096  # all but the untied embedding lookup
