"""The auto-fit resolver: seed scenarios fit, pinned settings are never changed, misfits explain themselves."""

from __future__ import annotations

import dataclasses
import json
import os

import pytest
from conftest import compose, run_cli

from finetune import UserError, autofit, schema

REAL_DATA = ["data=file", "data.path=chats.jsonl", "data.max_length=1024"]

# The memory guide's real-world set-ups and the GaLore chart's headline (seed documents).
SEED_SCENARIOS = {
    "llama-3-8b on a colab t4": ["model=llama-3-8b", "hw=t4", "quant=4bit", "lora=r16", "batch=1x4"],
    "qwen2.5-7b on an rtx4090": ["model=qwen2.5-7b", "hw=rtx4090", "quant=8bit", "lora=r32", "batch=4x2"],
    "llama-3-70b on an a100-80gb": [
        "model=llama-3-70b",
        "hw=a100-80gb",
        "quant=4bit",
        "lora=r64",
        "batch=2x4",
    ],
    "7b 8-bit galore on an rtx4090": [
        "model=llama-7b",
        "hw=rtx4090",
        "lora=none",
        "optim=galore_8bit",
        "optim.galore_layerwise=true",
        "batch=1x8",
        "batch.grad_accum=1",
        "data.max_length=256",
    ],
}


def _plan(overrides: list[str]) -> autofit.Plan:
    cfg = compose([*REAL_DATA, *overrides])
    schema.validate(cfg)
    return autofit.resolve(cfg)


@pytest.mark.parametrize("name", SEED_SCENARIOS)
def test_seed_scenarios_fit_as_pinned_and_on_auto(name):
    pinned = _plan(SEED_SCENARIOS[name])
    assert pinned.fits, (name, pinned.estimate)
    model_and_hw = [o for o in SEED_SCENARIOS[name] if o.startswith(("model=", "hw="))]
    if "galore" not in name:
        auto = _plan(model_and_hw)
        assert auto.fits and auto.estimate.total_gib <= auto.budget_gib


@pytest.mark.parametrize("name", SEED_SCENARIOS)
def test_dry_run_shows_each_seed_scenario(name, tmp_path):
    result = run_cli(*REAL_DATA, *SEED_SCENARIOS[name], "dry_run=true", f"output_dir={tmp_path}")
    assert result.returncode == 0, result.stderr
    assert "fits (90% of the device" in result.stdout and "dry_run=true: nothing loaded" in result.stdout


def _leaves(node, prefix=""):
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _leaves(value, f"{prefix}{key}.")
    else:
        yield prefix[:-1], node


PINNED = [
    ["quant=4bit"],
    ["quant=8bit"],
    ["quant=none"],
    ["lora=r8"],
    ["lora=none"],
    ["lora=r64", "lora.use_dora=true"],
    ["batch=2x4"],
    ["batch=16x1"],
    ["batch.size=4"],
    ["optim=adamw_8bit"],
    ["optim=adafactor"],
    ["train.gradient_checkpointing=true"],
    ["train.gradient_checkpointing=false"],
    ["quant=4bit", "batch=1x16"],
]


@pytest.mark.parametrize("model", ["tiny", "llama-3-8b", "gpt-oss-20b"])
@pytest.mark.parametrize("hw", ["t4", "rtx4090", "a100-80gb"])
@pytest.mark.parametrize("pins", PINNED, ids=lambda p: "+".join(p))
def test_resolver_never_changes_a_pinned_setting(model, hw, pins):
    cfg = compose([*REAL_DATA, f"model={model}", f"hw={hw}", *pins])
    schema.validate(cfg)
    before = dict(_leaves(dataclasses.asdict(cfg)))
    after = dict(_leaves(dataclasses.asdict(autofit.resolve(cfg).cfg)))
    changed = {k: (v, after[k]) for k, v in before.items() if v != schema.AUTO and after[k] != v}
    # batch.effective is derived when it was unset (null); nothing else may move.
    changed.pop("batch.effective", None) if before["batch.effective"] is None else None
    assert not changed
    resolver_keys = (
        "quant.load_in",
        "lora.r",
        "batch.size",
        "batch.grad_accum",
        "optim.name",
        "hw.name",
        "train.gradient_checkpointing",
    )
    assert all(after[k] != schema.AUTO for k in resolver_keys)


def test_effective_batch_is_kept_when_the_micro_batch_shrinks():
    for hw in ("t4", "rtx4090", "a100-80gb", "h100"):
        p = _plan(["model=qwen2.5-7b", f"hw={hw}", "batch.effective=32"])
        c = p.cfg.batch
        assert c.size * c.grad_accum * max(p.cfg.hw.num_gpus, 1) == 32


def test_prefers_no_quantization_and_no_checkpointing_when_they_fit():
    p = _plan(["model=tiny", "hw=a100-80gb"])
    assert p.cfg.quant.load_in == "none" and p.cfg.train.gradient_checkpointing is False
    assert p.cfg.batch.size == 16  # the largest micro-batch that divides the effective batch
    tight = _plan(["model=llama-3-8b", "hw=t4"])
    assert tight.cfg.quant.load_in != "none" and tight.fits


