"""finetune.merge: the adapter merged into its base gives the same logits and loads with transformers alone."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import compose, run_cli, tiny_overrides

from finetune import pipeline, runfolder
from finetune.merge import merge


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tiny_model) -> Path:
    out = tmp_path_factory.mktemp("merge-runs")
    result = pipeline.run(compose(tiny_overrides(tiny_model, out, "run_name=lora")))
    return result.run_dir


def _copy_run(run: Path, target: Path) -> Path:
    shutil.copytree(run, target, ignore=shutil.ignore_patterns("merged", "export", "checkpoints"))
    return target


def _prompt_ids(tokenizer) -> torch.Tensor:
    from finetune.data import DEMO_INSTRUCTION

    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": DEMO_INSTRUCTION + "March 5, 2021"}],
        add_generation_prompt=True,
        tokenize=False,
    )
    return tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]


def test_merged_logits_equal_the_adapter_models(lora_run, tmp_path):
    run = _copy_run(lora_run, tmp_path / "run")
    target = merge(str(run))
    assert target == run / "merged" and (target / "config.json").is_file()
    assert not (target / "adapter_config.json").exists()
    assert not [p for p in run.iterdir() if p.name.startswith(".merged")]  # nothing half-written left behind

    adapter_model, tokenizer = runfolder.load_model(
        runfolder.open_run(str(run)), dtype="float32", merge=False
    )
    assert type(adapter_model).__name__ == "PeftModelForCausalLM"
    from transformers import AutoModelForCausalLM, AutoTokenizer

    merged = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32)
    merged_tokenizer = AutoTokenizer.from_pretrained(target)
    assert merged_tokenizer.chat_template == tokenizer.chat_template
    ids = _prompt_ids(tokenizer)
    assert torch.equal(ids, _prompt_ids(merged_tokenizer))
    with torch.no_grad():
        expected, got = adapter_model(ids).logits, merged(ids).logits
    # The adapter must have changed something, or equal logits would prove nothing.
    with torch.no_grad(), adapter_model.disable_adapter():
        base = adapter_model(ids).logits
    assert (expected - base).abs().max() > 1e-4
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_merged_folder_loads_without_peft_or_finetune(lora_run, tmp_path):
    run = _copy_run(lora_run, tmp_path / "run")
    merge(str(run))
    probe = (
        "import sys; sys.modules['peft'] = None; sys.modules['finetune'] = None\n"  # importing either now fails
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(run / 'merged')!r})\n"
        f"t = AutoTokenizer.from_pretrained({str(run / 'merged')!r})\n"
        "ids = t.apply_chat_template([{'role': 'user', 'content': 'hi'}], add_generation_prompt=True, return_tensors='pt', return_dict=True)\n"
        "print('OK', m.generate(**ids, max_new_tokens=3, do_sample=False).shape[1] > ids['input_ids'].shape[1])\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, cwd=tmp_path, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "OK True" in done.stdout


def test_quantized_run_merges_into_the_unquantized_base(lora_run, tmp_path, capsys):
    run = _copy_run(lora_run, tmp_path / "qlora")
    config = (run / "config.yaml").read_text().replace("load_in: none", "load_in: 4bit")
    assert "load_in: 4bit" in config
    (run / "config.yaml").write_text(config)
    merge(str(run))
    assert "un-quantized base" in capsys.readouterr().out
    saved = json.loads((run / "merged" / "config.json").read_text())
    assert "quantization_config" not in saved


def test_full_fine_tune_is_already_merged(tiny_model, tmp_path, capsys):
    run = tmp_path / "full"
    run.mkdir()
    (run / "config.yaml").write_text("model:\n  name: test-tiny\n  name_or_path: test-tiny\n")
    shutil.copytree(tiny_model, run / "model")
    target = merge(str(run))
    assert "full fine-tune" in capsys.readouterr().out
    assert (target / "config.json").is_file() and target.resolve() == (run / "model").resolve()


def test_adapter_names_the_users_base_not_our_cache(tmp_path, monkeypatch):
    from finetune.schema import Config, ModelConfig

    monkeypatch.setenv("FINETUNE_CACHE", str(tmp_path / "cache"))
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    cached = str(tmp_path / "cache" / "models" / "tiny")
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": cached, "r": 8}))
    (adapter / "README.md").write_text(f"---\nbase_model: {cached}\n---\n")
    cfg = Config(model=ModelConfig(name="smollm2", name_or_path="HuggingFaceTB/SmolLM2-135M-Instruct"))
    assert runfolder.point_adapter_at_user_base(adapter, cfg) == cached
    assert (
        json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"]
        == "HuggingFaceTB/SmolLM2-135M-Instruct"
    )
    assert "base_model: HuggingFaceTB/SmolLM2-135M-Instruct" in (adapter / "README.md").read_text()
    # A base the user gave (a folder of theirs, a hub id) is left as it is.
    assert runfolder.point_adapter_at_user_base(adapter, cfg) is None


def test_mistakes_are_one_line(lora_run, tmp_path):
    (tmp_path / "unfinished").mkdir()
    (tmp_path / "unfinished" / "config.yaml").write_text("model:\n  name: x\n  name_or_path: x\n")
    merged = _copy_run(lora_run, tmp_path / "merged-already")
    (merged / "merged").mkdir()
    cases = [
        ([f"run={tmp_path / 'nope'}"], "no such folder"),
        ([f"run={tmp_path / 'unfinished'}"], "no trained weights"),
        ([f"run={merged}"], "already exists"),
        ([f"run={tmp_path}"], "not a run folder"),
        (["runn=x"], "Did you mean 'run'"),
        ([], "run=<run folder>"),
        ([f"run={merged}", "dtype=int4"], "dtype=int4"),
    ]
    for args, message in cases:
        done = run_cli(*args, module="finetune.merge", cwd=tmp_path, timeout=120)
        assert done.returncode == 2, (args, done.stderr)
        assert done.stderr.startswith("finetune: error:") and message in done.stderr, (args, done.stderr)
        assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "dtype=" in run_cli("--help", module="finetune.merge").stdout


@pytest.mark.slow
def test_default_model_merges_and_names_the_hub_base(default_run, tmp_path):
    run = _copy_run(default_run, tmp_path / "default")
    merge(str(run))
    adapter = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    adapter_model, tokenizer = runfolder.load_model(
        runfolder.open_run(str(run)), dtype="float32", merge=False
    )
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(run / "merged", dtype=torch.float32)
    ids = _prompt_ids(tokenizer)
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, adapter_model(ids).logits, atol=1e-3, rtol=1e-3)