def test_speed_estimate_is_reported_and_checkpointing_costs_time():
    fast = _plan(["model=qwen2.5-7b", "hw=a100-80gb", "train.gradient_checkpointing=false"])
    slow = _plan(
        [
            "model=qwen2.5-7b",
            "hw=a100-80gb",
            "train.gradient_checkpointing=true",
            f"batch.size={fast.cfg.batch.size}",
        ]
    )
    assert fast.tokens_per_second and slow.tokens_per_second
    assert slow.tokens_per_second < fast.tokens_per_second


def test_nothing_fits_names_estimate_budget_and_smallest_gpu():
    cfg = compose(
        [
            *REAL_DATA,
            "model=llama-3-8b",
            "hw=t4",
            "quant=none",
            "lora=r16",
            "batch=1x4",
            "train.gradient_checkpointing=true",
        ]
    )
    p = autofit.resolve(cfg)
    assert not p.fits
    with pytest.raises(UserError) as err:
        autofit.require_fit(p, cfg)
    message = str(err.value)
    assert "GiB per device but t4 allows" in message and "The smallest preset GPU that fits is hw=" in message
    huge = compose([*REAL_DATA, "model=llama-3-70b", "hw=t4", "lora=none", "quant=none"])
    with pytest.raises(UserError, match="No single preset GPU fits"):
        autofit.require_fit(autofit.resolve(huge), huge)


def test_plan_json_contract_and_no_torch(tmp_path):
    probe = (
        "import sys, runpy\nsys.argv=['plan','model=llama-3-70b','format=json']\n"
        "try:\n    runpy.run_module('finetune.plan', run_name='__main__')\n"
        "finally:\n    print('TORCH' if 'torch' in sys.modules else 'NO-TORCH', file=sys.stderr)\n"
    )
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip().endswith("NO-TORCH")
    plan = json.loads(result.stdout)
    assert plan["model"]["name"] == "llama-3-70b" and plan["model"]["params"] == 70_553_706_496
    assert set(plan["estimate"]) == {
        "weights_gib",
        "adapter_gib",
        "gradients_gib",
        "optimizer_gib",
        "activations_gib",
        "overhead_gib",
        "total_gib",
    }
    assert isinstance(plan["fits"], bool) and plan["budget_gib"] > 0
    for group in ("quant", "lora", "batch", "optim", "hw", "data", "train"):
        assert group in plan["settings"]
    assert set(plan["methods"]["training"]) == {"full", "lora", "lora_4bit", "lora_8bit"}


def test_plan_chart_is_written(tmp_path):
    out = tmp_path / "galore.png"
    result = run_cli("model=llama-7b", "hw=rtx4090", f"chart={out}", module="finetune.plan")
    assert result.returncode == 0, result.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_attention_auto_uses_flash_attention_only_where_it_can_run(monkeypatch):
    from finetune import hardware

    p = _plan(["model=qwen2.5-7b", "hw=t4"])
    assert p.cfg.model.attn_implementation == "sdpa"
    monkeypatch.setattr(hardware, "has_flash_attn", lambda: False)
    p = _plan(["model=qwen2.5-7b", "hw=a100-80gb"])
    assert p.cfg.model.attn_implementation == "sdpa"
    assert "flash-attn package is not installed" in dict((d[0], d[2]) for d in p.decisions)["attention"]
    monkeypatch.setattr(hardware, "has_flash_attn", lambda: True)
    assert _plan(["model=qwen2.5-7b", "hw=a100-80gb"]).cfg.model.attn_implementation == "flash_attention_2"
    pinned = _plan(["model=qwen2.5-7b", "hw=a100-80gb", "model.attn_implementation=eager"])
    assert pinned.cfg.model.attn_implementation == "eager"
    # attention sinks: finetune's SDPA even where flash-attn is installed (FlashAttention-2 drops sinks)
    assert _plan(["model=gpt-oss-20b", "hw=h100"]).cfg.model.attn_implementation == "sdpa"


def test_detected_free_memory_is_the_drivers_before_our_context(tmp_path, monkeypatch):
    """hw=auto asks nvidia-smi (a stand-in here) before torch opens its CUDA context, which the plan
    adds itself; it gives up where it cannot tell which GPUs torch sees."""
    from finetune import hardware

    fake = tmp_path / "nvidia-smi"
    fake.write_text('#!/bin/sh\nprintf "15101, [N/A]\\n8000, [N/A]\\n"\n')
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    assert hardware.driver_free_gib("") == pytest.approx([15101 / 1024, 8000 / 1024])
    assert hardware.driver_free_gib("1") == pytest.approx([8000 / 1024])
    assert hardware.driver_free_gib("GPU-8a1f,GPU-22c3") is None  # UUIDs: no way to match the rows
    assert hardware.driver_free_gib("3") is None
    fake.write_text('#!/bin/sh\nprintf "40000, Enabled\\n"\n')  # MIG: the whole card's figure
    assert hardware.driver_free_gib("") is None
    fake.write_text("#!/bin/sh\nexit 9\n")
    assert hardware.driver_free_gib("") is None
